"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, "A Simple Framework for
Contrastive Learning of Visual Representations", section 2.1, eq. 1).

For 2N projections of N images (two views each), every projection's positive is the other view of its image and its
negatives are the other 2N - 2 projections of the batch::

    l(i, j) = -log( exp(sim(z_i, z_j) / T) / sum_{k != i} exp(sim(z_i, z_k) / T) ),   sim = cosine similarity

and the loss is the mean of l over all 2N (i, j) positive pairs, both orders. Under torch.distributed the negatives
are the global batch (SimCLR gathers them across its TPU cores): projections are all-gathered with their gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _gather(x: Tensor) -> tuple[Tensor, int]:
    """(B, D) -> the (W B, D) concatenation over ranks (with gradients to every rank's rows) and this rank's index."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x)), dist.get_rank()


def nt_xent_loss(z_a: Tensor, z_b: Tensor, temperature: float = 0.1) -> Tensor:
    """Mean NT-Xent over the 2B positive pairs of ``z_a`` (B, D) and ``z_b`` (B, D), the projections of the two
    views (row i of each is image i); they are L2-normalised here. Returns a float32 scalar.

    Each rank must hold the same B under torch.distributed (DDP's full batches do).
    """
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(f"expected two (B, D) tensors of one shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if z_a.shape[0] < 1:
        raise ValueError("nt_xent_loss needs at least one image (B = 0)")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    a = F.normalize(z_a.float(), dim=-1)
    b = F.normalize(z_b.float(), dim=-1)
    all_a, rank = _gather(a)
    all_b, _ = _gather(b)
    n, n_all = a.shape[0], all_a.shape[0]
    candidates = torch.cat([all_a, all_b])  # (2 W B, D): every view-a row, then every view-b row
    logits = torch.cat([a, b]) @ candidates.T / temperature  # (2B, 2 W B)
    mine = rank * n + torch.arange(n, device=a.device)  # this rank's images in the global order
    self_index = torch.cat([mine, n_all + mine])  # a_i is column mine_i, b_i is column n_all + mine_i
    positive = torch.cat([n_all + mine, mine])  # a_i's positive is b_i and b_i's is a_i
    rows = torch.arange(2 * n, device=a.device)
    logits = logits.index_put((rows, self_index), logits.new_tensor(float("-inf")))  # never one's own positive
    return F.cross_entropy(logits, positive)
