"""JPEGs decoded and resized where the model runs: nvJPEG on a GPU (``torchvision.io.decode_jpeg``), libjpeg-turbo on
a CPU; everything else through Pillow.

At the rate a GPU embeds (thousands of images a second) Pillow on the node's cores cannot keep up, so with
``embed.decode: device`` (``auto`` on GPU actors) the CPU decode tasks only read the files and check each header:
a plain JPEG (RGB or grayscale, no EXIF rotation, within ``max_pixels``) travels as its bytes and the model actor
decodes a whole batch in one call on its device, then resizes it with :func:`lvdkit.core.resample.resize_box`, the
same box (:meth:`Preprocess.source_box`) and filter as Pillow's :meth:`Preprocess.prepare`. A JPEG sampled for
a synthetic copy (``embed.calibration_copies``) is decoded by Pillow, which makes the copy. Anything else (PNG, CMYK,
rotated, or bytes the device decoder refuses) is decoded by Pillow under its usual rules.

On a CPU the two paths give the same pixels (torchvision's libjpeg-turbo decodes exactly as Pillow's; the resize
uses Pillow's fixed-point weights) but for rare 1-2 level differences (:mod:`lvdkit.core.resample` says when);
nvJPEG's IDCT differs a little more on a GPU, which ``bench/gpu_check.py`` measures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from lvdkit.core import schema
from lvdkit.core.device_jpeg import decode_jpegs, plain_jpeg
from lvdkit.core.resample import resize_box
from lvdkit.embeddings.part_decode import JPEG_COLUMN, PIXELS_PREFIX, decode_input
from lvdkit.embeddings.preprocess import Preprocess

if TYPE_CHECKING:
    import torch

__all__ = ["decode_jpegs", "device_images", "model_input", "plain_jpeg", "prepare_tensor"]


def prepare_tensor(image: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 ``[3, H, W]`` on any device -> uint8 ``[h, w, 3]`` as :meth:`Preprocess.prepare` makes it from the same
    pixels (same box, same filter, same fixed-point arithmetic)."""
    _, height, width = image.shape
    box = preprocess.source_box(width, height)
    return resize_box(image, box, preprocess.size, preprocess.interpolation).permute(1, 2, 0)


def device_images(cols: dict[str, np.ndarray], device: torch.device, max_pixels: int) -> list[torch.Tensor]:
    """A decoded batch's JPEG rows (``jpeg`` column) decoded on ``device`` in one call, uint8 ``[3, H, W]`` each
    (Pillow decodes one the device decoder refuses, under its usual errors); [] when Pillow prepared every row."""
    jpegs = cols.get(JPEG_COLUMN)
    if jpegs is None or all(j is None for j in jpegs):
        return []
    import torch

    rows = [i for i, j in enumerate(jpegs) if j is not None]
    decoded = decode_jpegs([jpegs[i] for i in rows], device)
    images = []
    for i, image in zip(rows, decoded, strict=True):
        if image is None:
            rgb = np.asarray(decode_input(jpegs[i], cols[schema.URI][i], max_pixels))
            image = torch.from_numpy(rgb.transpose(2, 0, 1).copy()).to(device)
        images.append(image)
    return images


def model_input(
    cols: dict[str, np.ndarray], images: list[torch.Tensor], key: str, preprocess: Preprocess, device: torch.device
) -> np.ndarray | torch.Tensor:
    """Model ``key``'s uint8 ``[B', H, W, 3]`` batch: the numpy pixels when Pillow prepared every row, else a tensor
    on ``device``: Pillow's rows moved there, the device-decoded ``images`` resized there (:func:`prepare_tensor`)."""
    pixels = cols[PIXELS_PREFIX + key]
    if not images:
        return pixels
    import torch

    on_cpu = np.asarray([j is None for j in cols[JPEG_COLUMN]])
    batch = torch.empty((len(on_cpu), *preprocess.size, 3), dtype=torch.uint8, device=device)
    if on_cpu.any():
        batch[torch.from_numpy(np.flatnonzero(on_cpu))] = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    for i, image in zip(np.flatnonzero(~on_cpu), images, strict=True):
        batch[int(i)] = prepare_tensor(image, preprocess)
    return batch
