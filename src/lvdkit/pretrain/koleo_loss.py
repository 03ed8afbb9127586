"""KoLeo regulariser: the Kozachenko-Leonenko differential-entropy estimator as a loss (Sablayrolles et al. 2019,
"Spreading vectors for similarity search"; DINOv2, Oquab et al. 2023, section 4).

On the unit sphere, ``-mean_i log(min_{j != i} ||x_i - x_j||)`` is, up to constants, minus the entropy estimate of
the batch: minimising it pushes every point away from its nearest neighbour and spreads features uniformly. DINOv2
applies it with weight 0.1 to the student's L2-normalised backbone CLS tokens, separately per global-crop chunk (two
crops of one image would otherwise be each other's nearest neighbour).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nearest_neighbours(x: Tensor) -> Tensor:
    """x: (B, D) L2-normalised rows -> (B,) int64 index of each row's nearest other row (largest inner product)."""
    with torch.no_grad():
        dots = x @ x.t()
        # -inf rather than -1 on the diagonal: with B = 2 antipodal points every other product is -1 too.
        dots.fill_diagonal_(float("-inf"))
        return dots.argmax(dim=1)


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """``-mean_i log(||x_i - x_nn(i)|| + eps)`` on L2-normalised rows. x: (B, D), B >= 2 -> float32 scalar.

    The neighbour is picked without gradient, as in DINOv2; the distance carries the gradient. Distances use
    ``F.pairwise_distance`` (which adds ``eps`` to the difference), so duplicate rows give a large finite loss and
    finite gradients rather than log(0). Computed in float32 with autocast off: the log of small distances is
    precision-sensitive.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (B, D), got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 rows (each needs a neighbour), got {x.shape[0]}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        neighbours = nearest_neighbours(x)
        distances = F.pairwise_distance(x, x[neighbours], p=2, eps=eps)
        return -torch.log(distances + eps).mean()
