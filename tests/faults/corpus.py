"""Generate a corpus of hostile inputs mixed with good images, each with the outcome ingest must give it.

Nothing here is committed as a binary: :func:`make_corpus` writes every file (deterministically) under a folder::

    DIR/pool/        walked recursively: good images, broken files, odd names, links, a FIFO, ...
    DIR/extra.txt    a file list naming what a walk cannot reach (a directory, a missing path) and one file again

Pass :func:`corpus_inputs` as ``ingest.inputs``. Each :class:`Case` pins what Pillow (13) and lvdkit do with it:
``kept`` (decoded), ``duplicate`` (a deliberate copy of a good image), ``quarantined`` with one reason of
:data:`lvdkit.core.schema.REASONS`, or ``unlisted`` (must not become a row: a folder or a link to a folder is walked,
not read).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.files import as_uri

KEPT = "kept"
DUPLICATE = "duplicate"
QUARANTINED = "quarantined"
UNLISTED = "unlisted"
GOOD = "good"  # kind of the plain good images


@dataclass(frozen=True)
class Case:
    """One corpus entry and the outcome it must end in."""

    kind: str
    path: Path | bytes  # bytes only where the name is not valid UTF-8
    outcome: str  # kept | duplicate | quarantined | unlisted
    reason: str | None = None  # quarantined: one of schema.REASONS; duplicate: the dedup stage; else None
    note: str = ""  # why this outcome (for the table in the issue)
    size: tuple[int, int] | None = None  # kept: (width, height) after EXIF orientation
    mode: str | None = None  # kept: Pillow mode as stored
    fmt: str | None = None  # kept: Pillow format
    n_frames: int = 1  # kept: frames in the file

    @property
    def uri(self) -> str:
        """The ``uri`` ingest records for this file (non-UTF-8 bytes escaped, see ``lvdkit.curation.ingest``)."""
        return as_uri(self.path if isinstance(self.path, bytes) else str(self.path))

    @property
    def fspath(self) -> str | bytes:
        """The path as the OS takes it."""
        return self.path if isinstance(self.path, bytes) else str(self.path)

    @property
    def expected(self) -> tuple[str, str | None]:
        return self.outcome, self.reason


def corpus_inputs(root: Path) -> list[str]:
    """``ingest.inputs`` for a corpus made in ``root``."""
    return [str(root / "pool"), str(root / "extra.txt")]


def cannot_remove_read_permission() -> str | None:
    """Why a file without read permission cannot be made here (None when it can)."""
    if os.geteuid() == 0:
        return "running as root: chmod 000 does not stop root from reading a file"
    return None


# --- image content -------------------------------------------------------------------------------------------------


def picture(seed: int, width: int, height: int) -> Image.Image:
    """A smooth random RGB picture, different for every seed (so no two corpus images are perceptual duplicates)."""
    rng = np.random.default_rng(seed)
    grid = (rng.random((max(2, min(height, 6)), max(2, min(width, 8)), 3)) * 255).astype(np.uint8)
    return Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)


def encoded(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header declares ``width`` x ``height`` 8-bit gray pixels (a bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png_chunk_at(data: bytes, kind: bytes) -> tuple[int, int]:
    """(offset of the chunk's type field, length of its body)."""
    at = data.index(kind)
    return at, struct.unpack(">I", data[at - 4 : at])[0]


def png_bad_crc(data: bytes, kind: bytes) -> bytes:
    """``data`` with the CRC of its first ``kind`` chunk flipped (the chunk itself intact)."""
    at, length = _png_chunk_at(data, kind)
    out = bytearray(data)
    out[at + 4 + length] ^= 0xFF
    return bytes(out)


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """A baseline JPEG whose SOF0 header is rewritten to declare ``width`` x ``height``."""
    at = data.index(b"\xff\xc0")
    out = bytearray(data)
    out[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def jpeg_corrupt_entropy(data: bytes) -> bytes:
    """Flip bits in the middle of the Huffman-coded scan data (markers and headers left alone)."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0] + 16
    end = len(data) - 2  # keep EOI
    out = bytearray(data)
    for i in range(start, start + (end - start) // 2):
        flipped = out[i] ^ 0x5A
        if flipped != 0xFF and out[i] != 0xFF and (i == 0 or out[i - 1] != 0xFF):  # never make or break a marker
            out[i] = flipped
    return bytes(out)


def jpeg_with_app1(data: bytes, payload: bytes) -> bytes:
    """Insert an APP1 segment holding ``payload`` right after SOI."""
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


HEIC_HEADER = (
    struct.pack(">I", 24)
    + b"ftypheic"
    + b"\x00\x00\x00\x00"
    + b"mif1heic"  # ftyp box: HEIF/HEVC brands
    + struct.pack(">I", 40)
    + b"meta"
    + b"\x00" * 32  # an empty-looking meta box: enough to look real
)


# --- the corpus ----------------------------------------------------------------------------------------------------


def make_corpus(root: Path) -> list[Case]:
    """Write the corpus under ``root`` (which must be empty or absent) and return its cases."""
    pool = root / "pool"
    pool.mkdir(parents=True)
    cases: list[Case] = []
    seeds = iter(range(1000, 2000))

    def write(rel: str, data: bytes) -> Path:
        path = pool / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def kept(kind: str, rel: str, im: Image.Image, fmt: str, note: str, n_frames: int = 1, **params: object) -> Path:
        path = write(rel, encoded(im, fmt, **params))
        upright = (im.height, im.width) if "exif" in params else im.size  # only orientation 6 (90 degrees) is used
        mode = "P" if fmt == "GIF" else im.mode  # GIF stores a palette
        cases.append(Case(kind, path, KEPT, None, note, size=upright, mode=mode, fmt=fmt, n_frames=n_frames))
        return path

    def quarantined(kind: str, rel: str, data: bytes | None, reason: str, note: str) -> Path:
        path = pool / rel if data is None else write(rel, data)
        cases.append(Case(kind, path, QUARANTINED, reason, note))
        return path

    def pic(width: int, height: int) -> Image.Image:
        return picture(next(seeds), width, height)

    # Good plain images: several formats, sizes and folders.
    goods: list[Path] = []
    plain: list[tuple[str, str, tuple[int, int], dict[str, object]]] = [
        ("good_00.jpg", "JPEG", (96, 72), {"quality": 90}),
        ("good_01.png", "PNG", (80, 80), {}),
        ("good_02.webp", "WEBP", (120, 90), {"quality": 90}),
        ("good_03.bmp", "BMP", (64, 64), {}),
        ("good_04.tif", "TIFF", (100, 70), {}),
        ("good_05.jpg", "JPEG", (90, 60), {"progressive": True}),
        ("good_06.gif", "GIF", (72, 96), {}),
        ("sub/good_07.png", "PNG", (128, 48), {}),
        ("sub/deeper/good_08.JPG", "JPEG", (64, 112), {}),
    ]
    for rel, fmt, (w, h), params in plain:
        goods.append(kept(GOOD, rel, pic(w, h), fmt, "plain image", 1, **params))
    gray = pic(88, 66).convert("L")
    goods.append(kept(GOOD, "good_09_gray.jpg", gray, "JPEG", "plain grayscale image"))

    # Deliberate duplicates of good images: the copy loses to the shorter path (dedup_exact keeps the shortest uri).
    copy = write("dups/good_01_copy.png", goods[1].read_bytes())
    cases.append(Case("exact_copy", copy, DUPLICATE, "dedup_exact", "byte copy of good_01.png"))
    link = pool / "good_00_link.jpg"
    os.symlink("good_00.jpg", link)
    cases.append(Case("symlink_to_image", link, DUPLICATE, "dedup_exact", "read through the link: same bytes"))

    # Empty, truncated, corrupt.
    quarantined("empty_file", "empty.jpg", b"", schema.REASON_EMPTY, "0 bytes")
    jpeg = encoded(pic(96, 96), "JPEG", quality=90)
    quarantined("truncated_jpeg", "truncated.jpg", jpeg[: len(jpeg) // 2], schema.REASON_TRUNCATED, "cut in half")
    png = encoded(pic(96, 96), "PNG")
    quarantined("truncated_png", "truncated.png", png[: len(png) // 2], schema.REASON_TRUNCATED, "cut in half")
    quarantined("truncated_png_header", "truncated_header.png", png[:30], schema.REASON_DECODE, "cut inside IHDR")
    webp = encoded(pic(96, 96), "WEBP", quality=90)
    quarantined(
        "truncated_webp", "truncated.webp", webp[: len(webp) // 2], schema.REASON_TRUNCATED, "shorter than RIFF says"
    )
    gif = encoded(pic(96, 96), "GIF")
    quarantined("truncated_gif", "truncated.gif", gif[: len(gif) // 2], schema.REASON_TRUNCATED, "cut in half")
    quarantined(
        "png_bad_crc_ihdr", "bad_crc_ihdr.png", png_bad_crc(png, b"IHDR"), schema.REASON_DECODE, "header CRC wrong"
    )
    clean = encoded(pic(96, 96), "PNG")
    at, _ = _png_chunk_at(clean, b"IDAT")
    broken = bytearray(clean)
    broken[at + 20 : at + 36] = b"\xff" * 16
    quarantined("png_corrupt_idat", "corrupt_idat.png", bytes(broken), schema.REASON_DECODE, "zlib stream broken")
    write("bad_crc_idat.png", png_bad_crc(encoded(pic(96, 80), "PNG"), b"IDAT"))
    cases.append(
        Case(
            "png_bad_crc_idat",
            pool / "bad_crc_idat.png",
            KEPT,
            None,
            "Pillow does not check IDAT CRCs; pixels intact",
            size=(96, 80),
            mode="RGB",
            fmt="PNG",
        )
    )
    huff = jpeg_corrupt_entropy(encoded(pic(96, 96), "JPEG", quality=90))
    write("corrupt_huffman.jpg", huff)
    cases.append(
        Case(
            "jpeg_corrupt_huffman",
            pool / "corrupt_huffman.jpg",
            KEPT,
            None,
            "libjpeg only warns: decodes to garbage pixels",
            size=(96, 96),
            mode="RGB",
            fmt="JPEG",
        )
    )

    # Not images at all, whatever their names say.
    quarantined("text_as_jpg", "notes.jpg", b"plain text, not a JPEG\n" * 8, schema.REASON_NOT_IMAGE, "text")
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>\n"
    quarantined("html_as_jpg", "page.jpg", html, schema.REASON_NOT_IMAGE, "an HTTP error page saved as an image")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>\n'
    quarantined("svg_as_png", "vector.png", svg, schema.REASON_NOT_IMAGE, "Pillow has no SVG reader")
    noise = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    quarantined("random_bytes", "noise.webp", noise, schema.REASON_NOT_IMAGE, "no known signature")
    quarantined("heic", "photo.heic", HEIC_HEADER, schema.REASON_NOT_IMAGE, "no HEIF reader without pillow-heif")

    # Wrong extension, odd but valid encodings.
    kept("wrong_extension", "really_a_png.jpg", pic(80, 60), "PNG", "PNG bytes named .jpg: format from the bytes")
    trailing = encoded(pic(80, 64), "JPEG") + b"\x00garbage after EOI" * 10
    write("trailing_garbage.jpg", trailing)
    cases.append(
        Case(
            "jpeg_trailing_garbage",
            pool / "trailing_garbage.jpg",
            KEPT,
            None,
            "bytes after EOI ignored",
            size=(80, 64),
            mode="RGB",
            fmt="JPEG",
        )
    )
    bad_exif = jpeg_with_app1(encoded(pic(72, 56), "JPEG"), b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\x01\x12")
    write("corrupt_exif.jpg", bad_exif)
    cases.append(
        Case(
            "jpeg_corrupt_exif",
            pool / "corrupt_exif.jpg",
            KEPT,
            None,
            "unreadable EXIF ignored, no rotation",
            size=(72, 56),
            mode="RGB",
            fmt="JPEG",
        )
    )

    # Decompression bombs: refused from the header, never decoded.
    quarantined(
        "bomb_png", "bomb.png", png_claiming(60_000, 60_000), schema.REASON_TOO_MANY_PIXELS, "header: 3.6e9 pixels"
    )
    quarantined(
        "bomb_jpeg",
        "bomb.jpg",
        jpeg_with_size(encoded(pic(64, 64), "JPEG"), 65_000, 65_000),
        schema.REASON_TOO_MANY_PIXELS,
        "SOF header: 4.2e9 pixels",
    )
    sparse = pool / "sparse_300mb.jpg"
    with open(sparse, "wb") as fh:
        fh.truncate(300 * 2**20)  # a hole: takes no disk, refused by size before any read
    cases.append(Case("file_too_large", sparse, QUARANTINED, schema.REASON_FILE_TOO_LARGE, "300 MiB > max_file_mb"))

    # Degenerate sizes (min_side is 16).
    quarantined("tiny_1x1", "pixel.png", encoded(pic(1, 1), "PNG"), schema.REASON_TOO_SMALL, "1x1")
    quarantined("line_1xN", "line.png", encoded(pic(1, 300), "PNG"), schema.REASON_TOO_SMALL, "1x300")
    quarantined("strip_30000x10", "strip10.png", encoded(pic(30_000, 10), "PNG"), schema.REASON_TOO_SMALL, "side 10")
    kept("strip_30000x16", "strip16.png", pic(30_000, 16), "PNG", "shorter side exactly min_side")
    kept("square_16x16", "square16.png", pic(16, 16), "PNG", "exactly min_side")

    # Unusual modes and containers (README: accepted, converted to 8-bit RGB where pixels are needed).
    kept("cmyk_jpeg", "cmyk.jpg", pic(80, 72).convert("CMYK"), "JPEG", "CMYK converted")
    deep = np.asarray(pic(64, 48).convert("L"), dtype=np.uint16) * 257
    kept("png_16bit", "gray16.png", Image.fromarray(deep), "PNG", "16-bit rescaled, not clipped")
    pal = pic(72, 72).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    kept("palette_transparency", "palette.png", pal, "PNG", "alpha composited on white", transparency=0)
    alpha = Image.linear_gradient("L").resize((70, 50))
    la = Image.merge("LA", (pic(70, 50).convert("L"), alpha))
    kept("la_png", "gray_alpha.png", la, "PNG", "alpha composited on white")
    rgba = pic(66, 54).convert("RGBA")
    rgba.putalpha(alpha.resize((66, 54)))
    kept("rgba_png", "rgba.png", rgba, "PNG", "alpha composited on white")
    frames = [pic(64, 64) for _ in range(3)]
    kept("animated_gif", "anim.gif", frames[0], "GIF", "first frame", 3, save_all=True, append_images=frames[1:])
    frames = [pic(64, 64) for _ in range(3)]
    kept("animated_webp", "anim.webp", frames[0], "WEBP", "first frame", 3, save_all=True, append_images=frames[1:])
    pages = [pic(60, 80) for _ in range(3)]
    kept("tiff_multipage", "pages.tif", pages[0], "TIFF", "first page", 3, save_all=True, append_images=pages[1:])
    floats = np.asarray(pic(50, 40).convert("L"), dtype=np.float32) / 255.0 - 0.5
    kept("tiff_float32", "float.tif", Image.fromarray(floats, mode="F"), "TIFF", "float rescaled to its range")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    kept("exif_rotated_jpeg", "rotated.jpg", pic(96, 64), "JPEG", "stored 96x64, upright 64x96", exif=exif.tobytes())
    kept("avif", "photo.avif", pic(80, 56), "AVIF", "Pillow 13 reads AVIF")

    # Names: non-UTF-8, 255 bytes, unicode, whitespace and a newline, a literal backslash.
    bad_name = os.fsencode(pool) + b"/bad_\xff\xfe.jpg"
    with open(bad_name, "wb") as fh:
        fh.write(encoded(pic(64, 64), "JPEG"))
    cases.append(
        Case(
            "non_utf8_name",
            bad_name,
            KEPT,
            None,
            r"uri stores the bytes as \xff\xfe",
            size=(64, 64),
            mode="RGB",
            fmt="JPEG",
        )
    )
    kept("long_name_255", "long_" + "x" * 246 + ".png", pic(64, 64), "PNG", "255-byte name")
    kept("unicode_name", "ñandú_图像.png", pic(64, 64), "PNG", "valid UTF-8, kept as is")
    kept("whitespace_newline_name", " new\nline name .png", pic(64, 64), "PNG", "spaces and a newline in the name")
    kept("literal_backslash_x_name", "lit_\\xff.png", pic(64, 64), "PNG", r"a real '\xff' text name, not escaped")

    # Not regular files.
    folder = pool / "x.jpg"
    folder.mkdir()
    cases.append(Case("dir_named_jpg_walked", folder, UNLISTED, None, "a folder is walked, its files listed"))
    kept("file_in_dir_named_jpg", "x.jpg/inside.png", pic(64, 64), "PNG", "listed from inside the folder x.jpg")
    listed_dir = pool / "y.jpg"
    listed_dir.mkdir()
    cases.append(Case("dir_named_jpg_listed", listed_dir, QUARANTINED, schema.REASON_NOT_FILE, "named in extra.txt"))
    fifo = pool / "pipe.jpg"
    os.mkfifo(fifo)
    cases.append(Case("fifo", fifo, QUARANTINED, schema.REASON_NOT_FILE, "never opened (would block)"))
    dangling = pool / "dangling.jpg"
    os.symlink("nowhere.jpg", dangling)
    cases.append(Case("dangling_symlink", dangling, QUARANTINED, schema.REASON_UNREADABLE, "target missing"))
    os.symlink("loop_b.jpg", pool / "loop_a.jpg")
    os.symlink("loop_a.jpg", pool / "loop_b.jpg")
    for name in ("loop_a.jpg", "loop_b.jpg"):
        cases.append(Case("symlink_loop", pool / name, QUARANTINED, schema.REASON_UNREADABLE, "ELOOP, no hang"))
    up = pool / "sub" / "up"
    os.symlink("..", up)
    cases.append(Case("symlink_dir_cycle", up, UNLISTED, None, "links to folders are not followed: no cycle"))
    outside = root.parent / f"{root.name}_outside"  # not under any input root (pool/, extra.txt's folder)
    outside.mkdir(exist_ok=True)
    secret = outside / "secret.png"
    secret.write_bytes(encoded(pic(64, 64), "PNG"))
    escape = pool / "link_out.png"
    os.symlink(secret, escape)
    note = "a link out of the inputs: not read unless ingest.follow_symlinks_outside"
    cases.append(Case("symlink_outside_inputs", escape, QUARANTINED, schema.REASON_SYMLINK_OUTSIDE, note))
    if cannot_remove_read_permission() is None:
        locked = write("locked.jpg", encoded(pic(64, 64), "JPEG"))
        locked.chmod(0)
        cases.append(Case("no_read_permission", locked, QUARANTINED, schema.REASON_UNREADABLE, "EACCES"))

    # What only a file list can name: a missing path, and a file the walk lists too (one row, not two).
    missing = pool / "missing.jpg"
    cases.append(Case("listed_missing", missing, QUARANTINED, schema.REASON_UNREADABLE, "named in extra.txt, absent"))
    (root / "extra.txt").write_text("# named by a file list\npool/y.jpg\npool/missing.jpg\npool/good_00.jpg\n")
    return cases
