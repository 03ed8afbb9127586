"""The colour half of the training views, on a whole batch of crops at once, each crop with its own random draw.

DINOv2's colour augmentations (``dinov2/data/augmentations.py``; SimCLR's at strength 1): colour jitter (brightness,
contrast, saturation, hue) with probability 0.8, grayscale 0.2, Gaussian blur (sigma 0.1-2) and solarize at the
view's probabilities. torchvision applies them one image and one op at a time; on 32 px crops that per-call overhead,
not the arithmetic, took most of the view time (the demo preset on 200-500 px photos: ~12 ms an image), so here each
op is a few tensor operations over all N crops with per-crop parameters. The one difference from torchvision: the
four jitter ops run in one random order per batch rather than per image.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's and torchvision's grayscale
Jitter = tuple[float, float, float, float]  # brightness, contrast, saturation, hue strengths


@dataclasses.dataclass(frozen=True)
class ColourOps:
    """One view's colour recipe: jitter strengths (brightness, contrast, saturation, hue), probabilities, blur."""

    jitter: Jitter
    p_jitter: float = 0.8
    p_gray: float = 0.2
    p_blur: float = 0.0
    blur_kernel: int = 9
    p_solarize: float = 0.0

    def __call__(self, crops: Tensor) -> Tensor:
        """crops (N, 3, H, W) uint8 -> (N, 3, H, W) uint8, each crop with its own draws."""
        x = crops.float() / 255.0
        x = _where(_draw(x, self.p_jitter), jitter(x, self.jitter), x)
        x = _where(_draw(x, self.p_gray), gray(x).expand_as(x), x)
        if self.p_blur > 0:
            x = _where(_draw(x, self.p_blur), blur(x, self.blur_kernel), x)
        if self.p_solarize > 0:
            x = _where(_draw(x, self.p_solarize), torch.where(x >= 128 / 255, 1.0 - x, x), x)
        return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _draw(x: Tensor, p: float) -> Tensor:
    return torch.rand(x.shape[0], device=x.device) < p


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def _factors(x: Tensor, strength: float) -> Tensor:
    """Per-crop factors uniform in [1 - s, 1 + s], shaped (N, 1, 1, 1)."""
    return torch.empty(x.shape[0], 1, 1, 1, device=x.device).uniform_(max(0.0, 1 - strength), 1 + strength)


def gray(x: Tensor) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> luma (N, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def jitter(x: Tensor, strength: Jitter) -> Tensor:
    """torchvision's ColorJitter with per-crop factors; the four ops in one random order."""
    b, c, s, h = strength
    for op in torch.randperm(4).tolist():
        if op == 0 and b > 0:
            x = (x * _factors(x, b)).clamp(0, 1)
        elif op == 1 and c > 0:
            mean = gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = torch.lerp(mean, x, _factors(x, c)).clamp(0, 1)
        elif op == 2 and s > 0:
            x = torch.lerp(gray(x), x, _factors(x, s)).clamp(0, 1)
        elif op == 3 and h > 0:
            x = shift_hue(x, torch.empty(x.shape[0], 1, 1, device=x.device).uniform_(-h, h))
    return x


def shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of (N, 3, H, W) in [0, 1] by ``shift`` (N, 1, 1) turns, through HSV."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    lo, _ = x.min(1)
    chroma = v - lo
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift) % 1.0
    sat = torch.where(v > 0, chroma / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return _hsv_to_rgb(hue, sat, v)


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)  # (N, 3, H, W)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def blur(x: Tensor, kernel: int, sigma: tuple[float, float] = (0.1, 2.0)) -> Tensor:
    """Gaussian blur with a per-crop sigma uniform in ``sigma``: a separable, reflect-padded ``kernel`` taps."""
    n, c, height, width = x.shape
    sigmas = torch.empty(n, 1, device=x.device).uniform_(*sigma)
    taps = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    weights = torch.exp(-0.5 * (taps / sigmas) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N C, k)
    pad = kernel // 2
    mode = "reflect" if pad < min(height, width) else "replicate"  # reflect needs the pad inside the crop
    flat = x.reshape(1, n * c, height, width)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode=mode), weights.view(n * c, 1, 1, kernel), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode=mode), weights.view(n * c, 1, kernel, 1), groups=n * c)
    return flat.view(n, c, height, width)
