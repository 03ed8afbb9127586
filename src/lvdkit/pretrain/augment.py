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

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from lvdkit.core.image import DecodeError, decode_rgb
from lvdkit.core.resample import Box, resize_boxes
from lvdkit.pretrain.colour import ColourOps, Jitter
from lvdkit.pretrain.config import CropsConfig
from lvdkit.pretrain.device_views import plan_rows

GLOBAL_KEYS = ("global_0", "global_1")
LOCAL_KEY = "local"  # (B, n_local, 3, s, s)
VIEW_KEY = "view"  # distillation: (B, 3, S, S)
_log = logging.getLogger(__name__)


# brightness, contrast, saturation, hue (DINO, DINOv2, distillation)
DINO_JITTER: Jitter = (0.4, 0.4, 0.2, 0.1)


RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratios


def draw_box(width: int, height: int, scale: list[float]) -> Box:
    """A random resized crop's source box (left, top, right, bottom), drawn from torch's RNG as torchvision's
    ``RandomResizedCrop.get_params``: area ``scale`` of the image, aspect in ``RATIO`` (log-uniform), 10 tries,
    else the central crop of the nearest allowed aspect."""
    area, log_ratio = width * height, (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return (left, top, left + w, top + h)
    w, h = width, height
    if width / height < RATIO[0]:
        h = round(w / RATIO[0])
    elif width / height > RATIO[1]:
        w = round(h * RATIO[1])
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


@dataclasses.dataclass(frozen=True)
class Crop:
    """A random resized crop to ``size`` x ``size`` (bicubic, antialiased) plus a horizontal flip with ``flip_p``;
    ``n`` crops per image (None: one, without a crop axis). The draw (:meth:`plan`) is apart from the resize, which
    Pillow does here and :func:`lvdkit.core.resample.resize_box` on a device: the same boxes, the same filter."""

    size: int
    scale: list[float]
    flip_p: float
    n: int | None = None

    def plan(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes float32 (k, 4) and flips bool (k,) for the k crops of a ``width`` x ``height`` image."""
        k = self.n or 1
        boxes = np.asarray([draw_box(width, height, self.scale) for _ in range(k)], dtype=np.float32)
        return boxes, (torch.rand(k) < self.flip_p).numpy()

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Pillow: (3, S, S) uint8, or (n, 3, S, S)."""
        boxes, flips = self.plan(*image.size)
        crops = []
        for box, flip in zip(boxes, flips, strict=True):
            crop = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=tuple(box.tolist()))
            crops.append(_to_uint8(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop))
        return crops[0] if self.n is None else np.stack(crops)

    def on_device(self, image: torch.Tensor, boxes: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """(3, H, W) uint8 on any device and a :meth:`plan` -> (3, S, S) uint8, or (n, 3, S, S), on that device."""
        box_list = [(float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in boxes]
        crops = resize_boxes(image, box_list, (self.size, self.size), "bicubic", [bool(f) for f in flips])
        return crops[0] if self.n is None else crops


def needed_side(size: int, scale: list[float]) -> int:
    """The shorter image side at which RandomResizedCrop's smallest crop (area ``scale[0]``, aspect 3/4) still
    spans ``size`` pixels: decoding larger adds no detail to any view."""
    return math.ceil(size / math.sqrt(scale[0] * 3 / 4))


def _to_uint8(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()  # (3, H, W)


class Views:
    """A method's views: per image the geometric crops (:attr:`specs`: Pillow in :meth:`crops`, or a plan the
    training device cuts), per batch the colour ops (:meth:`colour`, :mod:`lvdkit.pretrain.colour`). Calling it on
    one image gives that image's finished views."""

    min_side: int  # the shorter side a decoded image needs (see needed_side)
    specs: dict[str, Crop]  # the crops of each output key
    ops: dict[str, ColourOps]  # colour recipe per output key

    def crops(self, image: Image.Image) -> dict[str, np.ndarray]:
        return {key: crop(image) for key, crop in self.specs.items()}

    def colour(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stacked crops (B, 3, H, W) or (B, n, 3, H, W) per key -> the same, colour-augmented."""
        return {
            key: t.numpy() for key, t in self.colour_tensors({k: torch.from_numpy(v) for k, v in batch.items()}).items()
        }

    def colour_tensors(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`colour` on tensors, on their device."""
        out = {}
        for key, crops in batch.items():
            flat = crops.flatten(0, crops.ndim - 4)  # (B n, 3, H, W)
            out[key] = self.ops[key](flat).view(crops.shape)
        return out

    def __call__(self, image: Image.Image) -> dict[str, np.ndarray]:
        batch = self.colour({key: crop[None] for key, crop in self.crops(image).items()})
        return {key: views[0] for key, views in batch.items()}


class MultiCrop(Views):
    """2 global crops (3, G, G) and ``n_local`` local crops (n, 3, L, L), uint8."""

    def __init__(self, cfg: CropsConfig) -> None:
        k = cfg.blur_kernel
        glob = Crop(cfg.global_size, cfg.global_scale, cfg.flip_p)
        self.specs = dict.fromkeys(GLOBAL_KEYS, glob)
        if cfg.n_local:
            self.specs[LOCAL_KEY] = Crop(cfg.local_size, cfg.local_scale, cfg.flip_p, n=cfg.n_local)
        self.ops = {
            GLOBAL_KEYS[0]: ColourOps(DINO_JITTER, p_blur=1.0, blur_kernel=k),
            GLOBAL_KEYS[1]: ColourOps(DINO_JITTER, p_blur=0.1, blur_kernel=k, p_solarize=0.2),
            LOCAL_KEY: ColourOps(DINO_JITTER, p_blur=0.5, blur_kernel=k),
        }
        local = needed_side(cfg.local_size, cfg.local_scale) if cfg.n_local else 0
        self.min_side = max(needed_side(cfg.global_size, cfg.global_scale), local)


class SingleView(Views):
    """One view (3, S, S) uint8, for distillation (teacher and student see the same view)."""

    def __init__(self, cfg: CropsConfig) -> None:
        self.specs = {VIEW_KEY: Crop(cfg.global_size, cfg.distill_scale, cfg.flip_p)}
        self.ops = {VIEW_KEY: ColourOps(DINO_JITTER, p_blur=0.5, blur_kernel=cfg.blur_kernel)}
        self.min_side = needed_side(cfg.global_size, cfg.distill_scale)


class TwoViews(Views):
    """SimCLR's two views (3, S, S) uint8 under ``GLOBAL_KEYS``, both drawn from the same augmentation."""

    def __init__(self, cfg: CropsConfig) -> None:
        self.specs = dict.fromkeys(GLOBAL_KEYS, Crop(cfg.global_size, cfg.simclr_scale, cfg.flip_p))
        s = cfg.simclr_colour
        jitter: Jitter = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        ops = ColourOps(jitter, p_blur=0.5, blur_kernel=cfg.blur_kernel)
        self.ops = dict.fromkeys(GLOBAL_KEYS, ops)
        self.min_side = needed_side(cfg.global_size, cfg.simclr_scale)


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
    ``on_device``: only the crops' plan is made here; the training worker decodes and cuts them on its device
    (:mod:`lvdkit.pretrain.device_views`).
    """

    def __init__(self, method: str, crops: CropsConfig, image_column: str, on_device: bool = False) -> None:
        self.views: Views = views_of(method, crops)
        self.image_column = image_column
        self.min_side = self.views.min_side if crops.reduced_decode else None
        self.on_device = on_device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch[self.image_column]
        names = (
            [str(u) for u in batch["uri"]] if "uri" in batch else [f"row {i} of a batch" for i in range(len(images))]
        )
        if self.on_device:
            return plan_rows(self.views, [bytes(d) for d in images], names, self.min_side)
        views = []
        for data, name in zip(images, names, strict=True):
            try:
                image = decode_rgb(bytes(data), min_side=self.min_side)  # the one bytes -> RGB path, as ingest
            except DecodeError as exc:
                # One unreadable image must not stop a multi-day run (DINOv2's known pain): skip it, loudly.
                _log.warning("pretraining skips an image it cannot decode (%s): %s", name, exc)
                continue
            views.append(self.views.crops(image))
        return self.views.colour({key: np.stack([v[key] for v in views]) for key in views[0]}) if views else {}


def views_of(method: str, crops: CropsConfig) -> Views:
    """The training views of ``method``."""
    if method not in VIEWS:
        raise ValueError(f"no training views for method {method!r}; valid: {', '.join(VIEWS)}")
    return VIEWS[method](crops)


def decodes_on_device(crops: CropsConfig, gpu: bool) -> bool:
    """Whether the views are cut on the training device: ``crops.decode`` device, or auto on a GPU."""
    return crops.decode == "device" or (crops.decode == "auto" and gpu)


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
