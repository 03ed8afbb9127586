"""Fault-injection hooks for tests, read from the environment by the driver (unset in normal use).

- ``LVDKIT_TEST_SHARD_DELAY_S``: seconds each shard task sleeps before working (to kill a run mid-stage).
"""

from __future__ import annotations

import os


def shard_delay() -> float:
    """Seconds to sleep before each shard (0 unless a test sets ``LVDKIT_TEST_SHARD_DELAY_S``)."""
    return float(os.environ.get("LVDKIT_TEST_SHARD_DELAY_S") or 0)
