"""``ray job submit`` of an lvdkit stage against a separately started head (with its dashboard, which serves the
Jobs API), with a runtime environment; and a local run under Ray's default authentication needs no setup."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lvdkit.core.io import part_files

from ..ray_head import free_port, start_head, stop_head

BIN = Path(sys.executable).parent
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def head_with_jobs() -> Iterator[str]:
    """``ray start --head`` on loopback with the dashboard; yields the Jobs API address (http://...)."""
    port, dashboard, agent = free_port(), free_port(), free_port()
    head = start_head(
        port,
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",  # its default (52365) may be taken by another Ray here
    )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited"
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/api/version", timeout=2) as reply:
            if json.load(reply).get("ray_version"):
                break
        time.sleep(1)
    try:
        yield url
    finally:
        stop_head(head)


def test_ray_job_submit_runs_a_stage_on_the_head(head_with_jobs: str, small_demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # The runtime environment puts this checkout's lvdkit first on the job's path and sets a variable the job's
    # driver must see: ray.address=auto comes from RAY_ADDRESS, which the job supervisor sets to its own cluster.
    runtime_env = {"env_vars": {"PYTHONPATH": str(SRC), "LVDKIT_JOB_MARK": "from-runtime-env"}}
    entrypoint = [
        str(BIN / "lvdkit"),
        "run",
        "ingest",
        f"out={out}",
        f"ingest.inputs=[{small_demo / 'raw'}]",
        "ingest.files_per_part=50",
        "ingest.phash=false",  # no PHash: the fresh head's workers need not import imagededup (and torch) for it
        "progress=false",
    ]
    submit = [str(BIN / "ray"), "job", "submit", "--address", head_with_jobs]
    submit += ["--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    deadline = time.time() + 120
    while True:  # the head's job agent starts a little after its dashboard answers: Ray says to try again
        done = subprocess.run(
            submit, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"}
        )
        if "No available agent" not in done.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert (out / "ingest" / "_SUCCESS").exists() and len(part_files(out / "ingest")) >= 2
    record = json.loads((out / "ingest" / "_SUCCESS").read_text())
    assert record["rows"] > 0
    assert not (out / "_ray").exists()  # the job's driver joined the head instead of starting a local Ray


def test_a_local_run_needs_no_ray_auth_setup(small_demo: Path, tmp_path: Path) -> None:
    """Ray's default (token authentication for a local Ray) is left alone: with RAY_AUTH_MODE unset and a HOME
    that has never seen Ray, a stage still runs, and Ray made its own token."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(home)
    out = tmp_path / "out"
    args = [f"out={out}", f"ingest.inputs=[{small_demo / 'raw'}]", "ingest.files_per_part=50", "progress=false"]
    args.append("ingest.phash=false")  # the fresh Ray's workers need not import imagededup (and torch) for PHash
    done = subprocess.run(
        [sys.executable, "-m", "lvdkit.cli", "run", "ingest", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "ingest" / "_SUCCESS").exists()
    assert (home / ".ray" / "auth_token").is_file()  # token mode was on: Ray generated the token itself
