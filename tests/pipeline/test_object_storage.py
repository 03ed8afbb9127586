"""A whole ``lvdkit curate`` with its inputs, protected set, seed set and OUT in buckets of a real S3 API server on
loopback (moto's server mode, started by the fixture): killed with SIGKILL in the middle of ingest, rerun, rerun again
(everything up to date, checked against the bucket), and compared with the same run on local disk. Nothing is lost
or doubled, and nothing outside OUT is touched."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lvdkit import load_curated
from lvdkit.core import schema
from lvdkit.core.io import part_files, read_json
from lvdkit.core.settings import load_config
from lvdkit.core.storage import ObjectPath, location
from lvdkit.pipeline.commits import untrusted
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.names import CURATE_ORDER
from lvdkit.pipeline.runner import run
from lvdkit.report import write_report

from ..conftest import curate_args, kill_tree, run_cli
from ..s3_server import client, environment, s3_server, upload

DEMO = ("raw", "heldout", "seeds/digit_2")
FUNNEL = ("images_in", "kept", "duplicates", "quarantined", "duplicates_by_stage", "quarantined_by_reason", "curated")


@pytest.fixture(scope="module")
def bucket(small_demo: Path) -> Iterator[tuple[dict[str, str], list[str]]]:
    """The server's environment, with the small demo's raw pool, protected set and seed set in ``s3://lvd/demo``;
    and the keys uploaded."""
    with s3_server() as env:
        fs = client(env)
        fs.create_dir("lvd")
        keys = [k for sub in DEMO for k in upload(fs, small_demo / sub, f"lvd/demo/{sub}")]
        yield env, keys


def _committed(stage: ObjectPath) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in part_files(stage) if untrusted(p) is None}


def test_curate_in_buckets_killed_mid_stage_resumes_with_nothing_lost_or_doubled(
    bucket: tuple[dict[str, str], list[str]],
    curate_reference: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env, keys = bucket
    out, demo = "s3://lvd/runs/a", "s3://lvd/demo"
    ray_tmp = tempfile.mkdtemp(prefix="lvdk-s3-", dir="/tmp")
    killed_env = {**os.environ, **env, "LVDKIT_TEST_STAGE_DELAY": "ingest:1", "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvdkit.cli", "curate", *curate_args(out, demo)],
        env=killed_env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with environment(env):
        ingest = location(out) / "ingest"
        assert isinstance(ingest, ObjectPath)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and len(_committed(ingest)) < 3:
            time.sleep(0.2)
        kill_tree(proc)
        survivors = _committed(ingest)
        assert len(survivors) >= 3, "the run did not get into ingest"
        assert (ingest / "_RUNNING").is_file() and not (ingest / "_SUCCESS").exists(), "not killed mid-stage"
        assert not (location(out) / "summary.json").exists()

    rerun = run_cli("curate", *curate_args(out, demo), env={**env, "RAY_TMPDIR": ray_tmp}, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = re.search(r"ingest: (\d+) of (\d+) parts already done", rerun.stderr)
    assert resumed is not None, rerun.stderr[-3000:]
    assert int(resumed[1]) == len(survivors) < int(resumed[2])
    assert not any(tmp_path.iterdir())  # the killed run wrote nothing in its working folder (no "s3:" folder)

    with environment(env):
        # Again, in this process (what `lvdkit curate` runs; nothing to do, so no Ray task): every stage is up to
        # date, checked against the bucket.
        capsys.readouterr()
        run(load_config(CurateConfig, None, curate_args(out, demo)))
        again = capsys.readouterr().err
        assert all(f"{s}: up to date" in again for s in CURATE_ORDER), again
        assert {k: v for k, v in _committed(ingest).items() if k in survivors} == survivors  # not redone
        summary = read_json(location(out) / "summary.json")
        assert summary is not None
        status = pq.read_table(f"{out}/status.parquet")
        raw = sorted(f"s3://{k}" for k in keys if k.startswith("lvd/demo/raw/"))
        assert sorted(status[schema.URI].to_pylist()) == raw  # every input once: nothing lost, nothing doubled
        shards = load_curated(out, as_="pandas")
        assert len(shards) == summary["curated"] and shards[schema.IMAGE_ID].is_unique
        kept = status.filter(pc.equal(status[schema.STATUS_COL], schema.FINAL_KEPT))[schema.URI].to_pylist()
        pool = [u for u in shards[schema.URI] if u.startswith(f"{demo}/raw/")]
        assert set(pool) <= set(kept) and all(
            u.startswith(f"{demo}/seeds/") for u in shards[schema.URI] if u not in pool
        )
        page = write_report(out, tmp_path / "report.html")  # the report reads the run from the bucket
        assert isinstance(page, Path) and "digit_2" in page.read_text()
        listed = sorted(info.path for info in client(env).get_file_info(_selector("lvd")) if info.is_file)
        assert [k for k in listed if not k.startswith("lvd/runs/a/")] == sorted(keys)  # nothing else touched

    reference = read_json(curate_reference / "summary.json")
    assert reference is not None
    assert {k: summary[k] for k in FUNNEL} == {k: reference[k] for k in FUNNEL}  # the same decisions as on disk


def _selector(bucket: str) -> object:
    import pyarrow.fs as pafs

    return pafs.FileSelector(bucket, recursive=True)


def test_an_out_in_a_bucket_is_claimed_and_locked_like_a_folder(bucket: tuple[dict[str, str], list[str]]) -> None:
    import json
    import socket

    from lvdkit.pipeline.ownership import LOCK, MARKER, OutputFolderError, check_not_inside_inputs, claim, locked

    env, _ = bucket
    with environment(env):
        with pytest.raises(OutputFolderError, match="did not create"):
            claim(location("s3://lvd/demo"))  # someone else's objects: refused, nothing written
        assert not (location("s3://lvd/demo") / MARKER).exists()
        with pytest.raises(OutputFolderError, match="overlap"):
            check_not_inside_inputs(location("s3://lvd/demo/raw/out"), ["s3://lvd/demo/raw"])
        check_not_inside_inputs(location("s3://lvd/demo-out"), ["s3://lvd/demo"])  # a sibling prefix is fine
        out = location("s3://lvd/runs/locks")
        claim(out)
        assert (out / MARKER).is_file()
        with locked(out), pytest.raises(OutputFolderError, match="in use by another lvdkit run"), locked(out):
            pass
        assert not (out / LOCK).exists()
        dead = {"host": socket.gethostname(), "pid": 2**22 + 1, "since": 0, "token": "dead"}
        (out / LOCK).write_text(json.dumps(dead))  # left by a killed run on this machine: taken over
        with locked(out):
            assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()


def test_a_part_in_a_bucket_without_its_commit_record_is_moved_aside_and_redone(
    bucket: tuple[dict[str, str], list[str]],
) -> None:
    """Killed between a part's PUT and its record's: on resume the part is not trusted but moved to ``_torn/``."""
    import pyarrow as pa

    from lvdkit.core.io import write_parquet_atomic
    from lvdkit.pipeline.commits import commit_part
    from lvdkit.pipeline.runner import TORN, _set_aside_untrusted
    from lvdkit.pipeline.stages import STAGES

    env, _ = bucket
    table = pa.table({"x": [1, 2, 3]})
    with environment(env):
        stage_dir = location("s3://lvd/runs/torn/curated")
        commit_part(table, stage_dir / "part-000000.parquet", None)
        write_parquet_atomic(table, stage_dir / "part-000001.parquet")  # its record never written
        _set_aside_untrusted(STAGES["curated"], stage_dir)
        assert [p.name for p in part_files(stage_dir)] == ["part-000000.parquet"]
        assert (stage_dir / TORN / "part-000001.parquet").is_file()
