"""Decoding image bytes safely and uniformly: one place decides what counts as a readable image.

Pillow's decompression-bomb check is made fatal (a warning by default) and truncated files are errors (never padded
with grey), so a file is either fully decoded or rejected with a reason from :mod:`lvdkit.core.schema`.

Time per image: the pixel limit (the declared pixel count against ``max_pixels``, checked before any pixel is
decoded) and ingest's ``max_file_mb`` stop decompression bombs. Within those limits a legal but slow file (a GIF with
thousands of frames, which Pillow walks to count them; a progressive JPEG with thousands of scans) can still take
seconds, so ``decode(..., timeout_s=T)`` (ingest's ``decode_timeout_s``) also limits time:

- on the main thread of a process with no other ``SIGALRM`` user (Ray tasks, the CLI) a one-shot timer interrupts
  the decode at the next Python-level step after ``T`` seconds (Pillow feeds its decoders in chunks and walks frames
  in Python), so most slow files are cut off close to ``T``;
- a single C call (one chunk of a decoder, one resize) cannot be interrupted: it finishes first. Whatever the timer
  could not stop, an elapsed-time check after decoding still quarantines (``decode_timeout``), so no decode slower
  than ``T`` is accepted, but one C call can overrun ``T``;
- elsewhere (another thread; ``SIGALRM`` or the real-time timer already in use, e.g. by pytest-timeout) only the
  elapsed-time check applies.

The limit makes the outcome depend on the machine's speed and load for files near ``T``; the default (30 s) is far
above any ordinary image (milliseconds; about a second for 100 megapixels). A truly hard bound would need a watchdog
process per decode.
"""

from __future__ import annotations

import io
import math
import re
import signal
import struct
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lvdkit.core import schema
from lvdkit.core.files import FileTooLarge, read_bytes

ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(Exception):
    """Raised when bytes are not a usable image; ``reason`` is one of :data:`lvdkit.core.schema.REASONS`."""

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


# Formats Pillow may parse. Anything else (EPS, which Pillow hands to Ghostscript; PSD, ICO, PPM, ...) is refused as
# format_not_allowed before any of its parsers runs: fewer parsers face untrusted bytes. (Camera JPEGs that Pillow
# reports as MPO are read by its JPEG plugin.)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")


# Deflate cannot expand more than about 1032:1, so a PNG of 10000x10000 zeros is about 97 KB: within max_pixels, yet
# a gigabyte to decode. Images this large whose pixels would take more than max_expansion times their file size are
# refused from the header (nothing decoded). Below this size a flat image costs little and is left to the PHash guard.
EXPANSION_CHECK_PIXELS = 16_000_000


def decode(
    data: bytes,
    max_pixels: int,
    timeout_s: float | None = None,
    formats: Sequence[str] = ALLOWED_FORMATS,
    max_expansion: float = 0.0,
    min_side: int | None = None,
) -> Decoded:
    """Decode every pixel of the first frame of ``data``; raise :class:`DecodeError` with a reason otherwise.

    ``timeout_s``: a decode that takes longer is abandoned or rejected (``decode_timeout``); see the module notes.
    ``formats``: the Pillow formats that may be parsed (``ingest.formats``).
    ``max_expansion``: for images of at least :data:`EXPANSION_CHECK_PIXELS`, the most decoded bytes per file byte
    (``ingest.max_expansion``; 0 = no check); more is ``too_many_pixels``.
    ``min_side``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's ``draft``) as long
    as its shorter side stays at least this many pixels: for consumers that shrink the image anyway (training views).
    """
    if not data:
        raise DecodeError(schema.REASON_EMPTY, "file has 0 bytes")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow reads this global when it opens a file; restored below
    start = time.monotonic()
    try:
        with warnings.catch_warnings(), _alarm(timeout_s):  # the timer stops before the filters are restored
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=_registered(formats))
            fmt, mode, n_frames = im.format, im.mode, int(getattr(im, "n_frames", 1))
            if im.width * im.height > max_pixels:
                raise Image.DecompressionBombError(f"{im.width}x{im.height} exceeds max_pixels={max_pixels}")
            _check_expansion(im, len(data), max_expansion)
            if min_side is not None and im.format == "JPEG":
                _draft(im, min_side)
            im.load()
            upright = ImageOps.exif_transpose(im)
    except _Timeout:
        raise _timeout(time.monotonic() - start, timeout_s, interrupted=True) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(schema.REASON_TOO_MANY_PIXELS, str(exc)) from None
    except UnidentifiedImageError:
        raise _unidentified(data, formats) from None
    except _ERRORS as exc:
        raise _error(data, exc) from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    elapsed = time.monotonic() - start
    if timeout_s is not None and elapsed > timeout_s:
        raise _timeout(elapsed, timeout_s, interrupted=False)
    return Decoded(image=upright if upright is not None else im, format=fmt, mode=mode, n_frames=n_frames)


def _draft(im: Image.Image, min_side: int) -> None:
    """Ask libjpeg for the smallest DCT scale whose shorter side is still at least ``min_side``."""
    factor = min_side / max(min(im.size), 1)
    if factor < 0.5:  # draft keeps both sides at least the requested ones
        im.draft(im.mode, (math.ceil(im.width * factor), math.ceil(im.height * factor)))


def _check_expansion(im: Image.Image, n_bytes: int, max_expansion: float) -> None:
    pixels = im.width * im.height
    if max_expansion <= 0 or pixels < EXPANSION_CHECK_PIXELS:
        return
    ratio = pixels * len(im.getbands()) / max(n_bytes, 1)
    if ratio > max_expansion:
        detail = f"{im.width}x{im.height} from {n_bytes} bytes expands {ratio:.0f}x > max_expansion={max_expansion:g}"
        raise Image.DecompressionBombError(detail)


class _Timeout(BaseException):  # not an Exception: no ``except Exception`` inside Pillow may swallow it
    pass


def _timeout(elapsed: float, limit: float | None, interrupted: bool) -> DecodeError:
    how = "stopped after" if interrupted else "took"
    return DecodeError(schema.REASON_DECODE_TIMEOUT, f"decoding {how} {elapsed:.3g}s, limit decode_timeout_s={limit}")


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise _Timeout()


@contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Raise :class:`_Timeout` inside the block after ``seconds``, where a process timer can (see module notes)."""
    usable = (
        seconds is not None
        and seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )
    if not usable:
        yield
        return
    assert seconds is not None
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)  # first: no alarm may fire once the block is left
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)
SIGNATURE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "AVIF")  # unambiguous signatures: broken, not "not an image"


def _error(data: bytes, exc: BaseException, prefix: str = "") -> DecodeError:
    """``truncated`` when the decoder says so or a RIFF (WebP) file is shorter than its header declares."""
    short = data[:4] == b"RIFF" and len(data) >= 8 and len(data) < 8 + int.from_bytes(data[4:8], "little")
    reason = schema.REASON_TRUNCATED if short or "truncated" in str(exc).lower() else schema.REASON_DECODE
    return DecodeError(reason, _stable(f"{prefix}{type(exc).__name__}: {exc}"))


def _unidentified(data: bytes, formats: Sequence[str] = ALLOWED_FORMATS) -> DecodeError:
    """Pillow's ``open`` hides why each format refused the bytes. When they start like a common image format (a PNG
    whose header CRC is wrong, a file cut inside its header), ask that format's reader, so the file is reported as a
    broken image (``decode_error``/``truncated``) rather than as ``not_an_image``."""
    Image.init()
    allowed = {f.upper() for f in formats}
    for fmt in (f for f in SIGNATURE_FORMATS if f in allowed):
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or accept is None or not accept(data[:16]):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                factory(io.BytesIO(data), "").close()
        except Exception as exc:  # only explaining a failure already found: any error is the explanation
            return _error(data, exc, f"{fmt} signature, but the header cannot be read: ")
    other = [f for f, (_, accept) in Image.OPEN.items() if f not in allowed and accept and _accepts(accept, data)]
    if other:  # known by its signature alone: none of its parsing code ran
        return DecodeError(schema.REASON_FORMAT, f"{other[0]} is not in ingest.formats {sorted(allowed)}")
    return DecodeError(schema.REASON_NOT_IMAGE, "Pillow recognises no image format in these bytes")


def _registered(formats: Sequence[str]) -> list[str]:
    """``formats`` that this Pillow can open (an unknown name in ingest.formats is simply never matched)."""
    Image.init()
    return [f.upper() for f in formats if f.upper() in Image.OPEN]


def _accepts(accept: Any, data: bytes) -> bool:
    try:
        return bool(accept(data[:16]))
    except Exception:  # an accept() that chokes on the prefix does not claim it
        return False


def _stable(message: str) -> str:
    """Drop object addresses from an error message so that reruns write identical rows."""
    return re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", message)


DEFAULT_MAX_PIXELS = 100_000_000  # ingest's default max_pixels: the decompression-bomb guard


def decode_rgb(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, timeout_s: float | None = None, min_side: int | None = None
) -> Image.Image:
    """Bytes -> the upright first frame as 8-bit RGB: the one path from file bytes to pixels in lvdkit.

    Ingest, embed, the curated set, pretraining, evaluation and the demo all call this, so one file gives the same
    pixels everywhere. Alpha policy: transparent pixels are composited onto white (``RGBA``, ``LA``, ``PA`` and
    palette images with a transparency entry alike), never dropped to whatever colour the file stored under them.
    Raises :class:`DecodeError` with a reason from :data:`lvdkit.core.schema.REASONS` for unusable bytes.
    ``min_side``: see :func:`decode` (JPEGs decoded at reduced scale, shorter side kept at least this long).
    """
    return to_rgb(decode(data, max_pixels, timeout_s, min_side=min_side).image)


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


DEFAULT_MAX_FILE_BYTES = 256 * 2**20  # ingest's default max_file_mb: larger files are refused before being read
DEFAULT_DECODE_TIMEOUT_S = 30.0  # ingest's default decode_timeout_s


def read_error(exc: OSError) -> DecodeError:
    """A failure to read a file (:func:`lvdkit.core.files.read_bytes`) as ingest records it: ``file_too_large``,
    ``not_a_regular_file`` or ``unreadable``."""
    if isinstance(exc, FileTooLarge):
        return DecodeError(schema.REASON_FILE_TOO_LARGE, str(exc))
    if isinstance(exc, IsADirectoryError):
        return DecodeError(schema.REASON_NOT_FILE, str(exc))
    return DecodeError(schema.REASON_UNREADABLE, f"{type(exc).__name__}: {exc}")


def read_rgb(
    uri: str,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S,
) -> Image.Image:
    """A file (local path or URI) -> RGB by ingest's rules and default limits: read with a size limit, then
    :func:`decode_rgb`. Every failure, reading or decoding, raises :class:`DecodeError` with its reason."""
    try:
        data = read_bytes(uri, max_bytes)
    except OSError as exc:
        raise read_error(exc) from None
    return decode_rgb(data, max_pixels, timeout_s)
