"""Shared fixtures: one real local Ray for the session, and a small real demo dataset."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SMALL_DEMO_PER_DIGIT = 10
# A small random-init model for the embed stage in tests that run the whole curation (no weights, no network).
TINY_EMBED = (
    "embed.models={copy: 'timm:resnet10t'}",
    "embed.model_options={}",
    "embed.images_per_part=64",
    "embed.calibration_copies=30",
    "cluster.embedding=copy",
    "retrieve.embedding=copy",
    "curated.embedding=copy",
)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray with 2 CPUs and a small object store, shared by the tests that need one."""
    import ray

    tmp = tempfile.mkdtemp(prefix="lvdk-ray-", dir="/tmp")
    ray.init(
        num_cpus=2, object_store_memory=200 * 2**20, _temp_dir=tmp, include_dashboard=False, logging_level="WARNING"
    )
    from lvdkit.core.ray_env import _quiet_ray_data

    _quiet_ray_data()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo (10 MNIST per digit, photos, planted copies and broken files), built once per session."""
    from lvdkit.demo import make_demo

    out = tmp_path_factory.mktemp("demo")
    make_demo(out, seed=0, n_per_digit=SMALL_DEMO_PER_DIGIT, progress=False)
    return out


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``lvdkit ARGS`` in a fresh interpreter (its own Ray), capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "lvdkit.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the driver and every process it started (raylet, GCS, workers), as a crash or OOM kill would."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.wait()
    psutil.wait_procs(tree, timeout=30)
