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
- **On object storage** (``out=s3://...``) the marker is an object alike. The lock object is written, then read
  back: a run that finds another run's token there stops. Object stores give no atomic create-if-absent through
  pyarrow, so two runs started on one OUT within the same second may both go on: start one run per OUT. A lock whose
  holder is a dead process on this host is replaced; one from another host names its holder, as on disk.
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
from lvdkit.core.storage import Location, ObjectPath, is_uri

MARKER = "_LVDKIT"  # OUT was made by lvdkit
LOCK = "_LOCK"  # a run holds OUT
RECORDS = ("_SUCCESS", "_RUNNING")  # what lvdkit leaves in every stage folder it writes


class OutputFolderError(ValueError):
    """OUT cannot be used: not lvdkit's, held by another run, or inside the inputs."""


def claim(out: Location) -> None:
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


def _legacy_run(out: Location) -> bool:
    """A run folder an lvdkit without the marker wrote: some stage folder holds an lvdkit record (JSON with a
    config hash; Spark's empty ``_SUCCESS`` files do not count)."""
    return any(_is_record(child / r) for child in out.iterdir() if child.is_dir() for r in RECORDS)


def _is_record(path: Location) -> bool:
    try:
        return "config_hash" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_not_inside_inputs(out: Location, inputs: Sequence[str], what: str = "ingest.inputs") -> None:
    """Refuse an OUT inside an input folder or prefix, or an input folder inside OUT."""
    if isinstance(out, ObjectPath):
        for entry in inputs:
            prefix = entry.split("*")[0].split("?")[0].split("[")[0].rstrip("/")
            if is_uri(entry) and (_within(out.uri, prefix, "/") or _within(prefix, out.uri, "/")):
                _overlap(out, entry, what)
        return
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
            _overlap(out, entry, what)


def _overlap(out: Location, entry: str, what: str) -> None:
    raise OutputFolderError(
        f"out={out} and the input {entry!r} ({what}) overlap: the run would read its own outputs as inputs "
        "(and see new inputs on every rerun). Put out= outside the input folders"
    )


def _within(path: str, folder: str, sep: str = os.sep) -> bool:
    return path == folder or path.startswith(folder.rstrip(sep) + sep)


@contextmanager
def locked(out: Location) -> Iterator[None]:
    """Hold ``OUT/_LOCK`` for the duration of a run."""
    lock = out / LOCK
    token = _acquire_object(lock) if isinstance(lock, ObjectPath) else _acquire(lock)
    try:
        yield
    finally:
        _release(lock, token)


def _holder() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "token": uuid.uuid4().hex}


def _acquire_object(path: ObjectPath) -> str:
    """The lock on object storage: written, then read back (see the module's note on what this cannot exclude)."""
    holder = _holder()
    for _ in range(3):
        found = _read_holder(path)
        if found is not None:
            _check_stale(path, found)
            path.unlink(missing_ok=True)  # a dead run's lock
            continue
        path.write_text(json.dumps(holder) + "\n")
        time.sleep(0.5)  # a contender that wrote just after us is seen on the second read (not one a second later)
        found = _read_holder(path)
        if found is not None and found.get("token") == holder["token"]:
            return str(holder["token"])
        _check_stale(path, found or {})
    raise OutputFolderError(f"could not take {path}: another run keeps taking it")


def _read_holder(path: Location) -> dict[str, object] | None:
    """The lock's holder; None when there is no lock; ``{}`` when it is unreadable JSON (torn: its writer died
    while writing it). Other errors (permissions, the network) are raised: they say nothing about the holder."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _check_stale(path: Location, holder: dict[str, object]) -> None:
    """Raise naming the holder when it may still be running (alive here, or on another host)."""
    host, pid = holder.get("host"), holder.get("pid")
    if holder and (host != socket.gethostname() or _alive(int(str(pid or 0)))):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(str(holder.get("since", 0)))))
        where = "this machine" if host == socket.gethostname() else f"host {host}"
        raise OutputFolderError(
            f"{path.parent} is in use by another lvdkit run (pid {pid} on {where}, since {since}). Wait for it to "
            f"finish, or use another out=. If that run is dead (on another host lvdkit cannot check), remove {path}"
        )


def _acquire(path: Path) -> str:
    holder = _holder()
    token = str(holder["token"])
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
    holder = _read_holder(path)
    if holder is None:
        return  # released meanwhile: try again
    judged = holder.get("token")
    _check_stale(path, holder)
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


def _release(path: Location, token: str) -> None:
    """Remove the lock if it is still this run's."""
    try:
        if json.loads(path.read_text()).get("token") == token:
            path.unlink()
    except (OSError, ValueError):
        pass
