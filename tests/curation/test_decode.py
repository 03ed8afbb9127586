"""Decoding real image files of every common mode and every kind of breakage, one row per file from inspect_file."""

from __future__ import annotations

import hashlib
import io
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from lvdkit.core import schema
from lvdkit.core.image import DecodeError, decode, to_rgb
from lvdkit.curation.ingest import IngestConfig, inspect_file

CFG = IngestConfig()


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB picture with structure at several scales (so its PHash is not degenerate)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 127 + 120 * np.sin(x / max(width, 1) * 2 * np.pi * (1 + seed % 3))
    g = 255 * y / max(height - 1, 1)
    b = 255 * ((x // 8 + y // 8) % 2)
    arr = np.stack([r, g, b], axis=-1) + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def save(image: Image.Image, path: Path, fmt: str, **options: object) -> Path:
    image.save(path, fmt, **options)
    return path


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG (valid CRCs) whose IHDR claims width x height 8-bit gray pixels."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def assert_ok(row: dict[str, object], path: Path, fmt: str, mode: str, size: tuple[int, int]) -> None:
    data = path.read_bytes()
    assert row["status"] == schema.STATUS_OK, row.get("error_detail")
    assert row.get("error") is None
    assert row["format"] == fmt
    assert row["mode"] == mode
    assert (row["width"], row["height"]) == size
    assert row["size_bytes"] == len(data)
    assert row["content_hash"] == hashlib.blake2b(data, digest_size=16).hexdigest()
    phash = row["phash"]
    assert isinstance(phash, int) and 0 <= phash < 2**64


def assert_quarantined(row: dict[str, object], reason: str) -> None:
    assert reason in schema.REASONS
    assert row["status"] == schema.STATUS_QUARANTINED
    assert row["error"] == reason, row.get("error_detail")
    assert row.get("error_detail")
    assert row.get("phash") is None


# --- usable images ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "ext"), [("JPEG", ".jpg"), ("PNG", ".png")])
def test_plain_rgb_image_is_ok(tmp_path: Path, fmt: str, ext: str) -> None:
    path = save(picture(64, 40), tmp_path / f"a{ext}", fmt)
    row = inspect_file(str(path), CFG)
    assert_ok(row, path, fmt, "RGB", (64, 40))
    assert row["n_frames"] == 1
    assert row[schema.URI] == str(path)
    assert row[schema.IMAGE_ID] == hashlib.blake2b(str(path).encode(), digest_size=8).hexdigest()


def test_different_pictures_get_different_phash_and_copies_the_same(tmp_path: Path) -> None:
    a = save(picture(64, 64, seed=1), tmp_path / "a.png", "PNG")
    b = save(picture(64, 64, seed=2).transpose(Image.Transpose.ROTATE_90), tmp_path / "b.png", "PNG")
    copy = tmp_path / "copy.png"
    copy.write_bytes(a.read_bytes())
    ra, rb, rc = (inspect_file(str(p), CFG) for p in (a, b, copy))
    assert ra["phash"] == rc["phash"] and ra["content_hash"] == rc["content_hash"]
    assert ra[schema.IMAGE_ID] != rc[schema.IMAGE_ID]
    assert ra["phash"] != rb["phash"]


def test_cmyk_jpeg_is_ok_and_converts_to_its_colours(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (48, 32), (200, 30, 40))
    rgb.paste((20, 40, 220), (24, 0, 48, 32))
    path = save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", "JPEG", quality=95)
    assert_ok(inspect_file(str(path), CFG), path, "JPEG", "CMYK", (48, 32))
    out = np.asarray(to_rgb(decode(path.read_bytes(), CFG.max_pixels).image), dtype=np.int16)
    assert out.shape == (32, 48, 3)
    assert np.abs(out[:, 4:20] - np.array([200, 30, 40])).max() < 20
    assert np.abs(out[:, 28:44] - np.array([20, 40, 220])).max() < 20


def test_palette_png_with_transparency_composites_on_white(tmp_path: Path) -> None:
    indices = np.zeros((20, 30), dtype=np.uint8)
    indices[:, 10:20] = 1
    indices[:, 20:] = 2
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0, 0, 0] * 253)
    path = save(image, tmp_path / "pal.png", "PNG", transparency=0)
    assert_ok(inspect_file(str(path), CFG), path, "PNG", "P", (30, 20))
    out = np.asarray(to_rgb(decode(path.read_bytes(), CFG.max_pixels).image))
    assert (out[:, :10] == [255, 255, 255]).all()  # index 0 is transparent: background, not palette black
    assert (out[:, 10:20] == [255, 0, 0]).all()
    assert (out[:, 20:] == [0, 0, 255]).all()


def test_16_bit_png_is_rescaled_not_clipped(tmp_path: Path) -> None:
    levels = np.arange(256, dtype=np.uint16) * 257  # 0 .. 65535 in 256 equal steps
    arr = np.tile(levels, (20, 1))
    path = save(Image.fromarray(arr), tmp_path / "g16.png", "PNG")
    dec = decode(path.read_bytes(), CFG.max_pixels)
    assert dec.mode.startswith("I;16")
    assert np.array_equal(np.asarray(dec.image), arr)  # the file really holds 16-bit values
    out = np.asarray(to_rgb(dec.image))
    assert out.dtype == np.uint8 and out.shape == (20, 256, 3)
    expected = np.arange(256, dtype=np.uint8)  # v * 257 / 65535 * 255 == v
    for channel in range(3):
        assert np.array_equal(out[0, :, channel], expected)
    row = inspect_file(str(path), CFG)
    assert_ok(row, path, "PNG", dec.mode, (256, 20))


def test_float_image_is_rescaled_to_full_range() -> None:
    arr = np.linspace(-1.0, 3.0, 5, dtype=np.float32).reshape(1, 5)  # -1, 0, 1, 2, 3
    out = np.asarray(to_rgb(Image.fromarray(arr, mode="F")))[0, :, 0]
    assert out.tolist() == [0, 64, 128, 191, 255]  # (v + 1) / 4 * 255, rounded


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_images_are_composited_on_white(tmp_path: Path, mode: str) -> None:
    colour = (90,) if mode == "LA" else (90, 150, 30)
    base = Image.new(mode, (30, 20), (*colour, 255))
    base.paste((*colour, 0), (10, 0, 20, 20))  # fully transparent middle band
    base.paste((*colour, 128), (20, 0, 30, 20))  # half transparent right band
    path = save(base, tmp_path / f"{mode}.png", "PNG")
    assert_ok(inspect_file(str(path), CFG), path, "PNG", mode, (30, 20))
    out = np.asarray(to_rgb(decode(path.read_bytes(), CFG.max_pixels).image), dtype=np.int16)
    rgb = np.array(colour * 3 if mode == "LA" else colour)
    assert (out[:, :10] == rgb).all()
    assert (out[:, 10:20] == 255).all()
    blend = rgb * 128 / 255 + 255 * 127 / 255
    assert np.abs(out[:, 20:] - blend).max() <= 1


def test_grayscale_jpeg_is_ok_and_becomes_gray_rgb(tmp_path: Path) -> None:
    path = save(picture(40, 30).convert("L"), tmp_path / "gray.jpg", "JPEG")
    assert_ok(inspect_file(str(path), CFG), path, "JPEG", "L", (40, 30))
    out = np.asarray(to_rgb(decode(path.read_bytes(), CFG.max_pixels).image))
    assert out.shape == (30, 40, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_animated_gif_is_ok_and_uses_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 24), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    for frame in frames:
        frame.paste((255, 255, 255), (0, 0, 16, 12))  # some structure: a solid frame gets no PHash
    path = save(frames[0], tmp_path / "anim.gif", "GIF", save_all=True, append_images=frames[1:], duration=100)
    row = inspect_file(str(path), CFG)
    assert_ok(row, path, "GIF", "P", (32, 24))
    assert row["n_frames"] == 3
    out = np.asarray(to_rgb(decode(path.read_bytes(), CFG.max_pixels).image))
    assert (out[12:] == [255, 0, 0]).all() and (out[:12, :16] == 255).all()


def test_exif_rotated_jpeg_reports_upright_size(tmp_path: Path) -> None:
    stored = Image.new("RGB", (24, 48), (255, 255, 255))  # stored 24 wide, 48 tall
    stored.paste((255, 0, 0), (0, 0, 12, 12))  # red block at the stored top-left
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # display turned 90 degrees clockwise
    path = save(stored, tmp_path / "rot.jpg", "JPEG", quality=95, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (24, 48)
    row = inspect_file(str(path), CFG)
    assert_ok(row, path, "JPEG", "RGB", (48, 24))  # width and height swapped vs stored
    upright = np.asarray(decode(path.read_bytes(), CFG.max_pixels).image, dtype=np.int16)
    assert upright.shape == (24, 48, 3)
    # turning clockwise moves the stored top-left corner to the top-right
    assert np.abs(upright[2:10, -10:-2] - [255, 0, 0]).max() < 40
    assert np.abs(upright[2:10, 2:10] - [255, 255, 255]).max() < 40


# --- broken files ----------------------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    row = inspect_file(str(path), CFG)
    assert_quarantined(row, schema.REASON_EMPTY)
    assert row["size_bytes"] == 0


@pytest.mark.parametrize(("fmt", "fraction"), [("JPEG", 0.5), ("JPEG", 0.9), ("PNG", 0.5)])
def test_truncated_file(tmp_path: Path, fmt: str, fraction: float) -> None:
    data = encoded(picture(64, 64), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * fraction)])
    row = inspect_file(str(path), CFG)
    assert_quarantined(row, schema.REASON_TRUNCATED)
    assert row["size_bytes"] == int(len(data) * fraction)


def test_text_named_jpg_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is plain text, not a JPEG\n" * 5)
    assert_quarantined(inspect_file(str(path), CFG), schema.REASON_NOT_IMAGE)


def test_png_with_corrupt_pixel_data_is_a_decode_error(tmp_path: Path) -> None:
    data = bytearray(encoded(picture(64, 64), "PNG"))
    at = data.index(b"IDAT") + 24
    data[at : at + 16] = b"\xff" * 16  # pixel data changed, CRC now wrong: the header still reads fine
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    assert_quarantined(inspect_file(str(path), CFG), schema.REASON_DECODE)


def test_decompression_bomb_header_is_refused_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(60_000, 60_000))
    assert path.stat().st_size < 1000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = inspect_file(str(path), CFG)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert_quarantined(row, schema.REASON_TOO_MANY_PIXELS)
    assert grown_kib < 200 * 1024  # 60000^2 gray pixels would be 3.4 GiB
    with pytest.raises(DecodeError) as info:
        decode(path.read_bytes(), CFG.max_pixels)
    assert info.value.reason == schema.REASON_TOO_MANY_PIXELS


@pytest.mark.parametrize(
    ("size", "ok"),
    [((100, 100), True), ((101, 100), False), ((150, 150), False), ((400, 400), False)],
)
def test_max_pixels_boundary(tmp_path: Path, size: tuple[int, int], ok: bool) -> None:
    """max_pixels=10000: exactly at the limit decodes; just over (Pillow's warning zone) and far over do not."""
    path = save(picture(*size), tmp_path / "p.png", "PNG")
    row = inspect_file(str(path), IngestConfig(max_pixels=10_000))
    if ok:
        assert_ok(row, path, "PNG", "RGB", size)
    else:
        assert_quarantined(row, schema.REASON_TOO_MANY_PIXELS)


def test_tiny_image_is_too_small(tmp_path: Path) -> None:
    path = save(picture(4, 4), tmp_path / "tiny.png", "PNG")
    row = inspect_file(str(path), CFG)
    assert CFG.min_side > 4
    assert_quarantined(row, schema.REASON_TOO_SMALL)
    assert (row["width"], row["height"]) == (4, 4)  # what was read is still recorded
    assert_ok(inspect_file(str(path), IngestConfig(min_side=4)), path, "PNG", "RGB", (4, 4))


@pytest.mark.parametrize(("size", "ok"), [((16, 16), True), ((16, 15), False), ((300, 15), False)])
def test_min_side_uses_the_shorter_side(tmp_path: Path, size: tuple[int, int], ok: bool) -> None:
    path = save(picture(*size), tmp_path / "s.png", "PNG")
    row = inspect_file(str(path), IngestConfig(min_side=16))
    if ok:
        assert_ok(row, path, "PNG", "RGB", size)
    else:
        assert_quarantined(row, schema.REASON_TOO_SMALL)


def test_decode_of_empty_bytes_raises_with_reason() -> None:
    with pytest.raises(DecodeError) as info:
        decode(b"", CFG.max_pixels)
    assert info.value.reason == schema.REASON_EMPTY
    assert str(info.value).startswith(schema.REASON_EMPTY)


def test_quarantine_rows_are_identical_on_rerun(tmp_path: Path) -> None:
    """Reruns must write identical rows: no object addresses or other per-run text in error_detail."""
    jpeg = encoded(picture(64, 64), "JPEG")
    files = {
        "text.jpg": b"plain text\n",
        "cut.jpg": jpeg[: len(jpeg) // 2],
        "short.jpg": jpeg[:200],
        "bomb.png": png_claiming(60_000, 60_000),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        first, second = (inspect_file(str(tmp_path / name), CFG) for _ in range(2))
        assert first["status"] == schema.STATUS_QUARANTINED
        assert first == second
        assert " at 0x" not in str(first["error_detail"]), first["error_detail"]


def test_decode_leaves_pillows_global_pixel_limit_as_it_found_it() -> None:
    before = Image.MAX_IMAGE_PIXELS
    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, format="PNG")
    decode(buf.getvalue(), 12345)
    with pytest.raises(DecodeError):
        decode(b"not an image", 12345)
    assert before == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PCX", "SGI", "QOI"])
def test_a_format_outside_the_allow_list_is_quarantined_without_being_parsed_unless_allowed(
    tmp_path: Path, fmt: str
) -> None:
    image = Image.new("RGB", (40, 40), (10, 20, 30))
    image.paste((200, 100, 0), (0, 0, 20, 20))
    path = save(image, tmp_path / f"x.{fmt.lower()}", fmt)
    row = inspect_file(str(path), CFG)
    assert (row["status"], row["error"]) == (schema.STATUS_QUARANTINED, schema.REASON_FORMAT)
    assert f"{fmt} is not in ingest.formats" in str(row["error_detail"])
    allowed = inspect_file(str(path), IngestConfig(formats=[*CFG.formats, fmt]))
    assert allowed["status"] == schema.STATUS_OK and allowed["format"] == fmt


def test_eps_never_reaches_ghostscript() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(DecodeError) as refused:
        decode(eps, CFG.max_pixels)
    assert refused.value.reason == schema.REASON_FORMAT
