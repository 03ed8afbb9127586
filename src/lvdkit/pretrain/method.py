"""What the training loop needs from a method (DINOv2, DINO, SimCLR, distillation): one small base class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lvdkit.embeddings.preprocess import Preprocess

StudentFn = Callable[..., dict[str, Tensor]]


class Method(nn.Module):
    """Holds the trainable ``student`` and whatever else a step needs (teacher, centre, queue) as sub-modules."""

    student: nn.Module
    identity: dict[str, Any]  # the student backbone's constructor kwargs (what an export rebuilds it from)
    preprocess: Preprocess  # how an export of the backbone prepares images (the learning curve's evaluation too)
    frozen_prefixes: tuple[str, ...] = ()  # state-dict keys never trained: left out of checkpoints

    def train(self, mode: bool = True) -> Method:
        """Train mode for the student only: a ``teacher`` sub-module (EMA or frozen) never trains (no drop path, no
        dropout, frozen batch statistics)."""
        super().train(mode)
        teacher = getattr(self, "teacher", None)
        if isinstance(teacher, nn.Module):
            teacher.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def loss(
        self, batch: dict[str, Tensor], sched: dict[str, float], rng: np.random.Generator, student_fn: StudentFn
    ) -> tuple[Tensor, dict[str, float]]:
        """One (micro-)batch's loss (a scalar with a graph to the student, a mean over its images) and its terms as
        floats, for the log. State that moves with the data (centre, queue) is only gathered here; it moves in
        :meth:`after_step`, so every micro-batch of an optimizer step sees the same teacher, centre and queue."""
        raise NotImplementedError

    def after_step(self, sched: dict[str, float]) -> None:
        """Work once per optimizer step, after it (EMA teacher, centre, queue update)."""

    def export_module(self, which: str) -> tuple[nn.Module, dict[str, Any]]:
        """The backbone to export (``teacher`` or ``student``) and its constructor kwargs."""
        raise NotImplementedError


def mean_std(preprocess: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A backbone preprocessing's normalisation (ImageNet's when it has none)."""
    mean = getattr(preprocess, "mean", None) or (0.485, 0.456, 0.406)
    std = getattr(preprocess, "std", None) or (0.229, 0.224, 0.225)
    return tuple(mean), tuple(std)


def entropy(probs: Tensor) -> float:
    """Mean Shannon entropy (nats) of probability rows (..., K): log K when uniform, 0 when one-hot."""
    return float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
