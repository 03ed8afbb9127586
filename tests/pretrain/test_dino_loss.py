"""DINO's cross-view cross-entropy against sums written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lvdkit.pretrain.dino_loss import dino_loss


def log_softmax2(a: float, b: float, temp: float) -> tuple[float, float]:
    z = math.log(math.exp(a / temp) + math.exp(b / temp))
    return a / temp - z, b / temp - z


def cross_entropy(p: tuple[float, float], logits: tuple[float, float], temp: float) -> float:
    la, lb = log_softmax2(*logits, temp)
    return -(p[0] * la + p[1] * lb)


# Two crops (S = T = 2) of one image (B = 1), two prototypes.
STUDENT = ((1.0, 0.0), (0.0, 2.0))
TEACHER = ((0.8, 0.2), (0.3, 0.7))


def test_two_global_crops_match_only_across_views() -> None:
    student = torch.tensor(STUDENT).unsqueeze(1)  # (S, B, K) = (2, 1, 2)
    teacher = torch.tensor(TEACHER).unsqueeze(1)
    # Pairs (s0, t1) and (s1, t0): DINOv2's swap of the teacher's crops A and B.
    expected = (cross_entropy(TEACHER[1], STUDENT[0], 0.5) + cross_entropy(TEACHER[0], STUDENT[1], 0.5)) / 2
    assert dino_loss(student, teacher, student_temp=0.5).item() == pytest.approx(expected, rel=1e-6)
    everything = sum(cross_entropy(t, s, 0.5) for s in STUDENT for t in TEACHER) / 4
    assert dino_loss(student, teacher, student_temp=0.5, skip_same_view=False).item() == pytest.approx(
        everything, rel=1e-6
    )
    assert expected != pytest.approx(everything)


def test_local_crops_match_every_teacher_crop_and_batch_is_averaged() -> None:
    local = (0.5, -1.0)
    student = torch.tensor([*STUDENT, local]).unsqueeze(1)  # 2 globals then 1 local
    teacher = torch.tensor(TEACHER).unsqueeze(1)
    pairs = [(STUDENT[0], TEACHER[1]), (STUDENT[1], TEACHER[0]), (local, TEACHER[0]), (local, TEACHER[1])]
    expected = sum(cross_entropy(t, s, 0.1) for s, t in pairs) / 4
    assert dino_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)

    # A second image in the batch: the value is the mean of the two images' losses.
    other_student = torch.tensor([[0.2, 0.1], [1.0, 1.0], [-0.3, 0.3]]).unsqueeze(1)
    other_teacher = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).unsqueeze(1)
    batch = dino_loss(torch.cat([student, other_student], dim=1), torch.cat([teacher, other_teacher], dim=1))
    single = (dino_loss(student, teacher) + dino_loss(other_student, other_teacher)) / 2
    torch.testing.assert_close(batch, single)


def test_equals_dinov2_swapped_global_and_local_terms() -> None:
    gen = torch.Generator().manual_seed(0)
    n_local, batch, k = 3, 4, 16
    student = torch.randn(2 + n_local, batch, k, generator=gen)
    teacher = F.softmax(torch.randn(2, batch, k, generator=gen), dim=-1)

    def ce(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

    # DINOv2: globals (flattened) against the swapped teacher, scaled by 2, plus locals against each teacher crop,
    # all divided by the number of terms 2 + 2 * n_local.
    swapped = torch.cat([teacher[1], teacher[0]])
    global_term = ce(student[:2].flatten(0, 1), swapped) * 2
    local_term = sum(ce(student[2 + i], teacher[j]) for i in range(n_local) for j in range(2))
    expected = (global_term + local_term) / (2 + 2 * n_local)
    torch.testing.assert_close(dino_loss(student, teacher), expected)


def test_gradient_reaches_student_only_and_is_minimised_by_matching() -> None:
    teacher = F.softmax(torch.tensor([[[2.0, 0.0, -2.0]], [[2.0, 0.0, -2.0]]]), dim=-1).requires_grad_()
    student = torch.zeros(2, 1, 3, requires_grad=True)
    loss = dino_loss(student, teacher, student_temp=1.0)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    # The cross-entropy is smallest when the student's softmax equals the teacher's: log p + const.
    matched = teacher.detach().log().clone()
    assert dino_loss(matched, teacher, student_temp=1.0) < loss
    entropy = -(teacher[0] * teacher[0].log()).sum()
    torch.testing.assert_close(dino_loss(matched, teacher, student_temp=1.0), entropy.detach())


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="no crop pair"):
        dino_loss(torch.zeros(1, 2, 3), torch.full((1, 2, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"\(S, B, K\)"):
        dino_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="differ"):
        dino_loss(torch.zeros(2, 2, 3), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="B = 0"):
        dino_loss(torch.zeros(2, 0, 3), torch.zeros(2, 0, 3))
    with pytest.raises(ValueError, match="student_temp"):
        dino_loss(torch.zeros(2, 2, 3), torch.zeros(2, 2, 3), student_temp=0.0)
