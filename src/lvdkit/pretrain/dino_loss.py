"""DINO's image-level self-distillation loss (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers"; DINOv2, Oquab et al. 2023, section 4).

The student's softmax over K prototypes, at temperature ``student_temp``, is trained to match the teacher's
(centred, sharpened) distribution of *another* view of the same image, by cross-entropy.

Crop convention (DINO's and DINOv2's): the teacher sees the T global crops, the student sees the same T global crops
first and then the local crops, in that order along the crop axis. A student global crop is never matched to the
teacher's output for the same crop (that pair is trivial), so with T = 2 global and L local crops the loss averages
2 + 2 L pairs: (s0, t1), (s1, t0) and every local crop with both teacher crops. DINOv2 reaches the same pairs by
swapping the teacher's two global crops (A matched to B) and divides the summed pair losses by ``2 + 2 L``; this
function is that mean. (DINOv2 divides by ``2 + max(2 L, 1)`` so, with no local crop at all, its loss is 2/3 of
this mean; a loss weight absorbs the difference.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dino_loss(
    student_logits: Tensor, teacher_probs: Tensor, student_temp: float = 0.1, skip_same_view: bool = True
) -> Tensor:
    """Mean over crop pairs (s, t) of the batch-mean cross-entropy ``-sum_k p_t[k] log softmax(z_s / student_temp)[k]``.

    student_logits: (S, B, K), S student crops (the T global crops first, in the teacher's order, then the locals)
    of B images; raw head outputs. teacher_probs: (T, B, K), teacher probabilities (rows sum to 1), treated as
    constants. With ``skip_same_view`` the pairs s == t for s < T are left out; otherwise all S * T pairs count.
    Returns a float32 scalar.
    """
    if student_logits.ndim != 3 or teacher_probs.ndim != 3:
        raise ValueError(
            f"expected student_logits (S, B, K) and teacher_probs (T, B, K), got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_probs.shape)}"
        )
    n_student, batch, n_prototypes = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != (batch, n_prototypes):
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_probs {tuple(teacher_probs.shape)} differ in "
            "batch size or number of prototypes"
        )
    if batch == 0:
        raise ValueError("dino_loss needs at least one image (B = 0)")
    if student_temp <= 0:
        raise ValueError(f"student_temp must be positive, got {student_temp}")
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    # (T, S) matrix of batch-mean cross-entropies, from one contraction instead of a Python loop over pairs.
    cross_entropy = -torch.einsum("tbk,sbk->ts", teacher_probs.detach().float(), log_p) / batch
    n_pairs = n_teacher * n_student
    if skip_same_view:
        # Entries (i, i) for i < min(S, T): the student's crop i against the teacher's output for that crop.
        n_pairs -= min(n_teacher, n_student)
        same_view = torch.eye(n_teacher, n_student, dtype=torch.bool, device=cross_entropy.device)
        cross_entropy = cross_entropy.masked_fill(same_view, 0.0)
    if n_pairs == 0:
        raise ValueError(f"no crop pair left to compare with S={n_student}, T={n_teacher}, skip_same_view=True")
    return cross_entropy.sum() / n_pairs
