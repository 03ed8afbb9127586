"""A stage runs unchanged on a separately started Ray cluster (``ray start --head`` on loopback) via ``--address``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lvdkit.core.io import part_files

from ..conftest import run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_head(port: int, *options: str) -> subprocess.Popen[bytes]:
    """``ray start --head --block`` on loopback (2 CPUs, auth off, its own temp folder) with extra ``options``."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    tmp = tempfile.mkdtemp(prefix="lvdk-head-", dir="/tmp")
    return subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            f"--temp-dir={tmp}",
            "--disable-usage-stats",
            *options,
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )


def stop_head(head: subprocess.Popen[bytes]) -> None:
    """Stop the head and everything it started (``ray start --block`` may already have exited: a flake seen once)."""
    try:
        procs = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)  # some of Ray's processes outlive SIGTERM: killed below
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@pytest.fixture
def ray_head() -> Iterator[str]:
    port = _free_port()
    head = start_head(port, "--include-dashboard=false")
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert head.poll() is None, "ray start --head exited"
        time.sleep(0.5)
    try:
        yield address
    finally:
        stop_head(head)


def test_stage_runs_on_a_separately_started_head(ray_head: str, small_demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [f"out={out}", f"ingest.inputs=[{small_demo / 'raw'}]", "ingest.files_per_part=50", "progress=false"]
    result = run_cli("run", "ingest", "--address", ray_head, *args, env={"RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 0, result.stderr
    assert (out / "ingest" / "_SUCCESS").exists() and len(part_files(out / "ingest")) >= 2
    assert not (out / "_ray").exists()  # no local Ray was started: the driver joined the head
    # The head outlives the driver: a second stage joins it through RAY_ADDRESS as well.
    result = run_cli("run", "dedup_exact", *args, env={"RAY_ADDRESS": ray_head, "RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 0, result.stderr
    assert (out / "dedup_exact" / "_SUCCESS").exists()


def test_a_local_ray_that_cannot_start_is_an_lvdkit_error_with_a_hint(tmp_path: Path) -> None:
    """Its temporary folder cannot be made (a file stands in the way): exit status 2, no traceback."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "x.png").write_bytes(b"junk")
    done = run_cli(
        "curate",
        f"out={tmp_path / 'out'}",
        f"ingest.inputs=[{pool}]",
        "progress=false",
        env={"RAY_TMPDIR": str(blocker / "ray")},
    )
    assert done.returncode == 2, done.stderr
    assert "lvdkit: error: could not start a local Ray" in done.stderr
    assert "Traceback" not in done.stderr
