"""Training views, made on CPU with ``torchvision.transforms.v2`` inside Ray Data (uint8 out; normalised on device).

- :class:`MultiCrop`: DINOv2's 2 global + N local crops (paper appendix; ``dinov2/data/augmentations.py``): random
  resized crops, flip, colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, Gaussian blur p 1.0 on global 1,
  p 0.1 plus solarize p 0.2 on global 2, p 0.5 on locals.
- :class:`SingleView`: distillation's one view (random resized crop from scale 0.14, flip, jitter, grayscale, blur).
- :class:`TwoViews`: SimCLR's two views of one distribution (Chen et al. 2020, appendix A): random resized crop
  (scale 0.08-1), flip, colour jitter of strength s (0.8 s, 0.8 s, 0.8 s, 0.2 s; ``crops.simclr_colour``, 1 by
  default) p 0.8, grayscale p 0.2, Gaussian blur p 0.5.
  They travel under the global crop keys (``GLOBAL_KEYS``).

Every view shrinks its crop, so a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) at which the smallest
crop still spans its output size (``min_side``; ``crops.reduced_decode``): the demo preset on 200-500 px photos
decoded and resized 4-16x the pixels its 32 px views keep. ``crops.flip_p`` 0 drops flips (digits, text).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from lvdkit.core.image import DecodeError, decode_rgb
from lvdkit.pretrain.colour import ColourOps, Jitter
from lvdkit.pretrain.config import CropsConfig

GLOBAL_KEYS = ("global_0", "global_1")
LOCAL_KEY = "local"  # (B, n_local, 3, s, s)
VIEW_KEY = "view"  # distillation: (B, 3, S, S)
_log = logging.getLogger(__name__)


# brightness, contrast, saturation, hue (DINO, DINOv2, distillation)
DINO_JITTER: Jitter = (0.4, 0.4, 0.2, 0.1)


def _crop(size: int, scale: list[float], flip_p: float) -> T.Compose:
    crop = T.RandomResizedCrop(
        size, scale=(scale[0], scale[1]), interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    return T.Compose([crop, T.RandomHorizontalFlip(p=flip_p)] if flip_p > 0 else [crop])


def needed_side(size: int, scale: list[float]) -> int:
    """The shorter image side at which RandomResizedCrop's smallest crop (area ``scale[0]``, aspect 3/4) still
    spans ``size`` pixels: decoding larger adds no detail to any view."""
    return math.ceil(size / math.sqrt(scale[0] * 3 / 4))


def _to_uint8(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()  # (3, H, W)


class Views:
    """A method's views: per image the geometric crops (:meth:`crops`, Pillow), per batch the colour ops
    (:meth:`colour`, :mod:`lvdkit.pretrain.colour`). Calling it on one image gives that image's finished views."""

    min_side: int  # the shorter side a decoded image needs (see needed_side)
    ops: dict[str, ColourOps]  # colour recipe per output key

    def crops(self, image: Image.Image) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def colour(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stacked crops (B, 3, H, W) or (B, n, 3, H, W) per key -> the same, colour-augmented."""
        out = {}
        for key, crops in batch.items():
            flat = torch.from_numpy(crops).flatten(0, crops.ndim - 4)  # (B n, 3, H, W)
            out[key] = self.ops[key](flat).view(crops.shape).numpy()
        return out

    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:
        batch = self.colour({key: crop[None] for key, crop in self.crops(image).items()})
        return {key: views[0] for key, views in batch.items()}


class MultiCrop(Views):
    """2 global crops (3, G, G) and ``n_local`` local crops (n, 3, L, L), uint8."""

    def __init__(self, cfg: CropsConfig) -> None:
        k = cfg.blur_kernel
        self.global_crop = _crop(cfg.global_size, cfg.global_scale, cfg.flip_p)
        self.local_crop = _crop(cfg.local_size, cfg.local_scale, cfg.flip_p)
        self.ops = {
            GLOBAL_KEYS[0]: ColourOps(DINO_JITTER, p_blur=1.0, blur_kernel=k),
            GLOBAL_KEYS[1]: ColourOps(DINO_JITTER, p_blur=0.1, blur_kernel=k, p_solarize=0.2),
            LOCAL_KEY: ColourOps(DINO_JITTER, p_blur=0.5, blur_kernel=k),
        }
        self.n_local = cfg.n_local
        local = needed_side(cfg.local_size, cfg.local_scale) if cfg.n_local else 0
        self.min_side = max(needed_side(cfg.global_size, cfg.global_scale), local)

    def crops(self, image: Image.Image) -> dict[str, np.ndarray]:
        out = {key: _to_uint8(self.global_crop(image)) for key in GLOBAL_KEYS}
        if self.n_local:
            out[LOCAL_KEY] = np.stack([_to_uint8(self.local_crop(image)) for _ in range(self.n_local)])
        return out


class SingleView(Views):
    """One view (3, S, S) uint8, for distillation (teacher and student see the same view)."""

    def __init__(self, cfg: CropsConfig) -> None:
        self.crop = _crop(cfg.global_size, cfg.distill_scale, cfg.flip_p)
        self.ops = {VIEW_KEY: ColourOps(DINO_JITTER, p_blur=0.5, blur_kernel=cfg.blur_kernel)}
        self.min_side = needed_side(cfg.global_size, cfg.distill_scale)

    def crops(self, image: Image.Image) -> dict[str, np.ndarray]:
        return {VIEW_KEY: _to_uint8(self.crop(image))}


class TwoViews(Views):
    """SimCLR's two views (3, S, S) uint8 under ``GLOBAL_KEYS``, both drawn from the same augmentation."""

    def __init__(self, cfg: CropsConfig) -> None:
        self.crop = _crop(cfg.global_size, cfg.simclr_scale, cfg.flip_p)
        s = cfg.simclr_colour
        jitter: Jitter = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        ops = ColourOps(jitter, p_blur=0.5, blur_kernel=cfg.blur_kernel)
        self.ops = dict.fromkeys(GLOBAL_KEYS, ops)
        self.min_side = needed_side(cfg.global_size, cfg.simclr_scale)

    def crops(self, image: Image.Image) -> dict[str, np.ndarray]:
        return {key: _to_uint8(self.crop(image)) for key in GLOBAL_KEYS}


VIEWS: dict[str, Callable[[CropsConfig], Views]] = {
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
        self.views: Views = VIEWS[method](crops)
        self.image_column = image_column
        self.min_side = self.views.min_side if crops.reduced_decode else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch[self.image_column]
        views = []
        for i, data in enumerate(images):
            try:
                image = decode_rgb(bytes(data), min_side=self.min_side)  # the one bytes -> RGB path, as ingest
            except DecodeError as exc:
                # One unreadable image must not stop a multi-day run (DINOv2's known pain): skip it, loudly.
                name = batch["uri"][i] if "uri" in batch else f"row {i} of a batch"
                _log.warning("pretraining skips an image it cannot decode (%s): %s", name, exc)
                continue
            views.append(self.views.crops(image))
        return self.views.colour({key: np.stack([v[key] for v in views]) for key in views[0]}) if views else {}


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
