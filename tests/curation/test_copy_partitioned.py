"""dedup_copy's partitioned path (k-means cells, one task per partition) decides as its single-task path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.io import part_files, read_json
from lvdkit.core.settings import load_config
from lvdkit.curation.copy_partitioned import solve_group
from lvdkit.curation.dedup_copy import DedupCopyConfig
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run

from ..conftest import kill_tree
from ..partitioned_run import base_args, copy_of_base

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def embedded(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_of_base(small_demo, tmp_path_factory, tmp_path_factory.mktemp("base") / "out")


def _cfg(out: Path, demo: Path, *extra: str) -> CurateConfig:
    return load_config(CurateConfig, None, [*base_args(out, demo), *extra])


def _copy_dedup(embedded: Path, demo: Path, where: Path, *extra: str) -> dict[str, tuple[bool, str | None]]:
    shutil.copytree(embedded, where)
    run(_cfg(where, demo, *extra), ("dedup_copy",))
    rows = pa.concat_tables([pq.read_table(p) for p in part_files(where / "dedup_copy")]).to_pylist()
    return {r[schema.IMAGE_ID]: (r[schema.KEEP], r[schema.DUP_OF]) for r in rows}


def test_both_paths_give_the_same_decisions_on_the_demo(embedded: Path, small_demo: Path, tmp_path: Path) -> None:
    single = _copy_dedup(embedded, small_demo, tmp_path / "single", "dedup_copy.path=single")
    one_cell = _copy_dedup(embedded, small_demo, tmp_path / "one", "dedup_copy.path=partitioned")
    cells = ["dedup_copy.path=partitioned", "dedup_copy.cell_rows=40", "dedup_copy.partition_rows=60"]
    many = _copy_dedup(embedded, small_demo, tmp_path / "many", *cells)
    assert any(dup is not None for _, dup in single.values())  # there is something to decide
    assert one_cell == single
    assert many == single
    record = read_json(tmp_path / "many" / "dedup_copy" / "_SUCCESS")
    assert record is not None
    stats = record["stats"]
    assert stats["path"] == "partitioned" and stats["cells"] > 1
    assert stats["duplicates"] == sum(dup is not None for _, dup in single.values())
    assert record["nodes"]  # the node(s) whose tasks ran
    assert not (tmp_path / "many" / "dedup_copy" / "_scratch").exists()  # scratch tables removed at the end
    for side in (schema.WHITENING_FILE, schema.THRESHOLD_FILE):
        assert (tmp_path / "many" / "dedup_copy" / side).is_file()
    steps = stats["steps"]  # where the time went, per step
    assert list(steps) == ["prepare", "scatter", "plan", "solve", "reduce", "write", "final"]
    parts = len(part_files(tmp_path / "many" / "embed"))
    assert steps["scatter"]["tasks"] == parts and steps["write"]["tasks"] == parts
    assert steps["solve"]["tasks"] > 1 and steps["prepare"]["tasks"] == 1
    assert steps["plan"]["tasks"] == 1  # the summaries are folded in a task: the driver never reads them
    solve = steps["solve"]
    assert 0 < solve["read_s"] + solve["knn_s"] + solve["write_s"] <= solve["task_s"] + 0.05  # phases within the task
    assert all(row["wall_s"] >= 0 for row in steps.values())
    single_record = read_json(tmp_path / "single" / "dedup_copy" / "_SUCCESS")
    assert single_record is not None and single_record["stats"]["path"] == "single"
    # three partitions per solve task: one read of the scatter tables each, the partitions still solved alone
    grouped = ["dedup_copy.solve_partitions=3", "dedup_copy.solve_tasks_min=1"]
    assert _copy_dedup(embedded, small_demo, tmp_path / "grouped", *cells, *grouped) == single
    grouped_record = read_json(tmp_path / "grouped" / "dedup_copy" / "_SUCCESS")
    assert grouped_record is not None
    assert grouped_record["stats"]["steps"]["solve"]["tasks"] == -(-solve["tasks"] // 3)


@pytest.mark.parametrize(
    ("rows", "per_task", "tasks_min", "expected"),
    [(1_000, 8, 64, 1), (4_000_000, 8, 64, 7), (40_000_000, 8, 64, 8), (4_000_000, 1, 64, 1), (100_000, 8, 1, 8)],
)
def test_solve_task_partitions_follow_the_pool_size(rows: int, per_task: int, tasks_min: int, expected: int) -> None:
    cfg = DedupCopyConfig(solve_partitions=per_task, solve_tasks_min=tasks_min)  # partitions of 25k, 3 cells each
    assert solve_group(cfg, rows) == expected


def test_auto_picks_the_path_by_pool_size(embedded: Path, small_demo: Path, tmp_path: Path) -> None:
    _copy_dedup(embedded, small_demo, tmp_path / "small", "dedup_copy.partition_min_rows=100000")
    _copy_dedup(embedded, small_demo, tmp_path / "large", "dedup_copy.partition_min_rows=10")
    paths = {
        w: (read_json(tmp_path / w / "dedup_copy" / "_SUCCESS") or {})["stats"]["path"] for w in ("small", "large")
    }
    assert paths == {"small": "single", "large": "partitioned"}


def test_partitioned_with_union_find_grouping_is_refused_by_name(
    embedded: Path, small_demo: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"dedup_copy\.grouping=star"):
        _copy_dedup(
            embedded, small_demo, tmp_path / "x", "dedup_copy.path=partitioned", "dedup_copy.grouping=components"
        )


def test_a_run_killed_while_solving_partitions_resumes_and_keeps_the_solved_ones(
    embedded: Path, small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cells = ["dedup_copy.path=partitioned", "dedup_copy.cell_rows=20", "dedup_copy.partition_rows=30"]
    reference = _copy_dedup(embedded, small_demo, tmp_path / "reference", *cells)
    out = tmp_path / "killed"
    shutil.copytree(embedded, out)
    args = [*base_args(out, small_demo), *cells]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvdkit.cli", "run", "dedup_copy", "ray.num_cpus=1", *args],
        env={**os.environ, "LVDKIT_TEST_STAGE_DELAY": "dedup_copy:30"},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    solved = out / "dedup_copy" / "_scratch" / "solve"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not part_files(solved):
        time.sleep(0.1)
    kill_tree(proc)
    kept = {p.name: p.stat().st_mtime_ns for p in part_files(solved)}
    assert kept and not (out / "dedup_copy" / "_SUCCESS").exists()
    capsys.readouterr()
    run(_cfg(out, small_demo, *cells), ("dedup_copy",))
    log = capsys.readouterr().err
    assert f"dedup_copy: {len(kept)} of " in log and "partitions already solved" in log
    rows = pa.concat_tables([pq.read_table(p) for p in part_files(out / "dedup_copy")]).to_pylist()
    assert {r[schema.IMAGE_ID]: (r[schema.KEEP], r[schema.DUP_OF]) for r in rows} == reference
