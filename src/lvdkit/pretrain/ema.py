"""Teacher as an exponential moving average of the student (mean teacher, Tarvainen & Valpola 2017; BYOL; DINO).

``teacher = momentum * teacher + (1 - momentum) * student`` after every optimiser step, with the momentum following
a cosine from 0.992 to 1 in DINOv2 (see :mod:`lvdkit.pretrain.schedules`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def _matched(kind: str, teacher: Mapping[str, Tensor], student: Mapping[str, Tensor]) -> list[str]:
    if teacher.keys() != student.keys():
        only_teacher = sorted(teacher.keys() - student.keys())
        only_student = sorted(student.keys() - teacher.keys())
        raise ValueError(
            f"teacher and student {kind} names differ: only in teacher {only_teacher[:5]}, only in student "
            f"{only_student[:5]} (unwrap DDP/FSDP '.module' prefixes before calling)"
        )
    names = list(teacher)
    for name in names:
        if teacher[name].shape != student[name].shape:
            raise ValueError(
                f"{kind} {name!r}: teacher {tuple(teacher[name].shape)} vs student {tuple(student[name].shape)}"
            )
    return names


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: every teacher parameter becomes ``momentum * teacher + (1 - momentum) * student``; every buffer
    (e.g. BatchNorm statistics) is copied from the student.

    Parameters and buffers are matched by name and must have the same names and shapes (ValueError otherwise);
    frozen parameters are averaged too. Uses ``torch._foreach_lerp_`` (one fused kernel per dtype and device group),
    which gives the exact endpoints: momentum 1 leaves the teacher bit-identical, momentum 0 copies the student.
    Student values are cast to the teacher's dtype.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    names = _matched("parameter", teacher_params, student_params)
    if names and momentum < 1.0:
        targets = [teacher_params[n].detach() for n in names]  # a DTensor stays one (FSDP); .data would not
        sources = [
            student_params[n].detach().to(dtype=t.dtype, device=t.device) for n, t in zip(names, targets, strict=True)
        ]
        torch._foreach_lerp_(targets, sources, 1.0 - momentum)

    teacher_buffers = dict(teacher.named_buffers())
    student_buffers = dict(student.named_buffers())
    for name in _matched("buffer", teacher_buffers, student_buffers):
        teacher_buffers[name].copy_(student_buffers[name])
