"""iBOT's masked-patch loss (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer"; DINOv2, Oquab
et al. 2023, section 4).

The student sees a global crop with some patch tokens replaced by a mask token; at each masked position it must
predict the teacher's (centred, sharpened) prototype distribution for the unmasked crop. Each image weighs the same
whatever its number of masked patches: a masked patch counts ``1 / n_masked(image)``.

Normalisation: ``denominator="masked"`` (default) averages over the images that have at least one masked patch.
``denominator="all"`` divides by every image in the batch, masked or not, as DINOv2's ``iBOTPatchLoss`` does; with
half the global crops masked (``mask_probability=0.5``) DINOv2's value is half the default's.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Denominator = Literal["masked", "all"]
DENOMINATORS: tuple[Denominator, ...] = ("masked", "all")


def _check_denominator(denominator: str) -> None:
    if denominator not in DENOMINATORS:
        raise ValueError(f"unknown denominator {denominator!r}; valid: {DENOMINATORS}")


def _normalise(weighted_sum: Tensor, masks: Tensor, denominator: str) -> Tensor:
    if denominator == "all":
        return weighted_sum / max(masks.shape[0], 1)
    # Images without a masked patch contribute nothing; clamp keeps an all-unmasked batch at 0 rather than 0 / 0.
    n_images = masks.any(dim=-1).sum().clamp_min(1)
    return weighted_sum / n_images


def masked_patch_weights(masks: Tensor) -> Tensor:
    """masks: bool (B, N) -> (M,) float32 weights ``1 / n_masked(image)`` of the M masked patches, in the row-major
    order of ``masks.nonzero()`` (the order of ``tokens.flatten(0, 1)[masks.flatten()]``)."""
    if masks.dtype != torch.bool or masks.ndim != 2:
        raise ValueError(f"masks must be bool (B, N), got {masks.dtype} {tuple(masks.shape)}")
    per_image = 1.0 / masks.sum(dim=-1, keepdim=True).clamp_min(1).float()
    return per_image.expand_as(masks)[masks]


def ibot_loss(
    student_patch_logits: Tensor,
    teacher_patch_probs: Tensor,
    masks: Tensor,
    student_temp: float = 0.1,
    *,
    denominator: Denominator = "masked",
) -> Tensor:
    """Cross-entropy at masked positions, each image's masked patches averaged, then averaged over images.

    student_patch_logits: (B, N, K) head outputs for the student's (masked) global crops, B crops of N patches.
    teacher_patch_probs: (B, N, K) teacher probabilities for the same crops unmasked (rows sum to 1), constants.
    masks: bool (B, N), True where the student's patch was masked. Unmasked positions are ignored whatever their
    values. Returns a float32 scalar: 0 (still connected to the graph) when nothing is masked.
    """
    if student_patch_logits.ndim != 3 or student_patch_logits.shape != teacher_patch_probs.shape:
        raise ValueError(
            f"expected student_patch_logits and teacher_patch_probs of one shape (B, N, K), got "
            f"{tuple(student_patch_logits.shape)} and {tuple(teacher_patch_probs.shape)}"
        )
    if masks.dtype != torch.bool or masks.shape != student_patch_logits.shape[:2]:
        raise ValueError(
            f"masks must be bool (B, N) = {tuple(student_patch_logits.shape[:2])}, got {masks.dtype} "
            f"{tuple(masks.shape)}"
        )
    # Gathering the masked rows leaves unmasked teacher entries (which may hold anything) out of the sum entirely.
    return ibot_loss_masked(
        student_patch_logits[masks], teacher_patch_probs[masks], masks, student_temp, denominator=denominator
    )


def ibot_loss_masked(
    student_masked_logits: Tensor,
    teacher_masked_probs: Tensor,
    masks: Tensor,
    student_temp: float = 0.1,
    *,
    denominator: Denominator = "masked",
) -> Tensor:
    """:func:`ibot_loss` for pre-gathered masked tokens: the head runs on the M masked patches only, as in DINOv2.

    student_masked_logits, teacher_masked_probs: (M, K), rows in the order of ``masks.nonzero()`` (row-major, i.e.
    ``tokens.flatten(0, 1)[masks.flatten()]``), M = ``masks.sum()``. masks: bool (B, N). Same value as
    :func:`ibot_loss` on the scattered tokens.
    """
    if student_masked_logits.ndim != 2 or student_masked_logits.shape != teacher_masked_probs.shape:
        raise ValueError(
            f"expected student_masked_logits and teacher_masked_probs of one shape (M, K), got "
            f"{tuple(student_masked_logits.shape)} and {tuple(teacher_masked_probs.shape)}"
        )
    if student_temp <= 0:
        raise ValueError(f"student_temp must be positive, got {student_temp}")
    _check_denominator(denominator)
    weights = masked_patch_weights(masks)
    if weights.shape[0] != student_masked_logits.shape[0]:
        raise ValueError(f"{student_masked_logits.shape[0]} masked rows given, masks has {weights.shape[0]}")
    log_p = F.log_softmax(student_masked_logits.float() / student_temp, dim=-1)
    cross_entropy = -(teacher_masked_probs.detach().float() * log_p).sum(dim=-1)  # (M,)
    return _normalise((cross_entropy * weights.to(cross_entropy.device)).sum(), masks, denominator)
