"""A stage's ``_SUCCESS`` record and the identity its readers count it by."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

from lvdkit.pipeline.manifest import RunKey, fingerprint_of, finish


def test_a_rerun_finished_within_the_same_second_is_a_new_output_for_its_readers(tmp_path: Path) -> None:
    """A forced rerun of a quick stage can finish in the same second as the run before it, under the same config:
    its readers must still count it as new (they were left as they were when the identity was config@second)."""
    stage_dir = tmp_path / "dedup_exact"
    stage_dir.mkdir()
    key = RunKey("cfg", "inputs")
    with mock.patch("time.strftime", return_value="2026-12-05T05:00:00+0000"):  # the same second, twice
        first = finish(stage_dir, "dedup_exact", key, {}, 10, 0.1, {})
        second = finish(stage_dir, "dedup_exact", key, {}, 10, 0.1, {})
    assert first["finished_at"] == second["finished_at"]
    assert fingerprint_of(first) != fingerprint_of(second)
    old = {k: v for k, v in first.items() if k != "run_id"}  # a record written before run_id still counts
    assert fingerprint_of(old) != fingerprint_of(first)
