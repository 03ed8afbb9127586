"""Pillow's resize of a box, as two matrix products on any torch device: the geometry the CPU and GPU paths share.

``Image.resize(size, resample, box)`` computes, per output column (then per output row), a weighted sum of source
pixels: the filter (bilinear: a triangle of support 1; bicubic: Keys' cubic with a = -0.5, support 2) is stretched by
the scale when it shrinks (antialiasing), centred at ``box_start + (i + 0.5) * scale``, clipped to the image and
normalised to sum 1 (Pillow's ``precompute_coeffs`` in ``Resample.c``). Here the same weights are built as dense
``[out, in]`` matrices per axis, on the image's device, for several boxes of one image at once, so the crops of an
image cost two batched matrix products, horizontal pass first and rounded to uint8 between the passes, as Pillow
does. Pillow sums in fixed point (weights rounded to multiples of 2^-22); here the same rounded weights are summed
in float64 on a CPU, which holds those sums exactly (float32 on a GPU). The installed Pillow (13.0) runs the
vertical pass first for some sizes (its choice was not worked out here; its source of August 2026 always goes
horizontal first); for those the two differ by 1-2 levels on some pixels. Measured on the demo's 2,823 plain JPEGs:
SSCD's 288 px squash identical for all; a ViT's 224 px centre crop identical for 2,822, the other 1-2 levels off on
4% of its pixels. ``tests/core/test_resample.py`` holds the two side by side. (Plain float32 weights, tried first,
left 1-2% of pixels off by 1-2 levels on most images, and SSCD's int8 model turned that into cosines down to 0.99.)

A mirrored output is the same matrix with its rows reversed, so a flip costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
_ONE = float(1 << 22)  # Pillow's PRECISION_BITS for 8-bit images: 32 - 8 - 2
Box = tuple[float, float, float, float]  # left, top, right, bottom (Pillow's ``box``)


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    x = x.abs()
    if interpolation == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5  # Pillow's (and Keys') bicubic
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def weights(in_size: int, start: torch.Tensor, end: torch.Tensor, out_size: int, interpolation: str) -> torch.Tensor:
    """float64 ``[K, out_size, in_size]`` on ``start``'s device: for each of K spans ``[start, end)`` (float64
    ``[K]``) row i holds the weights of the source pixels of output pixel i (Pillow's coefficients, rows summing
    to 1)."""
    if interpolation not in SUPPORT:
        raise ValueError(f"interpolation must be one of {tuple(SUPPORT)}, got {interpolation!r}")
    if out_size < 1 or in_size < 1 or not bool((end > start).all()):
        raise ValueError(f"cannot resize spans of {in_size} pixels to {out_size}: every end must pass its start")
    dev = start.device
    scale = ((end - start) / out_size)[:, None]  # [K, 1]
    stretch = scale.clamp(min=1.0)
    support = SUPPORT[interpolation] * stretch
    centre = start[:, None] + (torch.arange(out_size, device=dev, dtype=torch.float64) + 0.5) * scale  # [K, out]
    # Pillow truncates centre -/+ support + 0.5 toward zero for the first and one-past-last taps
    first = torch.trunc(centre - support + 0.5).clamp(min=0)[..., None]
    last = torch.trunc(centre + support + 0.5).clamp(max=in_size)[..., None]
    x = torch.arange(in_size, device=dev, dtype=torch.float64)  # [in]
    w = _filter((x - centre[..., None] + 0.5) * (1.0 / stretch[..., None]), interpolation)  # [K, out, in], as Pillow
    w = torch.where((x >= first) & (x < last), w, torch.zeros_like(w))
    total = w.sum(-1, keepdim=True)
    return torch.where(total != 0, w / torch.where(total != 0, total, 1.0), torch.zeros_like(w))


def resize_boxes(
    image: torch.Tensor,
    boxes: Sequence[Box],
    size: tuple[int, int],
    interpolation: str,
    flips: Sequence[bool] | None = None,
) -> torch.Tensor:
    """uint8 ``[C, H, W]`` on any device -> uint8 ``[K, C, size[0], size[1]]``: each of the K ``boxes`` of ``image``
    resized as Pillow's ``resize((w, h), resample, box=box)`` does (mirrored left-right where ``flips`` says)."""
    _, height, width = image.shape
    out_h, out_w = size
    dev = image.device
    b = torch.tensor(boxes, dtype=torch.float64, device=dev).view(-1, 4)  # [K, 4]
    wx = weights(width, b[:, 0], b[:, 2], out_w, interpolation)  # [K, out_w, W]
    wy = weights(height, b[:, 1], b[:, 3], out_h, interpolation)  # [K, out_h, H]
    if flips is not None and any(flips):
        mirrored = torch.tensor(list(flips), device=dev).view(-1, 1, 1)
        wx = torch.where(mirrored, wx.flip(1), wx)
    # float64 holds Pillow's integer sums exactly; a GPU sums in float32 (fast there; off only where a sum lies
    # within ~1e-5 of a rounding tie, and nvJPEG's decode differs from libjpeg-turbo's more than that anyway)
    dtype = torch.float64 if image.device.type == "cpu" else torch.float32
    src = image.to(dtype)
    across = _levels(torch.einsum("kow,chw->kcho", _fixed_point(wx, dtype), src))  # [K, C, H, out_w]
    out = _levels(torch.einsum("kph,kcho->kcpo", _fixed_point(wy, dtype), across))  # [K, C, out_h, out_w]
    return out.to(torch.uint8)


def _fixed_point(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pillow's 8-bit coefficients: each weight rounded (half away from zero) to a multiple of 2^-22."""
    return (torch.trunc(w * _ONE + torch.where(w < 0, -0.5, 0.5)) / _ONE).to(dtype)


def _levels(sums: torch.Tensor) -> torch.Tensor:
    """A pass's sums -> Pillow's uint8 levels: rounded half up ((sum + 2^21) >> 22 in its fixed point), clipped."""
    return torch.floor(sums + 0.5).clamp_(0, 255)


def resize_box(
    image: torch.Tensor, box: Box, size: tuple[int, int], interpolation: str, flip: bool = False
) -> torch.Tensor:
    """uint8 ``[C, H, W]`` -> uint8 ``[C, size[0], size[1]]``: one box of :func:`resize_boxes`."""
    return resize_boxes(image, [box], size, interpolation, [flip])[0]
