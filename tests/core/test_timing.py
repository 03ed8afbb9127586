"""Phase timing: summed per phase in the process, taken (and cleared) by whoever runs the task."""

from __future__ import annotations

import time

import pytest

from lvdkit.core.timing import take, timed


def test_phases_sum_and_take_clears() -> None:
    take()
    for _ in range(2):
        with timed("read"):
            time.sleep(0.02)
    with timed("knn"):
        pass
    got = take()
    assert set(got) == {"read", "knn"}
    assert got["read"] >= 0.04 and got["knn"] < got["read"]
    assert take() == {}


def test_a_phase_that_raises_is_still_counted() -> None:
    take()
    with pytest.raises(ValueError), timed("solve"):
        raise ValueError("boom")
    assert "solve" in take()
