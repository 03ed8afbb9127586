"""Fault-injection hooks for tests, read from the environment (all unset in normal use).

Read by the driver and handed to the tasks (so they work with a Ray started before the variable was set):

- ``LVDKIT_TEST_SHARD_DELAY_S=S``: every part task of every stage sleeps ``S`` seconds before working.
- ``LVDKIT_TEST_STAGE_DELAY=STAGE:S``: slow down one stage so a test can kill the run inside it: each part task of
  a per-part stage (ingest, embed, curated) sleeps after writing its part; a whole-dataset stage's task sleeps after
  writing its parts, before ``_SUCCESS``; ``summary:S`` sleeps between writing ``status.parquet`` and
  ``summary.json``.
- ``LVDKIT_TEST_FAIL_ONCE=STAGE[:MODE[:PART]]``: the first attempt at each part of ``STAGE`` (or only at part
  ``PART``) raises (``MODE`` ``raise``, the default) or kills its worker process (``crash``); later attempts work.
  "First" is remembered by marker files in ``LVDKIT_TEST_FAIL_DIR``, so it holds across worker processes.
- ``LVDKIT_TEST_FAIL_ALWAYS=STAGE:TEXT``: any attempt of ``STAGE`` at a part or file whose uri contains ``TEXT``
  raises, every time.
- ``LVDKIT_TEST_CRASH_ALWAYS=STAGE:PART``: every attempt at part ``PART`` of ``STAGE`` kills its worker process.
- ``LVDKIT_TEST_ENOSPC_AFTER=STAGE:N``: writing the stage's ``part-*.parquet`` number ``N`` or later fails with
  ``ENOSPC`` after half the file was written (as a full disk would).
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from lvdkit.core.io import ROW_GROUP_ROWS, DiskFullError, write_parquet_atomic
from lvdkit.core.storage import Location

SHARD_DELAY = "LVDKIT_TEST_SHARD_DELAY_S"
STAGE_DELAY = "LVDKIT_TEST_STAGE_DELAY"
FAIL_ONCE = "LVDKIT_TEST_FAIL_ONCE"
FAIL_ALWAYS = "LVDKIT_TEST_FAIL_ALWAYS"
FAIL_DIR = "LVDKIT_TEST_FAIL_DIR"
CRASH_ALWAYS = "LVDKIT_TEST_CRASH_ALWAYS"
ENOSPC_AFTER = "LVDKIT_TEST_ENOSPC_AFTER"


class InjectedFault(RuntimeError):
    """Raised by a test hook (never in normal use)."""


def part_delay() -> float:
    """Seconds to sleep before each part (0 unless a test sets ``LVDKIT_TEST_SHARD_DELAY_S``)."""
    return float(os.environ.get(SHARD_DELAY) or 0)


def _split(value: str | None) -> tuple[str, str]:
    stage, _, arg = (value or "").partition(":")
    return stage.strip(), arg.strip()


@dataclass(frozen=True)
class Hooks:
    """The hooks that apply to one stage, read once in the driver (picklable, handed to the tasks)."""

    stage: str
    delay: float = 0.0  # before each part
    stage_delay: float = 0.0  # LVDKIT_TEST_STAGE_DELAY for this stage
    fail_once: str = ""  # "" (off), "raise" or "crash"
    fail_once_part: int | None = None  # None: every part
    fail_always: str = ""  # uri substring
    fail_dir: str = ""
    crash_part: int | None = None  # a part whose every attempt kills its worker
    enospc_after: int | None = None  # part number from which writes fail with ENOSPC

    @classmethod
    def for_stage(cls, stage: str) -> Hooks:
        delay_stage, seconds = _split(os.environ.get(STAGE_DELAY))
        once_stage, once_mode = _split(os.environ.get(FAIL_ONCE))
        once_mode, _, once_part = once_mode.partition(":")
        always_stage, text = _split(os.environ.get(FAIL_ALWAYS))
        full_stage, full_after = _split(os.environ.get(ENOSPC_AFTER))
        crash_stage, crash_part = _split(os.environ.get(CRASH_ALWAYS))
        fail_dir = os.environ.get(FAIL_DIR, "")
        if once_stage == stage and not fail_dir:
            raise ValueError(f"{FAIL_ONCE} needs {FAIL_DIR} (a folder for its markers)")
        return cls(
            stage=stage,
            delay=part_delay(),
            stage_delay=float(seconds or 0) if delay_stage == stage else 0.0,
            fail_once=(once_mode or "raise") if once_stage == stage else "",
            fail_once_part=int(once_part) if once_part else None,
            fail_always=text if always_stage == stage else "",
            fail_dir=fail_dir,
            crash_part=int(crash_part) if crash_stage == stage and crash_part else None,
            enospc_after=int(full_after or 0) if full_stage == stage else None,
        )

    def before_part(self) -> None:
        """Sleep as configured before a part's work."""
        time.sleep(self.delay)

    def pause(self) -> None:
        """The stage delay: after a part is written, or after a whole-dataset stage's parts are."""
        time.sleep(self.stage_delay)

    def check(self, part: int, uris: list[str]) -> None:
        """Raise (or exit) where a failure hook says this attempt must fail."""
        if self.fail_once and self.fail_once_part in (None, part):
            marker = Path(self.fail_dir) / f"{self.stage}-{part}"
            try:
                marker.touch(exist_ok=False)
            except FileExistsError:
                pass
            else:
                if self.fail_once == "crash":
                    os._exit(17)  # a worker dying (segfault, OOM kill): Ray retries the task elsewhere
                raise InjectedFault(f"injected transient failure of {self.stage} part {part}")
        if self.crash_part == part:
            os._exit(17)
        if self.fail_always:
            hit = next((u for u in uris if self.fail_always in u), None)
            if hit is not None:
                raise InjectedFault(f"injected failure on {hit}")

    def disk_full(self, path: Location) -> bool:
        """Whether writing the part file ``path`` must fail with a full disk."""
        if self.enospc_after is None or not path.name.startswith("part-"):
            return False
        try:
            index = int(path.name.removeprefix("part-").split(".")[0])
        except ValueError:
            return False
        return index >= self.enospc_after


def write_part(table: pa.Table, path: Location, hooks: Hooks | None, row_group_rows: int = ROW_GROUP_ROWS) -> str:
    """Write a part atomically, failing as a full disk would where ``LVDKIT_TEST_ENOSPC_AFTER`` says so; its
    checksum."""
    if hooks is not None and hooks.disk_full(path):
        raise DiskFullError.writing(path, enospc(path))
    return write_parquet_atomic(table, path, row_group_rows)


def enospc(path: Location) -> OSError:
    """The error a full disk gives."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
