"""Training views cut on the training worker's device: JPEGs decoded there (nvJPEG on a GPU), crops resized there.

DINOv2's recipe (2 x 224 px + 8 x 98 px from each image) costs ~46 ms an image on one CPU core, almost all of it
bicubic resizes of large crops, so a GPU training at ~1,500 img/s would need ~70 cores of Ray Data tasks. With
``crops.decode: device`` (``auto``: on GPU workers) the Ray Data task only reads the image's header and draws its
crops (:meth:`Crop.plan`: the same boxes and flips the Pillow path draws); the worker then decodes a whole batch of
JPEGs in one call, resizes every crop with :func:`lvdkit.core.resample.resize_boxes` (Pillow's filter on the
device: for the same boxes the same pixels but for rare 1-2 level differences) and applies the colour ops there
(:class:`lvdkit.pretrain.colour.ColourOps` runs on any device).

What the device decoder would not decode as Pillow does (PNG, CMYK or EXIF-rotated JPEGs) is decoded by Pillow in
the task (at reduced JPEG scale where it can) and travels as pixels; an image neither decodes is skipped with a
warning, as on the CPU path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from lvdkit.core.device_jpeg import decode_jpegs, plain_jpeg_size
from lvdkit.core.image import DEFAULT_MAX_PIXELS, DecodeError, decode_rgb

if TYPE_CHECKING:
    from lvdkit.pretrain.augment import Views

JPEG = "jpeg"  # a plain JPEG's bytes (b"" when the task decoded the image)
RGB = "rgb"  # the task's Pillow pixels, uint8 (H, W, 3) as bytes (b"" for a JPEG)
RGB_SHAPE = "rgb_shape"  # (H, W) of the image the boxes were drawn on
BOX = "box_"  # + view key: float32 (B, k, 4) crop boxes (left, top, right, bottom)
FLIP = "flip_"  # + view key: bool (B, k)
_log = logging.getLogger(__name__)


def plan_rows(
    views: Views, images: Sequence[bytes], names: Sequence[str], min_side: int | None
) -> dict[str, np.ndarray]:
    """The Ray Data task's half: per image its JPEG bytes or its Pillow pixels, and every crop's box and flip."""
    jpegs, rgbs, shapes = [], [], []
    plans: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {key: ([], []) for key in views.specs}
    for data, name in zip(images, names, strict=True):
        size = plain_jpeg_size(data, DEFAULT_MAX_PIXELS)
        rgb = b""
        if size is None:
            try:
                image = decode_rgb(data, min_side=min_side)
            except DecodeError as exc:
                _log.warning("pretraining skips an image it cannot decode (%s): %s", name, exc)
                continue
            rgb, size = np.asarray(image, dtype=np.uint8).tobytes(), image.size
        for key, crop in views.specs.items():
            boxes, flips = crop.plan(*size)
            plans[key][0].append(boxes)
            plans[key][1].append(flips)
        jpegs.append(data if not rgb else b"")
        rgbs.append(rgb)
        shapes.append((size[1], size[0]))
    if not jpegs:
        return {}
    out = {JPEG: _objects(jpegs), RGB: _objects(rgbs), RGB_SHAPE: np.asarray(shapes, dtype=np.int64)}
    for key, (box_rows, flip_rows) in plans.items():
        out[BOX + key], out[FLIP + key] = np.stack(box_rows), np.stack(flip_rows)
    return out


def _objects(values: list[bytes]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class DeviceViews:
    """The worker's half: a planned batch (numpy, from :func:`plan_rows`) -> the method's finished uint8 views on
    ``device``, keyed and shaped as the CPU path's (``(B, 3, S, S)``, ``(B, n, 3, S, S)`` for local crops)."""

    def __init__(self, views: Views, device: torch.device) -> None:
        self.views, self.device = views, device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        images = self.images(batch)
        keep = [i for i, image in enumerate(images) if image is not None]
        if not keep:  # every image refused: no batch (the stream skips it), as the CPU path drops it
            return {}
        crops = {}
        for key, spec in self.views.specs.items():
            boxes, flips = batch[BOX + key], batch[FLIP + key]
            crops[key] = torch.stack([spec.on_device(images[i], boxes[i], flips[i]) for i in keep])  # type: ignore[arg-type]
        return self.views.colour_tensors(crops)

    def images(self, batch: dict[str, np.ndarray]) -> list[torch.Tensor | None]:
        """Each row's image, uint8 (3, H, W) on the device: the JPEGs decoded in one call there (Pillow takes one
        the device decoder refuses), the task's pixels moved there; None for one that no decoder reads."""
        jpegs = [bytes(j) for j in batch[JPEG]]
        rows = [i for i, data in enumerate(jpegs) if data]
        images: list[torch.Tensor | None] = [None] * len(jpegs)
        for i, image in zip(rows, decode_jpegs([jpegs[i] for i in rows], self.device), strict=True):
            images[i] = image if image is not None else self._pillow(jpegs[i])
        for i, (rgb, (h, w)) in enumerate(zip(batch[RGB], batch[RGB_SHAPE], strict=True)):
            if not jpegs[i]:
                pixels = np.frombuffer(bytes(rgb), dtype=np.uint8).reshape(int(h), int(w), 3)
                images[i] = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).to(self.device)
        return images

    def _pillow(self, data: bytes) -> torch.Tensor | None:
        try:
            pixels = np.asarray(decode_rgb(data), dtype=np.uint8)  # whole: the boxes were drawn on the full size
        except DecodeError as exc:
            _log.warning("pretraining skips an image it cannot decode: %s", exc)
            return None
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()).to(self.device)
