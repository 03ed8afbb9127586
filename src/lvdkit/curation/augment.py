"""Synthetic copies of an image, the edits a copy detector must see through (used to calibrate its threshold).

The same ``seed`` always gives the same edit, so a calibration set is reproducible.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

COPY_EDITS = ("crop", "jpeg", "resize", "flip", "rotate", "color")


def synthetic_copy(image: Image.Image, seed: int) -> tuple[Image.Image, str]:
    """One random edit of the RGB ``image`` from :data:`COPY_EDITS`; returns the copy and the edit's name."""
    rng = np.random.default_rng(seed)
    edit = COPY_EDITS[int(rng.integers(len(COPY_EDITS)))]
    w, h = image.size
    if edit == "crop":
        f = rng.uniform(0.7, 0.9)
        cw, ch = max(1, int(w * f)), max(1, int(h * f))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image.crop((x0, y0, x0 + cw, y0 + ch)), edit
    if edit == "jpeg":
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(rng.integers(20, 60)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), edit
    if edit == "resize":
        f = rng.uniform(0.4, 0.7)
        return image.resize((max(1, int(w * f)), max(1, int(h * f))), Image.Resampling.BILINEAR), edit
    if edit == "flip":
        return ImageOps.mirror(image), edit
    if edit == "rotate":
        return image.rotate(float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR), edit
    out = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.7, 1.3)))
    return ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.8, 1.2))), edit
