"""Teacher targets for DINO and iBOT: softmax centering (DINO, Caron et al. 2021) or Sinkhorn-Knopp (SwAV, Caron et
al. 2020; used by DINOv2 for large models).

Both turn teacher head logits ``(..., K)`` into probabilities over K prototypes. They prevent collapse in opposite
ways: centering subtracts a running mean of the logits so that no prototype dominates on average; Sinkhorn-Knopp
rescales the batch's assignment matrix so that every prototype receives an equal share of the batch.

Everything here runs in float32 and without gradients: the teacher is never trained by back-propagation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

CENTERING_METHODS = ("sinkhorn_knopp", "softmax")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Balanced soft assignment of samples to prototypes (SwAV's Sinkhorn-Knopp, as DINOv2's teacher).

    teacher_logits: (N, K) (any leading shape ``(..., K)`` is flattened to N rows and restored) -> probabilities of
    the same shape, float32. Each row sums to 1; each column (prototype) sums to about ``N / K`` (exactly in the limit
    of many iterations). Starting from ``Q = exp(logits / teacher_temp)``, each iteration scales the prototype sums
    to ``1 / K`` and then the sample sums to ``1 / N``; the result is multiplied by N.

    Under torch.distributed the total, the per-prototype sums and N are all-reduced, so the balance holds over the
    global batch (DINOv2 multiplies N by the world size; summing N instead also allows per-rank counts that differ,
    as the number of masked patches does). Every rank must call this together.
    """
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be positive, got {teacher_temp}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    shape = teacher_logits.shape
    scores = teacher_logits.detach().reshape(-1, shape[-1]).float() / teacher_temp
    n_samples, n_prototypes = scores.shape
    distributed = _distributed()

    # Subtracting the global maximum changes nothing (the first step divides by the total) but keeps exp finite for
    # logits that are not cosine similarities.
    peak = scores.max() if scores.numel() else scores.new_zeros(())
    if distributed:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    q = torch.exp(scores - peak).t()  # (K, N): prototypes as rows, as in the SwAV paper
    n_total = torch.tensor(float(n_samples), device=q.device)
    total = q.sum()
    if distributed:
        dist.all_reduce(n_total)
        dist.all_reduce(total)
    # A prototype or sample whose every entry underflowed would give 0 / 0; the floor keeps it at 0 instead of NaN.
    tiny = torch.finfo(q.dtype).tiny
    q /= total.clamp_min(tiny)
    for _ in range(n_iterations):
        per_prototype = q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(per_prototype)
        q /= per_prototype.clamp_min(tiny) * n_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny) * n_total
    q *= n_total
    return q.t().reshape(shape)


class SoftmaxCenter(nn.Module):
    """DINO's teacher centering: ``softmax((logits - center) / temp)`` with ``center`` an EMA of the batch mean.

    ``center``: (1, K) float32 buffer, zero at the start. Use one instance per head output (DINO CLS, iBOT patches).
    Call :meth:`probs` first and :meth:`update` after with the same logits, as DINOv2 does: the targets of a batch
    use the centre of the batches before it. Training calls :meth:`accumulate` per micro-batch and :meth:`commit`
    once per optimizer step (DINO, DINOv2 with softmax centering).
    """

    center: Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: Tensor | None = None  # (K + 1,): summed logits and the row count, since the last commit()

    @torch.no_grad()
    def probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """(..., K) logits -> (..., K) float32 probabilities, centred and sharpened by ``teacher_temp``."""
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be positive, got {teacher_temp}")
        return F.softmax((teacher_logits.detach().float() - self.center.float()) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """``center = momentum * center + (1 - momentum) * mean(teacher_logits)`` over all rows ``(..., K)``.

        Under torch.distributed the sum and the row count are all-reduced (one collective), so the mean is over the
        global batch even when ranks hold different numbers of rows (masked patches). Every rank must call this.
        Same as :meth:`accumulate` then :meth:`commit`.
        """
        self.accumulate(teacher_logits)
        self.commit()

    @torch.no_grad()
    def accumulate(self, teacher_logits: Tensor) -> None:
        """Add ``(..., K)`` logits to the pending sum and row count (no collective, centre unchanged).

        With gradient accumulation the micro-batches of one optimizer step each call this, and :meth:`commit` runs
        once after the step: the centre then moves by the mean over the whole step's batch, as one large batch
        would move it. The pending sum is not part of the state dict (it is empty between steps).
        """
        rows = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).float()
        if rows.shape[1] != self.center.shape[1]:
            raise ValueError(f"teacher_logits has {rows.shape[1]} prototypes, the center {self.center.shape[1]}")
        # Sum and count travel in one tensor: one all-reduce instead of two.
        packed = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
        self._pending = packed if self._pending is None else self._pending + packed.to(self._pending)

    @torch.no_grad()
    def commit(self) -> None:
        """Move the centre by the mean of the rows accumulated since the last call (all-reduced under
        torch.distributed; every rank must call this), then clear them. Nothing pending: no change."""
        packed, self._pending = self._pending, None
        if packed is None:
            packed = torch.zeros(self.center.shape[1] + 1, device=self.center.device)
        if _distributed():
            dist.all_reduce(packed)
        count = packed[-1]
        batch_mean = (packed[:-1] / count.clamp_min(1.0)).unsqueeze(0).to(self.center)
        # An empty batch (no masked patch anywhere) leaves the centre as it is; a tensor weight avoids a host sync.
        weight = (count > 0).to(self.center) * (1.0 - self.momentum)
        self.center.lerp_(batch_mean, weight)


def teacher_probs(
    teacher_logits: Tensor,
    teacher_temp: float,
    method: str,
    center: SoftmaxCenter | None,
    *,
    n_iterations: int = 3,
    update_center: bool = False,
) -> Tensor:
    """Teacher targets by ``method`` in :data:`CENTERING_METHODS`. (..., K) logits -> (..., K) float32 probabilities.

    ``"softmax"`` needs ``center``; with ``update_center=True`` it is updated with these logits after they are
    centred (otherwise call ``center.update(teacher_logits)`` yourself). ``"sinkhorn_knopp"`` ignores ``center``.
    """
    if method == "sinkhorn_knopp":
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=n_iterations)
    if method == "softmax":
        if center is None:
            raise ValueError('method "softmax" needs a SoftmaxCenter, got center=None')
        probs = center.probs(teacher_logits, teacher_temp)
        if update_center:
            center.update(teacher_logits)
        return probs
    raise ValueError(f"unknown centering method {method!r}; valid: {CENTERING_METHODS}")
