"""Kill a real ``lvdkit`` run with SIGKILL in the middle of a stage, rerun it, and compare with an uninterrupted run.

One uninterrupted reference run is shared by every kill point. A kill point in a later stage starts from a copy of
the reference's finished earlier stages (the killed run skips them, as a rerun after an earlier kill would), slows
the chosen stage with ``LVDKIT_TEST_STAGE_DELAY`` and kills the driver's whole process tree once the stage has
written some of its parts but not ``_SUCCESS``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.io import part_files, read_parts
from lvdkit.core.settings import load_config
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.names import CURATE_ORDER
from lvdkit.pipeline.runner import run

from ..conftest import TINY_EMBED, kill_tree

FILES_PER_PART = 5
# A balanced sample gives the shard stage rows to write; small parts give it several parts to be killed between.
CURATED = ("cluster.target_size=40", "curated.rows_per_part=8")


def _args(out: Path, demo: Path) -> list[str]:
    return [
        f"out={out}",
        f"ingest.inputs=[{demo / 'raw'}]",
        f"ingest.files_per_part={FILES_PER_PART}",
        "progress=false",
        "ray.num_cpus=2",
        *TINY_EMBED,
        *CURATED,
    ]


@dataclass(frozen=True)
class KillPoint:
    """Where a run is killed: inside ``stage``, once it has written ``parts`` part files."""

    stage: str
    delay: str  # LVDKIT_TEST_STAGE_DELAY
    parts: int
    sharded: bool  # resumes shard by shard (else: a whole-dataset stage, redone)

    @property
    def copied(self) -> tuple[str, ...]:
        """The stages before it, taken finished from the reference run."""
        return CURATE_ORDER[: CURATE_ORDER.index(self.stage)]


KILL_POINTS = (
    KillPoint("ingest", "ingest:0.4", parts=3, sharded=True),  # Ray Data part tasks
    KillPoint("embed", "embed:60", parts=1, sharded=True),  # the driver writes embed's parts from the actor pool
    KillPoint("dedup_copy", "dedup_copy:60", parts=1, sharded=False),  # output written, _SUCCESS not yet
    KillPoint("curated", "curated:2", parts=2, sharded=True),  # writing the curated set
)


def _curate_in_process(out: Path, demo: Path) -> None:
    """What ``lvdkit curate`` does, on the tests' shared local Ray (no start-up per run)."""
    run(load_config(CurateConfig, None, _args(out, demo)))


@pytest.fixture(scope="module")
def reference(ray_local: None, small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run, compared against by every kill point."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    _curate_in_process(out, small_demo)
    assert read_parts(out / "curated").num_rows > 2 * 8, "the shard stage needs several parts to be killed between"
    return out


def _key(table: pa.Table) -> list[tuple[str, str]]:
    return [(c, "ascending") for c in (schema.IMAGE_ID, schema.EDIT, "seed_set") if c in table.column_names]


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by(_key(table))


def _assert_every_part_is_complete(out: Path) -> None:
    """A killed run leaves only complete parts (readable, all rows present): temporaries are hidden names."""
    for part in out.rglob("part-*.parquet"):
        meta = pq.ParquetFile(part).metadata
        assert pq.read_table(part).num_rows == meta.num_rows, part


@pytest.mark.parametrize("point", KILL_POINTS, ids=[k.stage for k in KILL_POINTS])
def test_killed_mid_stage_then_rerun_equals_uninterrupted(
    point: KillPoint, reference: Path, small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The killed run is a real ``lvdkit curate`` process tree; the rerun runs in this process (the same code as
    the CLI's, without another Ray start-up)."""
    killed = tmp_path / "killed"
    for stage in point.copied:
        shutil.copytree(reference / stage, killed / stage)
    stage_dir = killed / point.stage
    ray_tmp = tempfile.mkdtemp(prefix="lvdk-kill-", dir="/tmp")
    env = {**os.environ, "LVDKIT_TEST_STAGE_DELAY": point.delay, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvdkit.cli", "curate", *_args(killed, small_demo)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while len(part_files(stage_dir)) < point.parts and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    survivors = {p.name: p.stat().st_mtime_ns for p in part_files(stage_dir)}
    n_parts = len(part_files(reference / point.stage))
    assert point.parts <= len(survivors), "the run did not get far enough into the stage"
    assert not (stage_dir / "_SUCCESS").exists(), "the run was not interrupted mid-stage"
    assert (stage_dir / "_RUNNING").exists()
    if point.sharded:
        assert len(survivors) < n_parts
    _assert_every_part_is_complete(killed)

    capsys.readouterr()
    _curate_in_process(killed, small_demo)
    log = capsys.readouterr().err
    if point.sharded:
        assert f"{point.stage}: {len(survivors)} of {n_parts} parts already done" in log
        assert all((stage_dir / name).stat().st_mtime_ns == m for name, m in survivors.items())  # not redone
    else:
        assert f"{point.stage}: resuming" in log
    for stage in point.copied:
        assert f"{stage}: up to date" in log

    _assert_every_part_is_complete(killed)
    assert not list(killed.rglob(".*.tmp-*")), "temporary files left behind"
    folders = [*CURATE_ORDER, "embed/calibration"]
    for folder in folders:
        got, want = read_parts(killed / folder), read_parts(reference / folder)
        assert got.num_rows == want.num_rows, folder
        keys = got.select([c for c, _ in _key(got)]).to_pylist()
        assert len({tuple(k.values()) for k in keys}) == got.num_rows, f"{folder}: a row twice"
        assert _sorted(got).equals(_sorted(want)), folder
    status, want_status = pq.read_table(killed / "status.parquet"), pq.read_table(reference / "status.parquet")
    assert _sorted(status).equals(_sorted(want_status))  # same images kept, same duplicates (of the same images)
    summary, want_summary = (json.loads((o / "summary.json").read_text()) for o in (killed, reference))
    for key in ("images_in", "kept", "duplicates", "quarantined", "curated", "duplicates_by_stage"):
        assert summary[key] == want_summary[key], key


def _ingest_in_process(out: Path, demo: Path) -> None:
    run(load_config(CurateConfig, None, _args(out, demo)), stages=("ingest",))


@pytest.mark.usefixtures("ray_local")
def test_a_missing_marker_or_leftover_temp_file_is_not_taken_as_output(
    small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    _ingest_in_process(out, small_demo)
    stage = out / "ingest"
    parts = part_files(stage)
    record = json.loads((stage / "_SUCCESS").read_text())
    # As if killed while the last shard was being written: the marker of the run, no _SUCCESS, a torn temp file.
    (stage / "_RUNNING").write_text(json.dumps({k: record[k] for k in ("config_hash", "fingerprint")}))
    (stage / "_SUCCESS").unlink()
    (stage / ".part-000000.parquet.tmp-dead").write_bytes(b"PAR1 half written")
    parts[-1].unlink()
    capsys.readouterr()
    _ingest_in_process(out, small_demo)
    assert f"{len(parts) - 1} of {len(parts)} parts already done" in capsys.readouterr().err
    assert not list(stage.glob(".*tmp*")) and len(part_files(stage)) == len(parts)
    assert json.loads((stage / "_SUCCESS").read_text())["rows"] == record["rows"]


@pytest.mark.usefixtures("ray_local")
def test_an_interrupted_stage_restarts_clean_when_its_config_or_inputs_changed(
    small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    _ingest_in_process(out, small_demo)
    (out / "ingest" / "_SUCCESS").unlink()
    (out / "ingest" / "_RUNNING").write_text('{"config_hash": "other", "fingerprint": "other"}')
    stale = out / "ingest" / "part-999999.parquet"
    stale.write_bytes(b"from another run")
    capsys.readouterr()
    _ingest_in_process(out, small_demo)
    assert "already done" not in capsys.readouterr().err
    assert not stale.exists()
