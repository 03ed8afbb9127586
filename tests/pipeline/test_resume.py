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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.io import part_files, read_parts
from lvdkit.core.settings import load_config
from lvdkit.pipeline.commits import untrusted
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.names import CURATE_ORDER
from lvdkit.pipeline.runner import run

from ..conftest import curate_args, kill_tree, run_cli


def _args(out: Path, demo: Path) -> list[str]:
    return curate_args(str(out), str(demo))


SUMMARY = "summary"  # the kill point after the last stage: status.parquet written, summary.json not yet


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
        return CURATE_ORDER if self.stage == SUMMARY else CURATE_ORDER[: CURATE_ORDER.index(self.stage)]

    def reached(self, out: Path) -> bool:
        if self.stage == SUMMARY:
            return (out / "status.parquet").exists()
        return len(_committed(out / self.stage)) >= self.parts


def _committed(stage_dir: Path) -> list[Path]:
    """Parts with their commit record: a part file killed before its record is written is redone, not resumed."""
    return [p for p in part_files(stage_dir) if untrusted(p) is None]


def _whole(stage: str) -> KillPoint:
    """A whole-dataset stage, killed after writing its output and before ``_SUCCESS``."""
    return KillPoint(stage, f"{stage}:60", parts=1, sharded=False)


KILL_POINTS = (
    KillPoint("ingest", "ingest:0.4", parts=3, sharded=True),  # Ray Data part tasks
    KillPoint("embed", "embed:60", parts=1, sharded=True),  # an embed actor is killed with the tree
    *(_whole(s) for s in ("dedup_exact", "dedup_phash", "dedup_copy", "dedup_relative", "cluster", "retrieve")),
    KillPoint("curated", "curated:2", parts=2, sharded=True),  # writing the curated set
    KillPoint(SUMMARY, f"{SUMMARY}:60", parts=0, sharded=False),
)
assert {k.stage for k in KILL_POINTS} == {*CURATE_ORDER, SUMMARY}, "a stage without a kill point"
# The whole-dataset stages share one code path (one task writes the parts, then _SUCCESS): dedup_copy's kill point
# (the one with the most side files) runs in `make test`, the others in `make test-all` (about 20 s each).
# Ingest's Ray Data part tasks share their kill-and-resume path with the curated set's (about 70 s): also test-all.
# The curated set's kill point also runs in `make test` on object storage (tests/pipeline/test_object_storage.py).
# Embed's (about 80 s, a killed actor pool) is test-all too, so that `make test` stays under 20 minutes: its resume
# part by part is also shown in `make test` by tests/pipeline/test_embed.py (a lost part redone, the others kept,
# the same embeddings), and a killed process tree's resume by the dedup_copy and object-storage kill points.
SAME_PATH_AS_DEDUP_COPY = {"dedup_exact", "dedup_phash", "dedup_relative", "cluster", "retrieve"}
SLOW_KILLS = SAME_PATH_AS_DEDUP_COPY | {"ingest", "curated", "embed"}
KILL_PARAMS = [
    pytest.param(k, id=k.stage, marks=[pytest.mark.slow] if k.stage in SLOW_KILLS else []) for k in KILL_POINTS
]


def _curate_in_process(out: Path, demo: Path) -> None:
    """What ``lvdkit curate`` does, on the tests' shared local Ray (no start-up per run)."""
    run(load_config(CurateConfig, None, _args(out, demo)))


@pytest.fixture(scope="module")
def reference(curate_reference: Path) -> Path:
    """One uninterrupted run, compared against by every kill point."""
    assert read_parts(curate_reference / "curated").num_rows > 2 * 8, "the curated stage needs several parts"
    return curate_reference


def _key(table: pa.Table) -> list[tuple[str, str]]:
    return [(c, "ascending") for c in (schema.IMAGE_ID, schema.EDIT, "seed_set") if c in table.column_names]


def _sorted(table: pa.Table) -> pa.Table:
    key = _key(table)
    return table.sort_by(key) if key else table  # a work list without ids (ingest's) is in listing order


def _assert_every_part_is_complete(out: Path) -> None:
    """A killed run leaves only complete parts (readable, all rows present): temporaries are hidden names."""
    for part in out.rglob("part-*.parquet"):
        meta = pq.ParquetFile(part).metadata
        assert pq.read_table(part).num_rows == meta.num_rows, part


@pytest.mark.parametrize("point", KILL_PARAMS)
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
    while not point.reached(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if point.stage == SUMMARY:
        _assert_summary_redone(killed, reference, small_demo, capsys)
        return
    survivors = {p.name: p.stat().st_mtime_ns for p in _committed(stage_dir)}
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

    _assert_same_outputs(killed, reference)


def _assert_summary_redone(killed: Path, reference: Path, demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (killed / "status.parquet").exists() and not (killed / "summary.json").exists(), "not killed in between"
    capsys.readouterr()
    _curate_in_process(killed, demo)
    log = capsys.readouterr().err
    assert all(f"{stage}: up to date" in log for stage in CURATE_ORDER)
    _assert_same_outputs(killed, reference)


def _assert_same_outputs(killed: Path, reference: Path, tol: float | None = None) -> None:
    """Every table, side file, the status and the summary equal the reference's; with ``tol``, float values (and
    only they) may differ by that much, every decision still exactly equal."""
    _assert_every_part_is_complete(killed)
    assert not list(killed.rglob(".*.tmp-*")), "temporary files left behind"
    _assert_same_side_files(killed, reference, tol)
    folders = [*CURATE_ORDER, "embed/calibration"]
    for folder in folders:
        got, want = read_parts(killed / folder), read_parts(reference / folder)
        assert got.num_rows == want.num_rows, folder
        keys = got.select([c for c, _ in _key(got)]).to_pylist()
        assert len({tuple(k.values()) for k in keys}) == got.num_rows, f"{folder}: a row twice"
        _assert_equal_tables(got, want, folder, tol)
    status, want_status = pq.read_table(killed / "status.parquet"), pq.read_table(reference / "status.parquet")
    assert _sorted(status).equals(_sorted(want_status))  # same images kept, same duplicates (of the same images)
    summary, want_summary = (json.loads((o / "summary.json").read_text()) for o in (killed, reference))
    for key in ("images_in", "kept", "duplicates", "quarantined", "curated", "duplicates_by_stage"):
        assert summary[key] == want_summary[key], key


def _is_float(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or (
        (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)) and _is_float(t.value_type)
    )


def _assert_equal_tables(got: pa.Table, want: pa.Table, where: object, tol: float | None) -> None:
    got, want = _sorted(got), _sorted(want)
    if tol is None:
        assert got.equals(want), where
        return
    assert got.schema == want.schema, where
    for name in got.column_names:
        a, b = got[name], want[name]
        if not _is_float(a.type):
            assert a.equals(b), (where, name)
            continue
        if not pa.types.is_floating(a.type):
            a, b = (pc.list_flatten(c) for c in (a, b))
        assert a.null_count == b.null_count, (where, name)
        x, y = (np.asarray(c.to_numpy(zero_copy_only=False), dtype=np.float64) for c in (a, b))
        np.testing.assert_allclose(x, y, rtol=0, atol=tol, err_msg=f"{where}: {name}")


def _approx(a: object, b: object, tol: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_approx(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_approx(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol
    return a == b


def _assert_same_side_files(killed: Path, reference: Path, tol: float | None = None) -> None:
    """Every file besides the parts (whitening, centroids, seed and protected tables, quarantined parts, ...) and
    every stage's recorded statistics equal the uninterrupted run's."""
    for stage in CURATE_ORDER:
        want = {p.relative_to(reference) for p in (reference / stage).rglob("*") if p.is_file()}
        got = {p.relative_to(killed) for p in (killed / stage).rglob("*") if p.is_file()}
        assert got == want, stage
        for rel in want:
            if rel.name == "_SUCCESS":
                records = [json.loads((o / rel).read_text()) for o in (killed, reference)]
                assert records[0]["rows"] == records[1]["rows"], rel
                assert _approx(records[0]["stats"], records[1]["stats"], tol or 0.0), rel
            elif rel.suffix == ".parquet" or rel.name == "_listing":
                _assert_equal_tables(pq.read_table(killed / rel), pq.read_table(reference / rel), rel, tol)
            elif rel.suffix == ".npz":
                with np.load(killed / rel) as a, np.load(reference / rel) as b:
                    assert a.files == b.files, rel
                    for k in a.files:
                        # With tol: a PCA fitted on fewer descriptors than dimensions has near-zero eigenvalues whose
                        # axes any last-bit change turns; the distances and decisions it gives are compared instead.
                        assert a[k].shape == b[k].shape, rel
                        if tol is None:
                            np.testing.assert_array_equal(a[k], b[k], err_msg=str(rel))
            elif rel.suffix == ".npy":
                got_array, want_array = np.load(killed / rel), np.load(reference / rel)
                np.testing.assert_allclose(got_array, want_array, rtol=0, atol=tol or 0.0, err_msg=str(rel))
            elif tol is None or rel.parent.name != "_commits":  # a float's last bit changes a part's checksum
                assert (killed / rel).read_bytes() == (reference / rel).read_bytes(), rel


def _ingest_in_process(out: Path, demo: Path) -> None:
    run(load_config(CurateConfig, None, _args(out, demo)), stages=("ingest",))


@pytest.mark.usefixtures("ray_local")
def test_a_missing_marker_or_leftover_temp_file_is_not_taken_as_output(
    reference: Path, small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference / "ingest", out / "ingest")  # a finished ingest of _args(out, small_demo)
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
    reference: Path, small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference / "ingest", out / "ingest")  # a finished ingest of _args(out, small_demo)
    (out / "ingest" / "_SUCCESS").unlink()
    (out / "ingest" / "_RUNNING").write_text('{"config_hash": "other", "fingerprint": "other"}')
    stale = out / "ingest" / "part-999999.parquet"
    stale.write_bytes(b"from another run")
    capsys.readouterr()
    _ingest_in_process(out, small_demo)
    assert "already done" not in capsys.readouterr().err
    assert not stale.exists()


@pytest.mark.slow  # a whole curation with one CPU, about 65 s: `make test-all` (keeps `make test` under 20 minutes)
def test_a_run_on_one_cpu_decides_exactly_as_the_two_cpu_reference(
    reference: Path, small_demo: Path, tmp_path: Path
) -> None:
    """Another Ray CPU count changes which parts run side by side, in what order they finish, and the threads each
    task may use: the decisions, side files, status and curated set stay the same."""
    out = tmp_path / "one_cpu"
    args = ["ray.num_cpus=1" if a.startswith("ray.num_cpus=") else a for a in _args(out, small_demo)]
    done = run_cli("curate", *args, env={"RAY_TMPDIR": tempfile.mkdtemp(prefix="lvdk-1cpu-", dir="/tmp")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_config(CurateConfig, out / "config.yaml").ray.num_cpus == 1
    # Another thread count sums the convolutions in another order: embeddings differ in the last bits (about 3e-8),
    # whitened distances and the calibrated threshold by about 2e-6, nowhere near enough to move a decision; every
    # decision, the status and the curated ids stay exactly equal.
    _assert_same_outputs(out, reference, tol=1e-4)
