"""iBOT's masked-patch loss: 1 / n_masked per patch, checked on images with unequal mask counts."""

from __future__ import annotations

import math

import pytest
import torch

from lvdkit.pretrain.ibot_loss import ibot_loss, ibot_loss_masked, masked_patch_weights


def ce(p: list[float], logits: list[float], temp: float) -> float:
    z = math.log(sum(math.exp(v / temp) for v in logits))
    return -sum(pi * (v / temp - z) for pi, v in zip(p, logits, strict=True))


# 3 images x 3 patches x 2 prototypes. Image 0 masks 1 patch, image 1 masks 2, image 2 none.
STUDENT = [
    [[1.0, 0.0], [0.0, 0.0], [5.0, 5.0]],
    [[0.0, 2.0], [0.5, -0.5], [9.0, 0.0]],
    [[3.0, 0.0], [0.0, 3.0], [1.0, 1.0]],
]
TEACHER = [
    [[0.9, 0.1], [0.5, 0.5], [0.5, 0.5]],
    [[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]],
    [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]],
]
MASKS = [[True, False, False], [True, True, False], [False, False, False]]


def hand_value(temp: float) -> tuple[float, float]:
    image0 = ce(TEACHER[0][0], STUDENT[0][0], temp)
    image1 = (ce(TEACHER[1][0], STUDENT[1][0], temp) + ce(TEACHER[1][1], STUDENT[1][1], temp)) / 2
    return (image0 + image1) / 2, (image0 + image1) / 3  # masked images only; every image (DINOv2)


def test_each_image_weighs_the_same_whatever_its_mask_count() -> None:
    student, teacher, masks = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(MASKS)
    over_masked, over_all = hand_value(0.5)
    assert ibot_loss(student, teacher, masks, student_temp=0.5).item() == pytest.approx(over_masked, rel=1e-6)
    assert ibot_loss(student, teacher, masks, student_temp=0.5, denominator="all").item() == pytest.approx(
        over_all, rel=1e-6
    )
    # A plain mean over the three masked patches would weigh image 1 twice as much as image 0.
    patch_mean = (
        ce(TEACHER[0][0], STUDENT[0][0], 0.5)
        + ce(TEACHER[1][0], STUDENT[1][0], 0.5)
        + ce(TEACHER[1][1], STUDENT[1][1], 0.5)
    ) / 3
    assert over_masked != pytest.approx(patch_mean, rel=1e-3)


def test_unmasked_positions_are_ignored_even_when_not_finite() -> None:
    student, teacher, masks = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(MASKS)
    reference = ibot_loss(student, teacher, masks)
    teacher_garbage = teacher.clone()
    teacher_garbage[~masks] = float("nan")
    student_garbage = student.clone()
    student_garbage[~masks] = float("inf")
    torch.testing.assert_close(ibot_loss(student_garbage, teacher_garbage, masks), reference)


def test_pre_gathered_variant_equals_scattered() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 6, 8, generator=gen)
    teacher = torch.softmax(torch.randn(4, 6, 8, generator=gen), dim=-1)
    masks = torch.rand(4, 6, generator=gen) < 0.4
    masks[0] = False
    masks[1, :2] = True
    assert masks.any(dim=1).sum() >= 2
    gathered = ibot_loss_masked(student.flatten(0, 1)[masks.flatten()], teacher.flatten(0, 1)[masks.flatten()], masks)
    torch.testing.assert_close(gathered, ibot_loss(student, teacher, masks))
    gathered_all = ibot_loss_masked(
        student[masks], teacher[masks], masks, denominator="all"
    )  # tokens[masks] is the same row-major order
    torch.testing.assert_close(gathered_all, ibot_loss(student, teacher, masks, denominator="all"))
    with pytest.raises(ValueError, match="masked rows"):
        ibot_loss_masked(student[masks][:-1], teacher[masks][:-1], masks)


def test_masked_patch_weights() -> None:
    weights = masked_patch_weights(torch.tensor(MASKS))
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.5, 0.5]))
    assert masked_patch_weights(torch.zeros(2, 3, dtype=torch.bool)).shape == (0,)


def test_nothing_masked_gives_zero_with_a_graph_and_student_only_gradients() -> None:
    student = torch.randn(2, 3, 4, requires_grad=True)
    teacher = torch.full((2, 3, 4), 0.25, requires_grad=True)
    loss = ibot_loss(student, teacher, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()  # DDP needs every rank to backprop, even with an empty mask
    masks = torch.tensor([[True, False, True], [False, True, False]])
    student.grad = None
    ibot_loss(student, teacher, masks).backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert student.grad[~masks].abs().max() == 0 and student.grad[masks].abs().sum() > 0


def test_rejects_bad_arguments() -> None:
    student, teacher, masks = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(MASKS)
    with pytest.raises(ValueError, match=r"valid: \('masked', 'all'\)"):
        ibot_loss(student, teacher, masks, denominator="images")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bool"):
        ibot_loss(student, teacher, masks.float())
    with pytest.raises(ValueError, match="one shape"):
        ibot_loss(student, teacher[:, :2], masks)
