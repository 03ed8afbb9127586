"""Kill a real ``lvdkit`` run with SIGKILL in the middle of a stage, rerun it, and compare with an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit import schema
from lvdkit.config import CurateConfig, load_config
from lvdkit.pipeline.io import part_files, read_parts
from lvdkit.pipeline.runner import run

from ..conftest import TINY_EMBED, run_cli

FILES_PER_SHARD = 5


def _args(out: Path, demo: Path) -> list[str]:
    return [
        f"out={out}",
        f"ingest.inputs=[{demo / 'raw'}]",
        f"ingest.files_per_shard={FILES_PER_SHARD}",
        "progress=false",
        "ray.num_cpus=2",
        *TINY_EMBED,
    ]


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the driver and every process it started (raylet, GCS, workers), as a crash or OOM kill would."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by(schema.IMAGE_ID)


def test_killed_mid_stage_then_rerun_equals_uninterrupted(small_demo: Path, tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = run_cli("curate", *_args(reference, small_demo))
    assert done.returncode == 0, done.stderr

    ray_tmp = tempfile.mkdtemp(prefix="lvdk-kill-", dir="/tmp")
    env = {**os.environ, "LVDKIT_TEST_SHARD_DELAY_S": "0.4", "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvdkit.cli", "curate", *_args(killed, small_demo)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    n_shards = len(part_files(reference / "ingest"))
    deadline = time.time() + 240
    while len(part_files(killed / "ingest")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    _kill_tree(proc)
    survivors = {p.name: p.stat().st_mtime_ns for p in part_files(killed / "ingest")}
    assert 3 <= len(survivors) < n_shards, "the run was not interrupted mid-stage"
    assert not (killed / "ingest" / "_SUCCESS").exists()

    rerun = run_cli("curate", *_args(killed, small_demo))
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(survivors)} of {n_shards} shards already done" in rerun.stderr
    assert all((killed / "ingest" / name).stat().st_mtime_ns == m for name, m in survivors.items())  # not redone

    for stage, sch in (
        ("ingest", schema.INGEST),
        ("dedup_exact", schema.DEDUP),
        ("dedup_phash", schema.DEDUP),
        ("embed", None),
        ("dedup_copy", schema.DEDUP),
        ("dedup_relative", schema.DEDUP),
    ):
        got, want = read_parts(killed / stage, schema=sch), read_parts(reference / stage, schema=sch)
        assert got.num_rows == want.num_rows
        assert len(set(got[schema.IMAGE_ID].to_pylist())) == got.num_rows  # no row twice
        assert _sorted(got).equals(_sorted(want)), stage
    assert _sorted(pq.read_table(killed / "status.parquet")).equals(
        _sorted(pq.read_table(reference / "status.parquet"))
    )


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
    assert f"{len(parts) - 1} of {len(parts)} shards already done" in capsys.readouterr().err
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
