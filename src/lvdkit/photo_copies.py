"""A photo copy-detection pool with known answers, built from photos that ship inside installed packages.

The demo's copies are mild edits of 28 px digits. Users' pools are photographs copied the way the web copies them:
cropped, shrunk and re-compressed, rotated, mirrored, framed with a caption. This pool plants exactly those edits:

- originals: the quadrants of the photographs scikit-image and scikit-learn ship (synthetic drawings such as the
  checkerboard, the colour wheel and the phantom are left out, and so are pure textures such as the brick wall and
  near-flat quadrants), each a distinct image of about 256 px, saved as JPEG; small pools take one quadrant of
  every photograph before a second of any;
- every original gets one copy per edit family in :data:`PHOTO_EDITS` (strengths fixed, positions seeded): ``crop``
  (55-75% of each side, kept at its own size), ``shrink_jpeg`` (half size, JPEG quality 30), ``rotate`` (10 degrees
  either way), ``flip`` (mirror), ``overlay`` (a border, a caption and a colour shift), ``compose`` (two of the
  others);
- padding up to the requested size: distinct "dead leaves" images (random overlapping discs and boxes, a classic
  model of natural-image statistics), none a copy of anything.

The edits are written here, apart from :mod:`lvdkit.curation.augment` (which calibrates dedup_copy), so the
benchmark does not grade the calibration on its own edits. The same size and seed give the same files and the same
``truth.parquet`` (the demo's schema; ``transform`` names the edit). Used by ``bench/photo_copies.py``.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from lvdkit.core.schema import (
    TRUTH,
    TRUTH_COPY_OF,
    TRUTH_HELDOUT,
    TRUTH_KIND,
    TRUTH_LABEL,
    TRUTH_LEAKED,
    TRUTH_NEAR,
    TRUTH_ORIGINAL,
    TRUTH_PATH,
    TRUTH_TRANSFORM,
)
from lvdkit.demo_images import load_photos

PHOTO_EDITS = ("crop", "shrink_jpeg", "rotate", "flip", "overlay", "compose")
FAMILY_SIZE = 1 + len(PHOTO_EDITS)
# drawings, not photographs; and pure textures, whose quadrants no copy detector can tell apart
NOT_PHOTOS = frozenset(
    {"checkerboard", "colorwheel", "logo", "horse", "shepp_logan_phantom", "microaneurysms", "brick", "grass", "gravel"}
)
MIN_TILE_STD = 12.0  # grey-level std below which a quadrant is nearly flat (sky, black space): not an original
PAD_SIDE = 192
PAD_LABEL = "dead_leaves"
CAPTIONS = ("(c) lvdkit 2026", "SALE -40%", "@photo_daily", "repost", "IMG_2041", "via the archive")


def photo_tiles() -> list[tuple[str, Image.Image]]:
    """(label, RGB image): the quadrants of the packaged photographs that are not near flat."""
    tiles = []
    for name, photo in load_photos():
        if name in NOT_PHOTOS:
            continue
        w, h = photo.size
        for qy in range(2):
            for qx in range(2):
                tile = photo.crop((qx * w // 2, qy * h // 2, (qx + 1) * w // 2, (qy + 1) * h // 2))
                if float(np.asarray(tile.convert("L"), dtype=np.float32).std()) >= MIN_TILE_STD:
                    tiles.append((f"{name}_q{2 * qy + qx}", tile))
    return tiles


def edit(image: Image.Image, family: str, rng: np.random.Generator) -> bytes:
    """The encoded copy of ``image`` made by the edit ``family`` (JPEG; quality 30 for ``shrink_jpeg``)."""
    if family == "compose":
        first, second = rng.choice([f for f in PHOTO_EDITS if f not in ("compose", "shrink_jpeg")], 2, replace=False)
        image = _apply(_apply(image, str(first), rng), str(second), rng)
        return _jpeg(image, int(rng.integers(40, 80)))
    return _jpeg(_apply(image, family, rng), 30 if family == "shrink_jpeg" else 85)


def _apply(image: Image.Image, family: str, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    if family == "crop":
        cw, ch = round(w * rng.uniform(0.55, 0.75)), round(h * rng.uniform(0.55, 0.75))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image.crop((x, y, x + cw, y + ch))
    if family == "shrink_jpeg":
        return image.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC)
    if family == "rotate":
        return image.rotate(10.0 if rng.random() < 0.5 else -10.0, Image.Resampling.BICUBIC)
    if family == "flip":
        return ImageOps.mirror(image)
    if family == "overlay":
        return _overlay(image, rng)
    raise ValueError(f"unknown edit family {family!r}; expected one of {PHOTO_EDITS}")


def _overlay(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A coloured border, a caption across the lower part and a colour shift: a reposted, watermarked copy."""
    w, h = image.size
    shifted = ImageEnhance.Color(image).enhance(float(rng.uniform(0.4, 1.6)))
    shifted = ImageEnhance.Brightness(shifted).enhance(float(rng.uniform(0.75, 1.25)))
    pad = max(2, round(min(w, h) * rng.uniform(0.05, 0.12)))
    fill = tuple(int(c) for c in rng.integers(0, 256, 3))
    framed = ImageOps.expand(shifted, border=pad, fill=fill)
    draw = ImageDraw.Draw(framed)
    font = ImageFont.load_default(size=max(10, h // 9))
    text = CAPTIONS[int(rng.integers(len(CAPTIONS)))]
    draw.text(
        (pad + w // 12, pad + int(h * rng.uniform(0.6, 0.8))),
        text,
        fill=(255, 255, 255),
        font=font,
        stroke_width=2,
        stroke_fill=(0, 0, 0),
    )
    return framed


def dead_leaves(rng: np.random.Generator, side: int = PAD_SIDE) -> Image.Image:
    """A distinct image: overlapping discs and boxes of random colour with power-law sizes on a random background."""
    image = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(60, 160))):
        r = side * 0.02 / max(rng.random(), 0.02) ** 0.7  # many small shapes, a few large ones
        x, y = rng.uniform(-r, side + r, 2)
        box = (x - r, y - r, x + r, y + r)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)(box, fill=colour)
    return image


def make_photo_pool(out: str | Path, size: int, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a pool of ``size`` images (``out/pool/``) and ``out/truth.parquet``; returns ``out``.

    As many whole families (an original and its :data:`FAMILY_SIZE` - 1 copies) as fit, at most one per tile, then
    dead-leaves padding. A pool of 200 holds 28 families (196 images) and 4 distinct images.
    """
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists (overwrite=True replaces it)")
        shutil.rmtree(out)
    rng = np.random.default_rng(seed)
    tiles = photo_tiles()
    chosen = _spread(tiles, rng)[: size // FAMILY_SIZE]
    files: list[tuple[bytes, dict[str, str | None]]] = []
    for label, tile in chosen:
        files.append((_jpeg(tile, 92), _row(TRUTH_ORIGINAL, None, label, None)))
        files += [(edit(tile, family, rng), _row(TRUTH_NEAR, label, label, family)) for family in PHOTO_EDITS]
    for _ in range(size - len(files)):
        files.append((_jpeg(dead_leaves(rng), 90), _row(TRUTH_ORIGINAL, None, PAD_LABEL, None)))
    return _write(out, files, rng)


def photograph(label: str) -> str:
    """The photograph a tile came from: ``coins_q2`` -> ``coins``."""
    return label.rsplit("_q", 1)[0]


def leak_rounds(labels: list[str], rounds: int) -> list[list[str]]:
    """The tiles (labels) split into ``rounds`` groups of whole photographs, as even in tiles as they go: the
    photographs in a fixed shuffle, each to the group with fewest tiles so far."""
    by_photo: dict[str, list[str]] = {}
    for label in sorted(labels):
        by_photo.setdefault(photograph(label), []).append(label)
    names = sorted(by_photo)
    groups: list[list[str]] = [[] for _ in range(rounds)]
    for i in np.random.default_rng(0).permutation(len(names)):
        min(groups, key=len).extend(by_photo[names[int(i)]])
    return [sorted(g) for g in groups]


def make_leak_pool(
    pool: str | Path, out: str | Path, rounds: int = 4, round_index: int = 0, overwrite: bool = False
) -> Path:
    """From a pool :func:`make_photo_pool` wrote, a contamination test (``out/pool/``, ``out/protected/``,
    ``out/truth.parquet``): the originals of one of ``rounds`` groups of whole photographs (:func:`leak_rounds`;
    ``round_index`` picks it) become the protected set (an evaluation set) and leave the pool; each leaves exactly one
    edited copy in it (a ``leaked_heldout``), so that self-dedup has nothing to group and every leak reaches
    dedup_relative. The other families and the padding stay as they were.

    Protection is by photograph, not by tile: a photograph's other quadrants left in the pool as "clean" images
    would be the same scene as a protected image (at 1,000 images, 147 of 807 clean images were such quadrants or
    their copies, most of what a 1% budget allows). The edits go round :data:`PHOTO_EDITS` over the tiles of all
    rounds in turn, so the ``rounds`` pools together leak every tile once and every edit family about as often.
    Files are hard links where the filesystem allows."""
    if not 0 <= round_index < rounds:
        raise ValueError(f"round_index={round_index} is not in 0..{rounds - 1}")
    pool, out = Path(pool), Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists (overwrite=True replaces it)")
        shutil.rmtree(out)
    rows = pq.read_table(pool / "truth.parquet").to_pylist()
    tiles = {
        r[TRUTH_LABEL]: r[TRUTH_PATH] for r in rows if r[TRUTH_KIND] == TRUTH_ORIGINAL and r[TRUTH_LABEL] != PAD_LABEL
    }
    groups = leak_rounds(list(tiles), rounds)
    turn = {tiles[label]: i for i, label in enumerate(label for g in groups for label in g)}
    protected = {tiles[label] for label in groups[round_index]}
    kept = []
    for r in rows:
        if r[TRUTH_PATH] in protected:
            kept.append({**r, TRUTH_KIND: TRUTH_HELDOUT, TRUTH_PATH: "protected/" + r[TRUTH_PATH].split("/", 1)[1]})
        elif r[TRUTH_COPY_OF] in protected:
            if r[TRUTH_TRANSFORM] == PHOTO_EDITS[turn[r[TRUTH_COPY_OF]] % len(PHOTO_EDITS)]:
                kept.append({**r, TRUTH_KIND: TRUTH_LEAKED, TRUTH_COPY_OF: None})
        else:
            kept.append(r)
    for r in kept:
        source = pool / "pool" / r[TRUTH_PATH].split("/", 1)[1]
        target = out / r[TRUTH_PATH]
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    kept.sort(key=lambda r: str(r[TRUTH_PATH]))
    pq.write_table(pa.Table.from_pylist(kept, schema=TRUTH), out / "truth.parquet")
    return out


def _spread(tiles: list[tuple[str, Image.Image]], rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    """Tiles in random order, one quadrant of every photograph before a second of any: a small pool's originals
    come from different photographs (two quadrants of one photograph are distinct images, but hard ones)."""
    order = rng.permutation(len(tiles))
    seen: dict[str, int] = {}
    rank: list[tuple[int, int, int]] = []
    for i in order:
        photo = photograph(tiles[i][0])
        rank.append((seen.get(photo, 0), len(rank), int(i)))
        seen[photo] = seen.get(photo, 0) + 1
    return [tiles[i] for _, _, i in sorted(rank)]


def _write(out: Path, files: list[tuple[bytes, dict[str, str | None]]], rng: np.random.Generator) -> Path:
    """Files under shuffled names (file order says nothing about which image is the original)."""
    names = {}
    for slot, i in enumerate(rng.permutation(len(files))):
        names[int(i)] = f"pool/{slot // 1000:03d}/{slot:06d}.jpg"
    rows = []
    for i, (data, row) in enumerate(files):
        path = out / names[i]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append({**row, TRUTH_PATH: names[i]})
    original = {r[TRUTH_LABEL]: r[TRUTH_PATH] for r in rows if r[TRUTH_KIND] == TRUTH_ORIGINAL}
    for r in rows:
        if r[TRUTH_KIND] == TRUTH_NEAR:
            r[TRUTH_COPY_OF] = original[r[TRUTH_COPY_OF]]
    rows.sort(key=lambda r: str(r[TRUTH_PATH]))
    pq.write_table(pa.Table.from_pylist(rows, schema=TRUTH), out / "truth.parquet")
    return out


def _row(kind: str, copy_of: str | None, label: str, family: str | None) -> dict[str, str | None]:
    return {TRUTH_KIND: kind, TRUTH_COPY_OF: copy_of, TRUTH_LABEL: label, TRUTH_TRANSFORM: family}


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
