"""Training views, made on CPU with ``torchvision.transforms.v2`` inside Ray Data (uint8 out; normalised on device).

- :class:`MultiCrop`: DINOv2's 2 global + N local crops (paper appendix; ``dinov2/data/augmentations.py``): random
  resized crops, flip, colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, Gaussian blur p 1.0 on global 1,
  p 0.1 plus solarize p 0.2 on global 2, p 0.5 on locals.
- :class:`SingleView`: distillation's one view (random resized crop from scale 0.14, flip, jitter, grayscale, blur).
- :class:`TwoViews`: SimCLR's two views of one distribution (Chen et al. 2020, appendix A): random resized crop
  (scale 0.08-1), flip, colour jitter of strength 1 (0.8, 0.8, 0.8, 0.2) p 0.8, grayscale p 0.2, Gaussian blur p 0.5.
  They travel under the global crop keys (``GLOBAL_KEYS``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from lvdkit.core.image import DecodeError, decode_rgb
from lvdkit.pretrain.config import CropsConfig

GLOBAL_KEYS = ("global_0", "global_1")
LOCAL_KEY = "local"  # (B, n_local, 3, s, s)
VIEW_KEY = "view"  # distillation: (B, 3, S, S)
_log = logging.getLogger(__name__)


DINO_JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (DINO, DINOv2, distillation)
SIMCLR_JITTER = (0.8, 0.8, 0.8, 0.2)  # SimCLR's colour distortion at strength s = 1: (0.8 s, 0.8 s, 0.8 s, 0.2 s)


def _color(p_blur: float, kernel: int, jitter_strength: tuple[float, ...] = DINO_JITTER) -> list[Any]:
    b, c, s, h = jitter_strength
    jitter = T.RandomApply([T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=0.8)
    ops: list[Any] = [jitter, T.RandomGrayscale(p=0.2)]
    if p_blur > 0:
        ops.append(T.RandomApply([T.GaussianBlur(kernel_size=kernel, sigma=(0.1, 2.0))], p=p_blur))
    return ops


def _crop(size: int, scale: list[float]) -> list[Any]:
    return [
        T.RandomResizedCrop(size, scale=(scale[0], scale[1]), interpolation=InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(p=0.5),
    ]


def _to_uint8(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()  # (3, H, W)


class MultiCrop:
    """bytes -> 2 global crops (3, G, G) and ``n_local`` local crops (3, L, L), uint8. Callable on one image."""

    def __init__(self, cfg: CropsConfig) -> None:
        k = cfg.blur_kernel
        self.global_1 = T.Compose([*_crop(cfg.global_size, cfg.global_scale), *_color(1.0, k)])
        self.global_2 = T.Compose(
            [*_crop(cfg.global_size, cfg.global_scale), *_color(0.1, k), T.RandomSolarize(128, p=0.2)]
        )
        self.local = T.Compose([*_crop(cfg.local_size, cfg.local_scale), *_color(0.5, k)])
        self.n_local = cfg.n_local

    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:
        out = {GLOBAL_KEYS[0]: _to_uint8(self.global_1(image)), GLOBAL_KEYS[1]: _to_uint8(self.global_2(image))}
        if self.n_local:
            out[LOCAL_KEY] = np.stack([_to_uint8(self.local(image)) for _ in range(self.n_local)])
        return out


class SingleView:
    """bytes -> one augmented view (3, S, S) uint8, for distillation (teacher and student see the same view)."""

    def __init__(self, cfg: CropsConfig) -> None:
        self.transform = T.Compose([*_crop(cfg.global_size, cfg.distill_scale), *_color(0.5, cfg.blur_kernel)])

    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:
        return {VIEW_KEY: _to_uint8(self.transform(image))}


class TwoViews:
    """bytes -> SimCLR's two views (3, S, S) uint8 under ``GLOBAL_KEYS``, both drawn from the same augmentation."""

    def __init__(self, cfg: CropsConfig) -> None:
        color = _color(0.5, cfg.blur_kernel, SIMCLR_JITTER)
        self.transform = T.Compose([*_crop(cfg.global_size, cfg.simclr_scale), *color])

    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:
        return {key: _to_uint8(self.transform(image)) for key in GLOBAL_KEYS}


VIEWS: dict[str, type[MultiCrop] | type[TwoViews] | type[SingleView]] = {
    "dinov2": MultiCrop,
    "dino": MultiCrop,
    "simclr": TwoViews,
    "distillation": SingleView,
}  # the views of each method


class AugmentBatch:
    """A Ray Data ``map_batches`` callable: ``{image_column: bytes[]}`` -> stacked uint8 views.

    The crops draw from torch's RNG in the Ray Data worker (randomly seeded per process), so every epoch sees new
    views of an image, as in DINOv2; the training step's own randomness (masks, mixup) is seeded and checkpointed.
    """

    def __init__(self, method: str, crops: CropsConfig, image_column: str) -> None:
        if method not in VIEWS:
            raise ValueError(f"no training views for method {method!r}; valid: {', '.join(VIEWS)}")
        self.views: MultiCrop | TwoViews | SingleView = VIEWS[method](crops)
        self.image_column = image_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch[self.image_column]
        views = []
        for i, data in enumerate(images):
            try:
                image = decode_rgb(bytes(data))  # the one bytes -> RGB path: same pixels as ingest and embed
            except DecodeError as exc:
                # One unreadable image must not stop a multi-day run (DINOv2's known pain): skip it, loudly.
                name = batch["uri"][i] if "uri" in batch else f"row {i} of a batch"
                _log.warning("pretraining skips an image it cannot decode (%s): %s", name, exc)
                continue
            views.append(self.views(image))
        return {key: np.stack([v[key] for v in views]) for key in views[0]} if views else {}


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Pixels in [0, 255] (uint8, or float after mixup) (..., 3, H, W) -> float, ``(x / 255 - mean) / std``."""
    m = torch.tensor(mean, device=pixels.device).view(3, 1, 1)
    s = torch.tensor(std, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - m) / s


def multicrop_inputs(
    batch: dict[str, torch.Tensor], device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A multi-crop batch on ``device``, normalised: globals (2B, 3, G, G) crop-major (crop 0 of every image, then
    crop 1), and locals (n B, 3, L, L) crop-major too, or None without local crops."""
    globals_ = torch.cat([batch[k] for k in GLOBAL_KEYS]).to(device, non_blocking=True)  # (2B, 3, G, G)
    globals_ = normalize(globals_, mean, std)
    if LOCAL_KEY not in batch:
        return globals_, None
    local = batch[LOCAL_KEY].to(device, non_blocking=True)  # (B, n, 3, L, L)
    local = local.transpose(0, 1).flatten(0, 1)  # (n B, 3, L, L): crop-major, like the globals
    return globals_, normalize(local, mean, std)
