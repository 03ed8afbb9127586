"""Starting Ray: a local instance by default, a running cluster with ``--address`` / ``RAY_ADDRESS``."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
import ray.data

from lvdkit.core.storage import ObjectPath

# Unix socket paths (under the temp dir) are limited to 107 bytes; Ray appends ~70 characters of its own.
_MAX_TEMP_DIR_LEN = 36


def ray_temp_dir(out: Path | ObjectPath) -> str:
    """``RAY_TMPDIR`` if set, else ``OUT/_ray`` when short enough for Ray's sockets, else a per-OUT /tmp folder
    (always for an OUT on object storage: Ray's sockets and logs are local files)."""
    if os.environ.get("RAY_TMPDIR"):
        return os.environ["RAY_TMPDIR"]
    candidate = str((out / "_ray").resolve())
    if isinstance(out, Path) and len(candidate) <= _MAX_TEMP_DIR_LEN:
        return candidate
    tag = hashlib.blake2b(str(out.resolve()).encode(), digest_size=4).hexdigest()
    return os.path.join(tempfile.gettempdir(), f"lvdkit-ray-{tag}")


class RayStartError(RuntimeError):
    """Ray could not be started or joined; the message says which and what to try."""


def _start_hint(address: str | None, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    if address:
        return (
            f"could not join the Ray cluster at {address} ({type(exc).__name__}: {first}). Check that it is running "
            "(`ray status --address ADDR`) and reachable, or drop --address/ray.address/RAY_ADDRESS to run locally"
        )
    return (
        f"could not start a local Ray ({type(exc).__name__}: {first}). Under heavy load or little memory try again, "
        "lower ray.num_cpus or ray.object_store_memory_mb, or set RAY_TMPDIR to a short path with free space"
    )


class LazyRay:
    """Starts (or joins) Ray on first use, so a run whose stages are all up to date never pays Ray's start-up."""

    def __init__(
        self, out: Path | ObjectPath, address: str | None, num_cpus: int | None, object_store_mb: int | None
    ) -> None:
        self.out, self.address, self.num_cpus, self.object_store_mb = out, address, num_cpus, object_store_mb
        self.started_here = False

    def ensure(self) -> None:
        if ray.is_initialized():
            return
        # Ray's authentication is Ray's business: a local Ray makes its own token (~/.ray/auth_token) unless the
        # user sets RAY_AUTH_MODE=disabled; a cluster with token auth needs that token here (RAY_AUTH_TOKEN).
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        try:
            self._init(address)
        except Exception as exc:  # Ray raises many types here (ConnectionError, RuntimeError, TimeoutError, ...)
            ray.shutdown()
            raise RayStartError(_start_hint(address, exc)) from exc
        self.started_here = True
        _quiet_ray_data()

    def _init(self, address: str | None) -> None:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            tmp = ray_temp_dir(self.out)
            Path(tmp).mkdir(parents=True, exist_ok=True)
            store = self.object_store_mb * 2**20 if self.object_store_mb else None
            ray.init(
                num_cpus=self.num_cpus,
                object_store_memory=store,
                _temp_dir=tmp,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )

    def shutdown(self) -> None:
        if self.started_here and ray.is_initialized():
            ray.shutdown()
        self.started_here = False


def _quiet_ray_data() -> None:
    """lvdkit draws its own progress bar per stage; Ray Data's bars and periodic progress logs would repeat it."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


@contextmanager
def ray_session(
    out: Path | ObjectPath, address: str | None, num_cpus: int | None, object_store_mb: int | None
) -> Iterator[LazyRay]:
    """A :class:`LazyRay` for the duration of a run; shut down at the end if this run started it."""
    lazy = LazyRay(out, address, num_cpus, object_store_mb)
    try:
        yield lazy
    finally:
        lazy.shutdown()
