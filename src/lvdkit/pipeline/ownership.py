"""What a run may touch: an output folder lvdkit made (``OUT/_LVDKIT``), one run at a time (``OUT/_LOCK``), and
never a folder inside its own inputs.

- **Ownership.** The first run writes ``OUT/_LVDKIT``. A run refuses a non-empty OUT without it (nothing is
  touched), except a folder an earlier lvdkit wrote before the marker existed (its stage folders hold lvdkit's
  ``_SUCCESS``/``_RUNNING`` records), which is adopted.
- **Lock.** ``OUT/_LOCK`` is created exclusively (``O_CREAT | O_EXCL``, atomic on local filesystems and on NFS v3+)
  and names its holder (host, pid, start time). A second run on the same OUT stops with the holder's name. A lock
  whose holder is gone (same host, no such process: a killed run) is taken over: renamed aside first, which only one
  contender can do, then created anew. A lock held from another host cannot be checked: the error says how to remove
  it once that run is known to be dead.
- **Inputs.** OUT inside an input folder (or an input folder inside OUT) would ingest the run's own outputs and
  change the input fingerprint every run: refused.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from lvdkit import __version__

MARKER = "_LVDKIT"  # OUT was made by lvdkit
LOCK = "_LOCK"  # a run holds OUT
RECORDS = ("_SUCCESS", "_RUNNING")  # what lvdkit leaves in every stage folder it writes


class OutputFolderError(ValueError):
    """OUT cannot be used: not lvdkit's, held by another run, or inside the inputs."""


def claim(out: Path) -> None:
    """Make ``out`` lvdkit's (create it, or check it is ours); raise :class:`OutputFolderError` otherwise."""
    if (out / MARKER).is_file():
        return
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"out={out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not _legacy_run(out):
        raise OutputFolderError(
            f"out={out} is a non-empty folder lvdkit did not create (no {MARKER} in it): lvdkit writes and removes "
            "stage folders there, so it refuses to touch it. Choose a new or empty folder for out="
        )
    out.mkdir(parents=True, exist_ok=True)
    record = {"created_by": f"lvdkit {__version__}", "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / MARKER).write_text(json.dumps(record) + "\n")


def _legacy_run(out: Path) -> bool:
    """A run folder an lvdkit without the marker wrote: some stage folder holds an lvdkit record (JSON with a
    config hash; Spark's empty ``_SUCCESS`` files do not count)."""
    return any(_is_record(child / r) for child in out.iterdir() if child.is_dir() for r in RECORDS)


def _is_record(path: Path) -> bool:
    try:
        return "config_hash" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_not_inside_inputs(out: Path, inputs: Sequence[str], what: str = "ingest.inputs") -> None:
    """Refuse an OUT inside a local input folder, or an input folder inside OUT."""
    real_out = os.path.realpath(out)
    for entry in inputs:
        if "://" in entry or any(ch in entry for ch in "*?["):
            folder = entry.split("*")[0].split("?")[0].split("[")[0] if "://" not in entry else ""
            if not folder:
                continue
        else:
            folder = entry
        real_in = os.path.realpath(folder)
        if _within(real_out, real_in) or _within(real_in, real_out):
            raise OutputFolderError(
                f"out={out} and the input {entry!r} ({what}) overlap: the run would read its own outputs as inputs "
                "(and see new inputs on every rerun). Put out= outside the input folders"
            )


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``OUT/_LOCK`` for the duration of a run."""
    token = _acquire(out / LOCK)
    try:
        yield
    finally:
        _release(out / LOCK, token)


def _acquire(path: Path) -> str:
    token = uuid.uuid4().hex
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "token": token}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(path)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(holder) + "\n")
        return token
    raise OutputFolderError(f"could not take {path}: another run keeps taking it")


def _take_over_if_stale(path: Path) -> None:
    """Move a dead run's lock aside; raise naming the holder when it may still be running."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return  # released meanwhile: try again
    except (OSError, ValueError):
        holder = {}  # torn: its writer died before finishing it
    host, pid, judged = holder.get("host"), holder.get("pid"), holder.get("token")
    if holder and (host != socket.gethostname() or _alive(int(pid or 0))):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
        where = "this machine" if host == socket.gethostname() else f"host {host}"
        raise OutputFolderError(
            f"{path.parent} is in use by another lvdkit run (pid {pid} on {where}, since {since}). Wait for it to "
            f"finish, or use another out=. If that run is dead (on another host lvdkit cannot check), remove {path}"
        )
    aside = path.with_name(f".{LOCK}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return  # another contender moved it first
    try:
        moved = json.loads(aside.read_text()).get("token")
    except (OSError, ValueError):
        moved = None
    if holder and moved != judged:  # a contender replaced the stale lock with its live one meanwhile: give it back
        with suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(path: Path, token: str) -> None:
    """Remove the lock if it is still this run's."""
    try:
        if json.loads(path.read_text()).get("token") == token:
            path.unlink()
    except (OSError, ValueError):
        pass
