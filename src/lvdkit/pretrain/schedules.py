"""Per-step hyper-parameter schedules as in DINOv2's training (``CosineScheduler`` in facebookresearch/dinov2):
learning rate, weight decay, teacher EMA momentum, teacher temperature and the last layer's learning rate.

Schedules are precomputed float64 arrays, one value per optimisation step, so a resumed run reads the same value
for the same step. Reading past the end returns the last value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

SCHEDULE_NAMES = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")


def _check_steps(**steps: int) -> None:
    for name, value in steps.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
    freeze_steps: int = 0,
) -> np.ndarray:
    """(total_steps,) float64: ``freeze_steps`` zeros, a linear warm-up, then a half cosine from base to final.

    The warm-up is ``linspace(start_warmup_value, base_value, warmup_steps)`` (its last step already equals
    ``base_value``). With ``n`` cosine steps, step ``i`` is ``final + (base - final) * (1 + cos(pi * i / n)) / 2``, so
    the cosine starts at ``base_value`` and its last step is one cosine step short of ``final_value`` (DINOv2's
    convention; ``final_value`` would be step n). When freeze + warm-up exceed
    ``total_steps`` the schedule is truncated; ``total_steps=0`` gives an empty array.
    """
    _check_steps(total_steps=total_steps, warmup_steps=warmup_steps, freeze_steps=freeze_steps)
    n_cosine = max(total_steps - warmup_steps - freeze_steps, 0)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1.0 + np.cos(np.pi * np.arange(n_cosine) / max(n_cosine, 1))
    )
    schedule = np.concatenate(
        [np.zeros(freeze_steps), np.linspace(start_warmup_value, base_value, warmup_steps), cosine]
    )
    return schedule[:total_steps].astype(np.float64)


def linear_warmup_then_constant(
    start_value: float, final_value: float, total_steps: int, warmup_steps: int = 0
) -> np.ndarray:
    """(total_steps,) float64: ``linspace(start_value, final_value, warmup_steps)`` then ``final_value``.

    DINOv2's teacher temperature: 0.04 -> 0.07 over the first 30 epochs, then 0.07. Truncated when the warm-up is
    longer than the run.
    """
    _check_steps(total_steps=total_steps, warmup_steps=warmup_steps)
    warmup = np.linspace(start_value, final_value, warmup_steps)
    constant = np.full(max(total_steps - warmup_steps, 0), final_value, dtype=np.float64)
    return np.concatenate([warmup, constant])[:total_steps].astype(np.float64)


def sqrt_scaled_lr(base_lr: float, batch_size: int, reference_batch_size: int = 1024) -> float:
    """``base_lr * sqrt(batch_size / reference_batch_size)``: DINOv2's ``sqrt_wrt_1024`` rule (4e-3 per 1024
    images); the distillation recipe uses ``reference_batch_size=1536``."""
    if batch_size < 1 or reference_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {reference_batch_size}")
    return base_lr * math.sqrt(batch_size / reference_batch_size)


@dataclass(frozen=True)
class Schedules:
    """The five per-step schedules of a DINOv2 run. Each is a 1-D float array; lengths may differ."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray

    def __post_init__(self) -> None:
        for field in fields(self):
            array = getattr(self, field.name)
            if not isinstance(array, np.ndarray) or array.ndim != 1:
                raise ValueError(f"schedule {field.name!r} must be a 1-D numpy array")

    def __len__(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> dict[str, float]:
        """Values at ``step`` keyed by :data:`SCHEDULE_NAMES`; steps past an array's end read its last value."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        values: dict[str, float] = {}
        for name in SCHEDULE_NAMES:
            array: np.ndarray = getattr(self, name)
            if len(array) == 0:
                raise ValueError(f"schedule {name!r} is empty (a run of 0 steps)")
            values[name] = float(array[min(step, len(array) - 1)])
        return values

    @classmethod
    def dinov2(
        cls,
        total_steps: int,
        steps_per_epoch: int,
        lr: float,
        *,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        momentum_teacher: float = 0.992,
        final_momentum_teacher: float = 1.0,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: float = 30,
        freeze_last_layer_epochs: float = 1,
    ) -> Schedules:
        """DINOv2's defaults (ViT-S/B/g configs): lr warm-up then cosine to ``min_lr``; weight decay cosine 0.04 ->
        0.4; teacher momentum cosine 0.992 -> 1; teacher temperature 0.04 -> 0.07 over 30 epochs; the last layer's
        lr equals ``lr`` but is 0 for the first ``freeze_last_layer_epochs`` (zeroed, not shifted, as DINOv2).
        ``lr`` is the already batch-scaled value (see :func:`sqrt_scaled_lr`)."""
        _check_steps(total_steps=total_steps)
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

        def steps(epochs: float) -> int:
            return max(int(epochs * steps_per_epoch), 0)

        lr_schedule = cosine_schedule(lr, min_lr, total_steps, warmup_steps=steps(warmup_epochs))
        last_layer_lr = lr_schedule.copy()
        last_layer_lr[: steps(freeze_last_layer_epochs)] = 0.0
        return cls(
            lr=lr_schedule,
            wd=cosine_schedule(weight_decay, weight_decay_end, total_steps),
            momentum=cosine_schedule(momentum_teacher, final_momentum_teacher, total_steps),
            teacher_temp=linear_warmup_then_constant(
                warmup_teacher_temp, teacher_temp, total_steps, warmup_steps=steps(warmup_teacher_temp_epochs)
            ),
            last_layer_lr=last_layer_lr,
        )
