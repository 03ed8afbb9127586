"""Synthetic copies of an image, the edits a copy detector must see through (used to calibrate its threshold).

The families follow how images are copied in the wild (and SSCD's training augmentations): crops shown at the
original size, heavy re-compression, downscaling, mirroring, small rotations, colour changes, reposts framed with a
border and a caption, and compositions of two of these. The same ``seed`` always gives the same edit, so a
calibration set is reproducible.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

COPY_EDITS = ("crop", "jpeg", "resize", "flip", "rotate", "color", "overlay", "compose")
_SINGLE = COPY_EDITS[:-1]
_WORDS = ("copyright", "photo", "shared", "2024", "www", "original", "repost", "stock", "via", "image")


def edit_families(seed: int, count: int) -> list[str]:
    """``count`` (at most ``len(COPY_EDITS)``) distinct edit families for one image, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    return [COPY_EDITS[int(i)] for i in rng.permutation(len(COPY_EDITS))[:count]]


def synthetic_copy(image: Image.Image, seed: int, edit: str | None = None) -> tuple[Image.Image, str]:
    """A copy of the RGB ``image`` by the ``edit`` family (random from ``seed`` when None); returns it and the family.

    ``compose`` applies two different single edits in turn."""
    rng = np.random.default_rng(seed)
    edit = edit if edit is not None else COPY_EDITS[int(rng.integers(len(COPY_EDITS)))]
    if edit == "compose":
        first, second = rng.choice(len(_SINGLE), 2, replace=False)
        return _apply(_apply(image, _SINGLE[int(first)], rng), _SINGLE[int(second)], rng), edit
    return _apply(image, edit, rng), edit


def _apply(image: Image.Image, edit: str, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    if edit == "crop":  # a crop shown at the original size
        cw, ch = max(1, int(w * rng.uniform(0.5, 0.9))), max(1, int(h * rng.uniform(0.5, 0.9)))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BILINEAR)
    if edit == "jpeg":
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(rng.integers(10, 50)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if edit == "resize":
        f = rng.uniform(0.3, 0.7)
        return image.resize((max(1, int(w * f)), max(1, int(h * f))), Image.Resampling.BILINEAR)
    if edit == "flip":
        return ImageOps.mirror(image)
    if edit == "rotate":
        angle = float(rng.uniform(4, 15)) * (1 if rng.random() < 0.5 else -1)
        return image.rotate(angle, resample=Image.Resampling.BILINEAR)
    if edit == "color":
        out = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.6, 1.4)))
        out = ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.7, 1.3)))
        return ImageEnhance.Color(out).enhance(float(rng.uniform(0.0, 1.8)))
    if edit == "overlay":
        return _overlay(image, rng)
    raise ValueError(f"unknown copy edit {edit!r}; expected one of {COPY_EDITS}")


def _overlay(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A repost: a border of random colour and width, and a caption in a random place."""
    w, h = image.size
    pad = max(1, int(min(w, h) * rng.uniform(0.03, 0.15)))
    out = ImageOps.expand(image, border=pad, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    words = " ".join(_WORDS[int(i)] for i in rng.choice(len(_WORDS), int(rng.integers(1, 4)), replace=False))
    font = ImageFont.load_default(size=max(8, int(h * rng.uniform(0.06, 0.14))))
    at = (pad + int(w * rng.uniform(0.0, 0.4)), pad + int(h * rng.uniform(0.0, 0.85)))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    ImageDraw.Draw(out).text(at, words, fill=colour, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return out
