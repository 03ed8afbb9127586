"""What a model needs done to an image before its forward: size, resize policy and normalisation constants.

:meth:`Preprocess.prepare` runs in the CPU decode tasks and produces uint8 pixels (4x smaller than float to move
between processes); the embedder turns them into normalised float on its own device with :attr:`Preprocess.mean` and
:attr:`Preprocess.std`. This module deliberately imports no torch: decode workers should not pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image

from lvdkit.core.image import to_rgb

ResizeMode = Literal["center_crop", "squash"]
Interpolation = Literal["bicubic", "bilinear"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the uint8 ``[H, W, 3]`` pixels a model receives.

    ``center_crop``: scale the image (aspect kept) so that it covers ``size / crop_pct``, then take the central
    ``size`` (for a square ``size`` this is timm's "resize the short side to size/crop_pct, center crop").
    ``squash``: take the central ``crop_pct`` fraction of each side and resize it to ``size``, aspect ignored.
    ``mean``/``std`` are in [0, 1] units; ``None`` means the model normalises its uint8 input itself.
    """

    size: tuple[int, int]  # (H, W)
    resize: ResizeMode
    crop_pct: float = 1.0
    mean: tuple[float, float, float] | None = IMAGENET_MEAN
    std: tuple[float, float, float] | None = IMAGENET_STD
    interpolation: Interpolation = "bicubic"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(int(s) != s or s < 1 for s in self.size):
            raise ValueError(f"size must be (H, W) with positive integers, got {self.size!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must both be set (float input) or both be None (model normalises)")
        for name, value in (("mean", self.mean), ("std", self.std)):
            if value is not None and len(value) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B), got {value!r}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region (left, top, right, bottom) of a ``width`` x ``height`` image that ends up in the output."""
        out_h, out_w = self.size
        if self.resize == "squash":
            box_w, box_h = width * self.crop_pct, height * self.crop_pct
        else:
            # Scale s makes the image cover (out_h, out_w) / crop_pct; the output is the central (out_h, out_w)
            # of the scaled image, i.e. (out_h, out_w) / s of the original.
            scale = max(out_h / self.crop_pct / height, out_w / self.crop_pct / width)
            box_w, box_h = min(width, out_w / scale), min(height, out_h / scale)
        left, top = (width - box_w) / 2, (height - box_h) / 2
        return (left, top, left + box_w, top + box_h)

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Any-mode Pillow image -> uint8 ``[H, W, 3]`` (C-contiguous, writable), ready for ``Embedder.embed``."""
        rgb = to_rgb(image)
        out_h, out_w = self.size
        # One resize of just the source box (Pillow's ``box``): no intermediate full-size resize, no double rounding,
        # and Pillow antialiases when it shrinks, like torchvision's PIL path that timm's transforms use.
        resized = rgb.resize((out_w, out_h), _RESAMPLE[self.interpolation], box=self.source_box(*rgb.size))
        return np.array(resized, dtype=np.uint8)  # a writable copy (np.asarray of a Pillow image is read-only)
