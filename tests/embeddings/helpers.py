"""What the embedders compute, written out plainly in torch, for tests to compare against."""

from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def imagenet_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W], (x / 255 - mean) / std."""
    x = torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2).float() / 255
    return (x - IMAGENET_MEAN) / IMAGENET_STD
