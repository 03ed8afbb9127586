"""Where a task's time goes: named phases summed per process, collected by whoever runs the task.

Stage code marks its phases (``with timed("read"): ...``) without knowing where it runs; the runner clears the
tally before a task and takes it after (:func:`take`), and records the sums per step in the stage's ``_SUCCESS``,
so a slow step shows whether it reads or computes (``bench/scale_curation.py`` prints them).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

_TALLY: dict[str, float] = {}


@contextmanager
def timed(phase: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``phase`` in this process's tally."""
    start = time.perf_counter()
    try:
        yield
    finally:
        _TALLY[phase] = _TALLY.get(phase, 0.0) + time.perf_counter() - start


def take() -> dict[str, float]:
    """This process's tally since the last call (then cleared)."""
    out = dict(_TALLY)
    _TALLY.clear()
    return out
