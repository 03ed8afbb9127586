"""Decoding image bytes safely and uniformly: one place decides what counts as a readable image.

Pillow's decompression-bomb check is made fatal (a warning by default) and truncated files are errors (never padded
with grey), so a file is either fully decoded or rejected with a reason from :mod:`lvdkit.schema`.

There is no per-image time limit. Decoding time is bounded by what is checked before any pixel is decoded (the
declared pixel count against ``max_pixels``; ingest's ``max_file_mb``), which covers decompression bombs. What is not
bounded: counting the frames of a GIF (Pillow walks the whole file) and a legal but slow file within those limits
(e.g. a progressive JPEG with thousands of scans) can take seconds. A hard timeout would need a watchdog process per
decode; Ray retries and per-shard parts keep such a file from losing work, but it does hold up its shard.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lvdkit import schema

ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(Exception):
    """Raised when bytes are not a usable image; ``reason`` is one of :data:`lvdkit.schema.REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    """A fully decoded first frame, upright (EXIF orientation applied), with what the file said about itself."""

    image: Image.Image
    format: str | None
    mode: str  # mode as stored, before any conversion
    n_frames: int


def decode(data: bytes, max_pixels: int) -> Decoded:
    """Decode every pixel of the first frame of ``data``; raise :class:`DecodeError` with a reason otherwise."""
    if not data:
        raise DecodeError(schema.REASON_EMPTY, "file has 0 bytes")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow reads this global when it opens a file; restored below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt, mode, n_frames = im.format, im.mode, int(getattr(im, "n_frames", 1))
            if im.width * im.height > max_pixels:
                raise Image.DecompressionBombError(f"{im.width}x{im.height} exceeds max_pixels={max_pixels}")
            im.load()
            upright = ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(schema.REASON_TOO_MANY_PIXELS, str(exc)) from None
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except _ERRORS as exc:
        raise _error(data, exc) from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return Decoded(image=upright if upright is not None else im, format=fmt, mode=mode, n_frames=n_frames)


_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)
SIGNATURE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "AVIF")  # unambiguous signatures: broken, not "not an image"


def _error(data: bytes, exc: BaseException, prefix: str = "") -> DecodeError:
    """``truncated`` when the decoder says so or a RIFF (WebP) file is shorter than its header declares."""
    short = data[:4] == b"RIFF" and len(data) >= 8 and len(data) < 8 + int.from_bytes(data[4:8], "little")
    reason = schema.REASON_TRUNCATED if short or "truncated" in str(exc).lower() else schema.REASON_DECODE
    return DecodeError(reason, _stable(f"{prefix}{type(exc).__name__}: {exc}"))


def _unidentified(data: bytes) -> DecodeError:
    """Pillow's ``open`` hides why each format refused the bytes. When they start like a common image format (a PNG
    whose header CRC is wrong, a file cut inside its header), ask that format's reader, so the file is reported as a
    broken image (``decode_error``/``truncated``) rather than as ``not_an_image``."""
    Image.init()
    for fmt in SIGNATURE_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or accept is None or not accept(data[:16]):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                factory(io.BytesIO(data), "").close()
        except Exception as exc:  # only explaining a failure already found: any error is the explanation
            return _error(data, exc, f"{fmt} signature, but the header cannot be read: ")
    return DecodeError(schema.REASON_NOT_IMAGE, "Pillow recognises no image format in these bytes")


def _stable(message: str) -> str:
    """Drop object addresses from an error message so that reruns write identical rows."""
    return re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", message)


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: alpha composited on ``background``, 16/32-bit and float rescaled, not clipped."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if im.mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        scaled = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")
