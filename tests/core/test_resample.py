"""The tensor resize the GPU paths use equals Pillow's resize of the same box within 1 grey level (CPU here, the
same code runs on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lvdkit.core.resample import resize_box, resize_boxes, weights

_PIL = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _image(seed: int, height: int, width: int) -> np.ndarray:
    """Smooth structure plus noise: flat areas and edges, as photographs have."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 100 * np.sin(x[..., None] / (3 + seed) + np.arange(3)) * np.cos(y[..., None] / 7)
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
    ("shape", "box", "size"),
    [
        ((300, 451), (0.0, 0.0, 451.0, 300.0), (288, 288)),  # squash, shrinking
        ((300, 451), (75.5, 0.0, 375.5, 300.0), (224, 224)),  # centre crop box with a half-pixel edge
        ((37, 53), (3.25, 2.5, 40.75, 30.0), (80, 64)),  # enlarging a fractional box
        ((512, 384), (10.0, 200.0, 300.0, 500.0), (98, 98)),  # a small random-resized crop
    ],
)
@pytest.mark.parametrize("flip", [False, True])
def test_resize_box_equals_pillow_within_one_grey_level(
    interpolation: str,
    shape: tuple[int, int],
    box: tuple[float, float, float, float],
    size: tuple[int, int],
    flip: bool,
) -> None:
    pixels = _image(len(box) + shape[0], *shape)
    ref = Image.fromarray(pixels).resize((size[1], size[0]), _PIL[interpolation], box=box)
    if flip:
        ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = resize_box(torch.from_numpy(pixels).permute(2, 0, 1), box, size, interpolation, flip=flip)
    diff = np.abs(out.permute(1, 2, 0).numpy().astype(int) - np.asarray(ref, dtype=int))
    assert out.dtype == torch.uint8 and out.shape == (3, *size)
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.01  # Pillow's integer arithmetic; rare ties round the other way


def _span(start: float, end: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([start], dtype=torch.float64), torch.tensor([end], dtype=torch.float64)


def test_weights_are_pillows_stretched_filter() -> None:
    w = weights(8, *_span(0.0, 8.0), 8, "bilinear")[0].numpy()
    assert np.allclose(w, np.eye(8))  # same size: the identity
    half = weights(8, *_span(0.0, 8.0), 4, "bilinear")[0].numpy()  # shrinking by 2: the triangle spans 2 pixels
    assert np.allclose(half.sum(axis=1), 1.0)
    assert np.allclose(half[1, 1:5], [0.125, 0.375, 0.375, 0.125])
    with pytest.raises(ValueError, match="interpolation"):
        weights(8, *_span(0.0, 8.0), 4, "lanczos")


def test_several_boxes_of_one_image_at_once_equal_each_alone() -> None:
    pixels = torch.from_numpy(_image(7, 120, 90)).permute(2, 0, 1)
    boxes = [(0.0, 0.0, 90.0, 120.0), (10.0, 20.0, 50.0, 70.0), (33.5, 1.0, 89.0, 119.5)]
    flips = [False, True, False]
    together = resize_boxes(pixels, boxes, (32, 32), "bicubic", flips)
    for k, (box, flip) in enumerate(zip(boxes, flips, strict=True)):
        assert torch.equal(together[k], resize_box(pixels, box, (32, 32), "bicubic", flip))
