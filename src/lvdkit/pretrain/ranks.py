"""What the ranks of a torch.distributed run share: rows gathered from every rank, and a check that the replicas of
a data-parallel model still hold the same weights.

DDP keeps replicas equal only as long as every rank applies the same averaged gradient to the same weights; a rank
that updated a parameter outside autograd (or a buffer DDP does not broadcast) drifts silently. The check turns that
into an error naming the step.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    """Ranks in the default process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather_rows(x: Tensor) -> Tensor:
    """(B_r, ...) on each rank -> (sum B_r, ...) on every rank, rank 0's rows first (no gradient). Ranks may hold
    different B_r. Without a process group, ``x`` itself. Every rank must call this together."""
    world = world_size()
    if world == 1:
        return x
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(x.shape[0], device=x.device))
    longest = int(max(int(s) for s in sizes))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)])


@torch.no_grad()
def parameter_digest(module: nn.Module) -> str:
    """A hash of every parameter's name, dtype, shape and bytes: equal digests, bit-identical weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in module.named_parameters():
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas(module: nn.Module, step: int) -> int:
    """Raise when the ranks' copies of ``module`` differ (a data-parallel run that drifted); returns the number of
    ranks compared. Every rank must call this together."""
    world = world_size()
    if world == 1:
        return 1
    digests: list[str | None] = [None] * world
    dist.all_gather_object(digests, parameter_digest(module))
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"the ranks' model replicas differ at step {step} (parameter digests by rank: {digests}): "
            "a data-parallel run must apply the same update on every rank"
        )
    return world
