"""What a decode task makes of an embed part: its images read, decoded and preprocessed for every model (and the
synthetic copies of a deterministic sample), or, with ``embed.decode`` on the device, plain JPEGs left as bytes.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.device_jpeg import plain_jpeg
from lvdkit.core.files import MAX_FILE_BYTES, read_bytes
from lvdkit.core.image import decode_rgb
from lvdkit.curation.augment import COPY_EDITS, edit_families, synthetic_copy

if TYPE_CHECKING:
    from lvdkit.embeddings.preprocess import Preprocess
    from lvdkit.embeddings.stage import EmbedConfig

PIXELS_PREFIX = "pixels_"  # decode output: uint8 [H, W, 3] per model key (models may want different sizes)
JPEG_COLUMN = "jpeg"  # decode output with embed.decode on the device: the bytes the model actor decodes


class EmbedInputError(RuntimeError):
    """An image that decoded at ingest cannot be decoded now (changed or removed since)."""


def calibration_rate(n_images: int, copies: int) -> float:
    """Synthetic copies per image: below 1 a sampled fraction gets one; small pools get several (up to one per edit
    family), so that even a 200-image pool calibrates on ``copies`` copies covering every family."""
    return min(float(len(COPY_EDITS)), copies / n_images) if n_images else 0.0


def copies_of(key: str, rate: float, seed: int) -> int:
    """How many synthetic copies image ``key`` (its content hash) gets: ``floor(rate)``, plus one for a deterministic
    fraction ``rate - floor(rate)`` of images (the same images on every run, on every worker, wherever the pool
    lies)."""
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    whole = int(rate)
    return whole + int(int.from_bytes(h, "little") < (rate - whole) * 2**64)


def decode_batch(
    image_ids: list[str],
    uris: list[str],
    preprocess: dict[str, Preprocess],
    rate: float,
    cfg: EmbedConfig,
    keys: list[str] | None = None,
    on_device: bool = False,
) -> dict[str, np.ndarray]:
    """Decode and preprocess images (and the synthetic copies of sampled ones) for every model.

    ``keys``: what the calibration sample and each copy's edit are drawn from (content hashes, so they do not depend
    on where the files are; default: the image ids). ``on_device``: plain JPEGs without synthetic copies are left
    as bytes for the model's device to decode (:mod:`lvdkit.embeddings.device_decode`).

    Returns columns ``image_id`` [B'], ``edit`` [B'] ('' for the image itself) and ``pixels_<key>`` [B', H, W, 3]
    uint8, where B' = B + the number of sampled images. With ``on_device`` also ``jpeg`` [B'] and ``uri`` [B']: a
    row's JPEG bytes, or None when Pillow decoded it; ``pixels_<key>`` then holds the Pillow rows only, in order.
    """
    rows: list[tuple[str, str, bytes | None, str]] = []  # image_id, edit, JPEG bytes left to the device, uri
    pixels: dict[str, list[np.ndarray]] = {k: [] for k in preprocess}
    for image_id, uri, key in zip(image_ids, uris, keys if keys is not None else image_ids, strict=True):
        data = _read(uri)
        n_copies = copies_of(key, rate, cfg.seed)
        if on_device and n_copies == 0 and not cfg.copy_views and plain_jpeg(data, cfg.max_pixels):
            rows.append((image_id, "", data, uri))
            continue
        image = decode_input(data, uri, cfg.max_pixels)
        variants = [(image, "")]
        seed = _seed_of(key, cfg.seed)
        for i, family in enumerate(edit_families(seed, n_copies)):
            variants.append(synthetic_copy(image, seed=seed + i, edit=family))
        variants += [(rotated_view(image, angle), schema.view_edit(angle)) for angle in cfg.copy_views]
        for img, edit in variants:
            rows.append((image_id, edit, None, uri))
            for key, pre in preprocess.items():
                pixels[key].append(pre.prepare(img))
    ids, edits, jpegs, names = (list(column) for column in zip(*rows, strict=True)) if rows else ([], [], [], [])
    out: dict[str, np.ndarray] = {schema.IMAGE_ID: np.asarray(ids, dtype=object), schema.EDIT: np.asarray(edits)}
    if on_device:
        out[JPEG_COLUMN], out[schema.URI] = _objects(jpegs), _objects(names)
    for key, arrays in pixels.items():
        empty = np.empty((0, *preprocess[key].size, 3), np.uint8)
        out[PIXELS_PREFIX + key] = np.stack(arrays) if arrays else empty
    return out


def rotated_view(image: Image.Image, angle: float) -> Image.Image:
    """``image`` turned by ``angle`` degrees about its centre, same size, corners black: as Pillow rotates a copy."""
    return image.convert("RGB").rotate(angle, resample=Image.Resampling.BILINEAR)


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)  # np.asarray would make a 2-d array of equal-length bytes
    out[:] = values
    return out


def _read(uri: str) -> bytes:
    try:
        return read_bytes(uri, MAX_FILE_BYTES)
    except Exception as exc:
        raise _input_error(uri, exc) from None


def decode_input(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    """Pillow's decode of an image ingest accepted; :class:`EmbedInputError` when it no longer decodes."""
    try:
        return decode_rgb(data, max_pixels)
    except Exception as exc:
        raise _input_error(uri, exc) from None


def _input_error(uri: str, exc: Exception) -> EmbedInputError:
    return EmbedInputError(  # ingest decoded this file: it changed or vanished since
        f"embed: cannot decode {uri} ({type(exc).__name__}: {exc}). It decoded at ingest: the file changed or "
        "vanished since. Rerun `lvdkit curate`: ingest notices changed files (size, mtime) and redoes the "
        "stages after it"
    )


def _seed_of(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"copy:{seed}:{key}".encode(), digest_size=8).digest(), "little")


def slices(decoded: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    """The batches :meth:`EmbedWork._batches` would decode: ``size`` images each, with their synthetic copies (the
    same batches give the same embeddings, bit for bit, whichever process decoded them)."""
    originals = np.flatnonzero(decoded[schema.EDIT] == "")
    n = len(decoded[schema.IMAGE_ID])
    bounds = [*originals[::size].tolist(), n]
    jpegs = decoded.get(JPEG_COLUMN)
    # pixels hold only the rows Pillow decoded: their position is the count of such rows before
    pixel_at = np.arange(n + 1) if jpegs is None else np.concatenate([[0], np.cumsum([j is None for j in jpegs])])
    for start, end in itertools.pairwise(bounds):
        rows, pixel_rows = slice(start, end), slice(int(pixel_at[start]), int(pixel_at[end]))
        yield {name: col[pixel_rows if name.startswith(PIXELS_PREFIX) else rows] for name, col in decoded.items()}
