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
