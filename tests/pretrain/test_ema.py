"""Teacher EMA: exact values at momentum 0, 1 and 0.5; buffers copied; mismatches rejected."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lvdkit.pretrain.ema import ema_update


def make(value: float) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model[1].running_mean.fill_(value)
    return model


def test_momentum_endpoints_and_half() -> None:
    teacher, student = make(2.0), make(4.0)
    student[1].num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.5)
    for p in teacher.parameters():
        assert torch.equal(p, torch.full_like(p, 3.0))
    assert torch.equal(teacher[1].running_mean, torch.full((2,), 4.0))  # buffers copied, not averaged
    assert teacher[1].num_batches_tracked.item() == 7

    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(p, b) for p, b in zip(teacher.parameters(), before, strict=True))

    ema_update(teacher, student, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters(), strict=True))

    teacher = make(1.0)
    ema_update(teacher, student, 0.9)  # 0.9 * 1 + 0.1 * 4
    assert torch.allclose(teacher[0].weight, torch.full((2, 3), 1.3))


def test_no_graph_and_no_student_change() -> None:
    teacher, student = make(0.0), make(1.0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    ema_update(teacher, student, 0.25)
    assert all(p.grad_fn is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(p, torch.ones_like(p)) for p in student.parameters())
    assert torch.allclose(teacher[0].bias, torch.full((2,), 0.75))


def test_casts_student_to_teacher_dtype() -> None:
    teacher, student = make(2.0).double(), make(4.0)
    ema_update(teacher, student, 0.5)
    assert teacher[0].weight.dtype == torch.float64 and torch.equal(teacher[0].weight, torch.full((2, 3), 3.0).double())


def test_mismatches_raise() -> None:
    with pytest.raises(ValueError, match="names differ"):
        ema_update(make(0.0), nn.Sequential(nn.Linear(3, 2)), 0.5)
    with pytest.raises(ValueError, match=r"names differ.*module"):
        ema_update(make(0.0), nn.ModuleDict({"module": make(0.0)}), 0.5)
    with pytest.raises(ValueError, match="teacher"):
        ema_update(nn.Sequential(nn.Linear(3, 2)), nn.Sequential(nn.Linear(3, 4)), 0.5)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(make(0.0), make(1.0), 1.5)
