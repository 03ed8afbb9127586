"""Per-step schedules: warm-up values, cosine endpoints, monotonicity, DINOv2 bundle, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lvdkit.pretrain.schedules import (
    SCHEDULE_NAMES,
    Schedules,
    cosine_schedule,
    linear_warmup_then_constant,
    sqrt_scaled_lr,
)


def test_cosine_without_warmup() -> None:
    schedule = cosine_schedule(1.0, 0.0, 5)
    expected = [0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)]
    np.testing.assert_allclose(schedule, expected)
    assert schedule[0] == 1.0 and schedule.dtype == np.float64
    assert np.all(np.diff(schedule) < 0) and schedule[-1] > 0.0  # DINOv2 stops one cosine step short of final


def test_warmup_then_cosine() -> None:
    schedule = cosine_schedule(4e-3, 1e-6, 10, warmup_steps=4, start_warmup_value=1e-4)
    np.testing.assert_allclose(schedule[:4], [1e-4, 1e-4 + 1.3e-3, 1e-4 + 2.6e-3, 4e-3])
    assert schedule[4] == pytest.approx(4e-3)  # the cosine part starts at base
    np.testing.assert_allclose(schedule[4:], 1e-6 + 0.5 * (4e-3 - 1e-6) * (1 + np.cos(np.pi * np.arange(6) / 6)))
    assert np.all(np.diff(schedule[:5]) >= 0) and np.all(np.diff(schedule[4:]) <= 0)
    assert schedule.max() == pytest.approx(4e-3)


def test_increasing_cosine_and_freeze() -> None:
    wd = cosine_schedule(0.04, 0.4, 100)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4, abs=1e-3) and np.all(np.diff(wd) > 0)
    momentum = cosine_schedule(0.992, 1.0, 1000)
    assert momentum[0] == 0.992 and 0.99999 < momentum[-1] < 1.0
    frozen = cosine_schedule(1.0, 0.5, 8, warmup_steps=2, freeze_steps=3)
    np.testing.assert_allclose(frozen[:5], [0, 0, 0, 0, 1])
    assert len(frozen) == 8


def test_edge_cases_have_no_nan_or_index_errors() -> None:
    assert cosine_schedule(1.0, 0.0, 0).shape == (0,)
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 1), [1.0])
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 1, warmup_steps=5), [0.0])
    short = cosine_schedule(1.0, 0.0, 3, warmup_steps=5)  # the run ends inside the warm-up
    np.testing.assert_allclose(short, [0.0, 0.25, 0.5])
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 2, freeze_steps=4), [0.0, 0.0])
    assert np.isfinite(cosine_schedule(1.0, 0.0, 6, warmup_steps=6)).all()
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(1.0, 0.0, 10, warmup_steps=-1)


def test_linear_warmup_then_constant() -> None:
    np.testing.assert_allclose(
        linear_warmup_then_constant(0.04, 0.07, 7, warmup_steps=4), [0.04, 0.05, 0.06, 0.07, 0.07, 0.07, 0.07]
    )
    np.testing.assert_allclose(linear_warmup_then_constant(0.04, 0.07, 2, warmup_steps=4), [0.04, 0.05])
    np.testing.assert_allclose(linear_warmup_then_constant(0.04, 0.07, 3), [0.07] * 3)
    assert linear_warmup_then_constant(0.04, 0.07, 0, warmup_steps=4).shape == (0,)


def test_sqrt_scaled_lr() -> None:
    assert sqrt_scaled_lr(4e-3, 256) == pytest.approx(2e-3)
    assert sqrt_scaled_lr(1.8, 384, reference_batch_size=1536) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        sqrt_scaled_lr(1.0, 0)


def test_dinov2_bundle_and_at() -> None:
    schedules = Schedules.dinov2(total_steps=400, steps_per_epoch=10, lr=1e-3, warmup_epochs=2)
    assert len(schedules) == 400
    values = schedules.at(0)
    assert tuple(values) == SCHEDULE_NAMES
    assert values == pytest.approx(
        {"lr": 0.0, "wd": 0.04, "momentum": 0.992, "teacher_temp": 0.04, "last_layer_lr": 0.0}
    )
    assert schedules.at(19)["lr"] == pytest.approx(1e-3)  # end of the 2-epoch warm-up
    np.testing.assert_array_equal(schedules.last_layer_lr[:10], 0.0)  # first epoch frozen
    np.testing.assert_array_equal(schedules.last_layer_lr[10:], schedules.lr[10:])  # zeroed, not shifted
    assert schedules.at(150)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 150 / 299)
    assert schedules.at(300)["teacher_temp"] == pytest.approx(0.07)
    end = schedules.at(399)
    assert schedules.at(10_000) == end  # past the end: the last values
    assert end["lr"] == pytest.approx(1e-6, abs=1e-7) and end["wd"] == pytest.approx(0.4, abs=1e-4)
    with pytest.raises(ValueError, match="step"):
        schedules.at(-1)
    with pytest.raises(ValueError, match="empty"):
        Schedules.dinov2(total_steps=0, steps_per_epoch=10, lr=1e-3).at(0)
    one = Schedules.dinov2(total_steps=1, steps_per_epoch=1, lr=1e-3)
    assert all(np.isfinite(v) for v in one.at(0).values())
