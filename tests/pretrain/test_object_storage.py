"""Pretraining on object storage, through a real S3 API server on loopback (moto's server mode): curated shards read
from a bucket (``lvdkit.load_curated`` and ``lvdkit pretrain data=s3://...``), a run whose folder is a bucket
prefix (Ray Train's checkpoints, the metrics log, the final record), its export written to the bucket, and (in
``make test-all``) such a run killed with SIGKILL and resumed from its S3 checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from lvdkit.core.storage import ObjectPath, location
from lvdkit.curated import load_curated
from lvdkit.embeddings.model_file import load_lvdkit_model
from lvdkit.pretrain.run import checkpoints
from lvdkit.pretrain.train import read_checkpoint

from ..conftest import kill_tree, run_cli
from ..s3_server import client, environment, s3_server, upload
from .test_pretrain_run import TINY_VIT, TOTAL_STEPS, parts  # noqa: F401  (parts: the curated shards fixture)

DATA = "s3://lvd/curate/curated"


@pytest.fixture(scope="module")
def s3(parts: Path) -> Iterator[dict[str, str]]:  # noqa: F811
    with s3_server() as env, environment(env):
        fs = client(env)
        fs.create_dir("lvd")
        upload(fs, parts, "lvd/curate/curated")
        yield env


def test_load_curated_reads_the_shards_from_a_bucket(s3: dict[str, str], parts: Path) -> None:  # noqa: F811
    remote = load_curated("s3://lvd/curate", as_="pandas")
    local = pq.read_table(parts).to_pandas()
    assert sorted(remote["image_id"]) == sorted(local["image_id"])
    assert sorted(remote["image"].map(bytes)) == sorted(local["image"].map(bytes))
    with pytest.raises(FileNotFoundError, match="no curated shards in s3://lvd/nothing/curated"):
        load_curated("s3://lvd/nothing")


def _metrics(run: str) -> list[dict[str, float]]:
    text = (ObjectPath(run) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _registered_step(run: str) -> int:
    try:
        latest = json.loads((ObjectPath(run) / "checkpoint_manager_snapshot.json").read_text())
        return int(latest["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@pytest.mark.slow  # a training with its own Ray (S3 settings), ~90 s: `make test-all` (make test: load_curated above)
def test_a_run_in_a_bucket_reads_s3_shards_checkpoints_there_skips_when_done_and_exports_there(
    s3: dict[str, str], tmp_path: Path
) -> None:
    run = "s3://lvd/pretrain/whole"
    done = run_cli("pretrain", f"out={run}", f"data={DATA}", *TINY_VIT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [int(r["step"]) for r in _metrics(run)] == list(range(1, TOTAL_STEPS + 1))
    final = json.loads((ObjectPath(run) / "final.json").read_text())
    assert final["step"] == TOTAL_STEPS and final["checkpoint"].startswith(f"{run}/checkpoint_")
    assert (ObjectPath(run) / "config.yaml").is_file()
    assert list((ObjectPath(run) / "tensorboard").rglob("events.out.tfevents.*"))  # published from the staging folder
    found = checkpoints(location(run))
    assert 1 <= len(found) <= 3  # keep_checkpoints, kept by Ray Train in the bucket
    state, meta = read_checkpoint(found[-1])
    assert meta["step"] == TOTAL_STEPS
    assert not list(Path.cwd().glob("s3:*"))  # nothing written to a local folder named like the URI

    again = run_cli("pretrain", f"out={run}", f"data={DATA}", *TINY_VIT, "resume=true")
    assert again.returncode == 0 and "already finished" in again.stdout

    exported = run_cli("export", run, "--out", "s3://lvd/exports/dinov2.safetensors")
    assert exported.returncode == 0, exported.stderr[-3000:]
    for name in ("dinov2.safetensors", "dinov2.json", "dinov2.provenance.json"):
        (tmp_path / name).write_bytes((ObjectPath("s3://lvd/exports") / name).read_bytes())
    model, _, _, _ = load_lvdkit_model(tmp_path / "dinov2.safetensors")
    teacher = {k.removeprefix("teacher.backbone."): v for k, v in state["method"].items() if "teacher.backbone." in k}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, teacher[key])
    assert json.loads((tmp_path / "dinov2.provenance.json").read_text())["run"] == run


@pytest.mark.slow  # two trainings, about 2 min: `make test-all` (keeps `make test` under 20 minutes)
def test_a_run_in_a_bucket_killed_with_sigkill_resumes_from_its_s3_checkpoint(s3: dict[str, str]) -> None:
    run = "s3://lvd/pretrain/killed"
    args = [sys.executable, "-m", "lvdkit.cli", "pretrain", f"out={run}", f"data={DATA}", *TINY_VIT]
    env = {**os.environ, "LVDKIT_TEST_STEP_DELAY_S": "1.0"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while _registered_step(run) < 4:
        assert proc.poll() is None, (proc.stderr.read() if proc.stderr else b"").decode()[-3000:]
        assert time.time() < deadline, "no checkpoint reached the bucket in time"
        time.sleep(0.5)
    kill_tree(proc)
    killed = _registered_step(run)
    assert killed < TOTAL_STEPS, "the run finished before it could be killed"
    assert not (ObjectPath(run) / "final.json").exists()

    done = run_cli("pretrain", f"out={run}", f"data={DATA}", *TINY_VIT, "resume=true", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [int(r["step"]) for r in _metrics(run)]
    # The log in the bucket survived the kill (published up to a checkpoint, the last maybe not yet registered) and
    # the resumed run appended from the step after the registered checkpoint: steps redone appear twice, none lost.
    resumed = list(range(killed + 1, TOTAL_STEPS + 1))
    before = steps[: len(steps) - len(resumed)]
    assert steps[len(before) :] == resumed
    assert before == list(range(1, len(before) + 1)) and len(before) >= killed
    assert read_checkpoint(checkpoints(location(run))[-1])[1]["step"] == TOTAL_STEPS
