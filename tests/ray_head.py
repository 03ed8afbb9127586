"""A Ray head started with ``ray start --head`` on loopback, for the tests that need a separately started cluster and
for the CLI runs that share one (see :func:`tests.conftest.run_cli`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def free_port() -> int:
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


def wait_for_head(head: subprocess.Popen[bytes], port: int, timeout: float = 120) -> str:
    """The head's address once its port answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return f"127.0.0.1:{port}"
        if head.poll() is not None:
            raise RuntimeError("ray start --head exited")
        time.sleep(0.5)
    raise RuntimeError(f"ray start --head did not answer on port {port} within {timeout:.0f} s")


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
