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
from typing import Any

import psutil
import pytest

from .ray_head import free_port, start_head, stop_head, wait_for_head

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


@pytest.fixture(scope="session")
def pool_run(ray_local: None, small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One whole curation of the small demo's raw pool with :data:`TINY_EMBED` and nothing else configured (no seed
    set, no protected set, no balanced sample: the curated set is the deduplicated pool), in ingest parts of 40 files;
    run once in this process and read by the tests of tests/pipeline/test_runner.py and test_empty_outputs.py.
    Returns OUT and the run's summary. Never written to: a test that reruns it works on a copy."""
    from lvdkit.core.settings import load_config
    from lvdkit.pipeline.config import CurateConfig
    from lvdkit.pipeline.runner import run

    out = tmp_path_factory.mktemp("pool_run") / "run"
    summary = run(load_config(CurateConfig, None, pool_run_args(out, small_demo)))
    return out, summary


def pool_run_args(out: Path, demo: Path, *overrides: str) -> list[str]:
    """The overrides of :func:`pool_run` (and of reruns of a copy of it), then ``overrides``."""
    return [
        f"out={out}",
        f"ingest.inputs=[{demo / 'raw'}]",
        "ingest.files_per_part=40",
        "progress=false",
        *TINY_EMBED,
        *overrides,
    ]


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a finished run's OUT (file times kept), to rerun without touching a shared fixture's output."""
    import shutil

    shutil.copytree(src, dst)
    return dst


def curate_args(out: str, demo: str) -> list[str]:
    """A whole curation of the small demo with work for every stage: small ingest parts, a protected set and a seed
    set (dedup_relative and retrieve have work and side files), and a balanced sample in several curated parts (a
    run can be killed between them)."""
    return [
        f"out={out}",
        f"ingest.inputs=[{demo}/raw]",
        "ingest.files_per_part=5",
        "progress=false",
        "ray.num_cpus=2",
        *TINY_EMBED,
        "cluster.target_size=40",
        "curated.rows_per_part=8",
        f"dedup_relative.protected=[{demo}/heldout]",
        f"retrieve.seed_sets={{digit_2: {{inputs: [{demo}/seeds/digit_2], mode: sample, k: 2}}}}",
    ]


@pytest.fixture(scope="session")
def curate_reference(ray_local: None, small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted :func:`curate_args` run on local disk, run once in this process (on :func:`ray_local`) and
    compared against by the runs killed and resumed, on disk and in buckets."""
    from lvdkit.core.settings import load_config
    from lvdkit.pipeline.config import CurateConfig
    from lvdkit.pipeline.runner import run

    out = tmp_path_factory.mktemp("reference") / "run"
    run(load_config(CurateConfig, None, curate_args(str(out), str(small_demo))))
    return out


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, own_ray: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``lvdkit ARGS`` in a fresh interpreter, capturing output.

    ``curate``, ``run`` and ``pretrain`` join the session's shared Ray head (:func:`shared_head`) through
    ``RAY_ADDRESS``, as a user's runs join a cluster: starting and stopping a local Ray costs each run about 11 s of
    the suite. A run gets its own local Ray with ``own_ray``, when it names its own Ray (``RAY_ADDRESS``,
    ``RAY_TMPDIR``, ``--address``, ``ray.address=``, a CPU count other than the head's 2), or when its workers would
    need another environment than the head's (S3 variables set by a test, say)."""
    extra = dict(env or {})
    if not own_ray and _may_share(args, extra) and _same_environment({**os.environ, **extra}):
        extra.update(RAY_ADDRESS=shared_head(), RAY_AUTH_MODE="disabled")
    return subprocess.run(
        [sys.executable, "-m", "lvdkit.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **extra},
    )


def _may_share(args: tuple[str, ...], env: dict[str, str]) -> bool:
    if not args or args[0] not in ("curate", "run", "pretrain") or {"RAY_ADDRESS", "RAY_TMPDIR"} & env.keys():
        return False
    own = ("--address", "ray.address=", "ray.object_store_memory_mb=")
    cpus = [a for a in args if a.startswith("ray.num_cpus=")]
    return not any(a.startswith(own) for a in args) and all(a == "ray.num_cpus=2" for a in cpus)


_SHARED: dict[str, Any] = {}
_DRIVER_ONLY = ("LVDKIT_TEST_", "RAY_", "PYTEST_")  # read by the driver (or pytest) only, never by a worker


def _worker_view(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(_DRIVER_ONLY)}


def _same_environment(env: dict[str, str]) -> bool:
    """Whether the head's workers see what this run's would (S3 variables set by a test, say: they would not)."""
    if "address" not in _SHARED:
        return True  # the head starts now, with this environment
    return bool(_worker_view(env) == _SHARED["env"])


def shared_head() -> str:
    """The address of a ``ray start --head`` (2 CPUs, loopback, auth off) started at first use and stopped when the
    session ends (:func:`pytest_sessionfinish`)."""
    if "address" not in _SHARED:
        port = free_port()
        head = start_head(port, "--include-dashboard=false", f"--object-store-memory={300 * 2**20}")
        _SHARED["head"] = head
        _SHARED["env"] = _worker_view(dict(os.environ))
        _SHARED["address"] = wait_for_head(head, port)
    return str(_SHARED["address"])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "head" in _SHARED:
        stop_head(_SHARED.pop("head"))
        _SHARED.clear()


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the driver and every process it started (raylet, GCS, workers), as a crash or OOM kill would."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.wait()
    psutil.wait_procs(tree, timeout=30)
