"""Decoding untrusted images: a pixel limit is always applied, and each decode runs under a time limit
(``ingest.decode_timeout_s``: interrupted where a process timer can, rejected afterwards where it cannot)."""

from __future__ import annotations

import io
import signal
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.image import DecodeError, decode
from lvdkit.curation.ingest import IngestConfig, inspect_file


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _claiming(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose header (with a valid CRC) claims ``width`` x ``height`` pixels."""
    ihdr = bytearray(data[12:29])  # type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    return data[:8] + data[8:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + data[33:]


def _many_frames(n: int = 2000) -> bytes:
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").convert("P") for _ in range(8)]
    frames = frames * (n // 8)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=10)
    return buf.getvalue()


def test_the_pixel_limit_holds_even_when_pillow_s_own_check_was_switched_off() -> None:
    bomb = _claiming(_png(8, 8), 60_000, 60_000)
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # what some library or notebook may have done process-wide
    try:
        with pytest.raises(DecodeError) as refused:
            decode(bomb, IngestConfig().max_pixels)
        assert refused.value.reason == schema.REASON_TOO_MANY_PIXELS
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_a_decode_slower_than_the_limit_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "slow.png"
    path.write_bytes(_png(64, 64))
    row = inspect_file(str(path), IngestConfig(decode_timeout_s=1e-9))
    assert (row["status"], row["error"]) == (schema.STATUS_QUARANTINED, schema.REASON_DECODE_TIMEOUT)
    assert "decode_timeout_s=1e-09" in str(row["error_detail"])
    assert inspect_file(str(path), IngestConfig(phash=False))["status"] == schema.STATUS_OK  # the default: 30 s
    assert inspect_file(str(path), IngestConfig(phash=False, decode_timeout_s=None))["status"] == "ok"  # no limit


@pytest.fixture()
def alarm_free() -> Iterator[None]:
    """Lend the process timer as lvdkit's processes have it (pytest-timeout holds it during tests)."""
    handler = signal.signal(signal.SIGALRM, signal.SIG_DFL)
    pending, _ = signal.setitimer(signal.ITIMER_REAL, 0)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.signal(signal.SIGALRM, handler)
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - start), 0.001))


@pytest.mark.usefixtures("alarm_free")
def test_the_timer_interrupts_a_slow_decode_and_is_then_gone() -> None:
    data = _many_frames()
    pixel_limit = Image.MAX_IMAGE_PIXELS
    start = time.monotonic()
    decode(data, IngestConfig().max_pixels)  # counting the frames walks the whole file
    full = time.monotonic() - start
    limit = full / 20
    start = time.monotonic()
    with pytest.raises(DecodeError) as stopped:
        decode(data, IngestConfig().max_pixels, timeout_s=limit)
    took = time.monotonic() - start
    assert stopped.value.reason == schema.REASON_DECODE_TIMEOUT
    assert "stopped after" in stopped.value.detail  # interrupted, not just measured
    assert took < full / 2, (took, full)
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL  # the handler and timer are removed again
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert pixel_limit == Image.MAX_IMAGE_PIXELS  # Pillow's global is restored too


def test_off_the_main_thread_the_limit_is_checked_after_decoding() -> None:
    data = _png(64, 64)
    errors: list[DecodeError] = []

    def work() -> None:
        try:
            decode(data, IngestConfig().max_pixels, timeout_s=1e-9)
        except DecodeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert [e.reason for e in errors] == [schema.REASON_DECODE_TIMEOUT]
    assert "took" in errors[0].detail


@pytest.mark.usefixtures("alarm_free")
def test_an_alarm_handler_someone_else_installed_is_left_alone() -> None:
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        with pytest.raises(DecodeError):
            decode(_png(64, 64), IngestConfig().max_pixels, timeout_s=1e-9)
        assert signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None)
        assert not fired
    finally:
        signal.signal(signal.SIGALRM, previous)


def _zeros_png(side: int) -> bytes:
    """A real, fully valid PNG of ``side`` x ``side`` black grey pixels, built without holding them in Pillow."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    raw = zlib.compress(b"\x00" * ((side + 1) * side), 9)  # filter byte 0 then `side` zero pixels, per row
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_a_huge_image_that_compresses_to_nothing_is_refused_before_decoding(tmp_path: Path) -> None:
    data = _zeros_png(10_000)  # exactly ingest's default max_pixels, about 100 KB: once a gigabyte per decode
    assert len(data) < 200_000
    (tmp_path / "zeros.png").write_bytes(data)
    start = time.monotonic()
    row = inspect_file(str(tmp_path / "zeros.png"), IngestConfig())
    assert time.monotonic() - start < 2.0, "the pixels were decoded"
    assert row[schema.ERROR] == schema.REASON_TOO_MANY_PIXELS and "max_expansion=200" in str(row[schema.ERROR_DETAIL])
    # The guard is a setting: switched off, the same file is within max_pixels and decodes.
    assert decode(data, 100_000_000, max_expansion=0).image.size == (10_000, 10_000)


def test_the_expansion_guard_spares_large_images_with_real_content() -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (4000, 4000), dtype=np.uint8))  # 16 MP that compresses ~1:1
    buf = io.BytesIO()
    noisy.save(buf, "PNG")
    assert decode(buf.getvalue(), 100_000_000, max_expansion=200).image.size == (4000, 4000)
    small = _zeros_png(1000)  # a flat 1 MP image: below the size the guard looks at, it costs nothing to decode
    assert decode(small, 100_000_000, max_expansion=200).image.size == (1000, 1000)
