"""Stage output files: ``part-*.parquet`` written atomically, read back as one table.

A part file is written under a hidden temporary name, flushed to disk and renamed into place, so a reader (or a
resumed run) never sees a half-written part: it is either complete or absent. On object storage (an OUT such as
``s3://bucket/run``, see :mod:`lvdkit.core.storage`) every file is one whole object instead: built in memory (or a
local temporary file, uploaded), so it too is complete or absent. A full disk raises :class:`DiskFullError` naming
the file; the temporary file is removed.

Every path lvdkit writes is ``OUT`` joined with its own names (stage folders, ``part-NNNNNN.parquet`` from a part
number, fixed side-file names): no name read from data, a manifest or a file list ever becomes part of an output path.
:func:`own_name` checks the names that are joined.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvdkit.core.storage import Location, ObjectPath, publish, scratch_file

PART_GLOB = "part-*.parquet"
_OWN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "[errno 28]", "[Errno 28]")


class DiskFullError(RuntimeError):
    """Writing an output failed because its disk (or quota) is full; the message says which file and what to do."""

    @classmethod
    def writing(cls, path: Location | str, cause: BaseException | None = None) -> DiskFullError:
        why = f" ({cause})" if cause is not None else ""
        return cls(
            f"disk full: no space left on device while writing {path}{why}. Free space there (or set out= to a disk "
            "with room) and rerun: finished parts are kept, the rerun resumes"
        )


def is_disk_full(exc: BaseException) -> bool:
    """An ``OSError`` saying the disk or quota is full (pyarrow's errors carry the errno only in their text)."""
    if isinstance(exc, DiskFullError):
        return True
    if not isinstance(exc, OSError):
        return False
    return exc.errno in _DISK_FULL_ERRNOS or any(t in str(exc) for t in _DISK_FULL_TEXT)


@contextmanager
def disk_errors(path: Location | str) -> Iterator[None]:
    """Turn a full-disk ``OSError`` raised while writing ``path`` into :class:`DiskFullError` naming it."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError.writing(path, exc) from exc
        raise


def own_name(name: str) -> str:
    """``name`` if it is one of lvdkit's own relative output names (``a/b`` segments of letters, digits, ``_.-``,
    none starting with a dot); anything else (absolute, ``..``, separators, hidden) is refused."""
    parts = name.split("/")
    if not name or any(not _OWN_NAME.fullmatch(p) or p.startswith(".") for p in parts):
        raise ValueError(f"refusing output name {name!r}: not a relative name made of lvdkit's own parts")
    return name


ROW_GROUP_ROWS = 8192  # small enough to stream, large enough to compress well


def part_name(index: int) -> str:
    """File name of part ``index``: zero-padded so lexical order is part order."""
    return f"part-{index:06d}.parquet"


def write_parquet_atomic(table: pa.Table, path: Location, row_group_rows: int = ROW_GROUP_ROWS) -> str:
    """Write ``table`` to ``path`` atomically: via a temporary file, ``fsync`` and a rename on disk, as one whole
    object on object storage (:class:`DiskFullError` when the disk is full; the temporary file is removed on any
    error). Returns the bytes' BLAKE2b (16 bytes), for the part's commit record."""
    if isinstance(path, ObjectPath):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=row_group_rows, compression="zstd")
        data = memoryview(sink.getvalue())  # not copied to bytes: a part is held once
        path.write_bytes(data)
        return blake2b(data)
    with _atomic_file(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_rows, compression="zstd")
        digest = file_blake2b(tmp)
    return digest


def write_parquet_stream_atomic(tables: Iterable[pa.Table], schema: pa.Schema, path: Location) -> None:
    """Write ``tables`` one after another into one Parquet file, as :func:`write_parquet_atomic` does, holding one
    of them in memory at a time (on object storage: built in a local temporary file, then uploaded)."""
    with _atomic_file(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for table in tables:
            writer.write_table(table.cast(schema), row_group_size=ROW_GROUP_ROWS)


def blake2b(data: bytes | memoryview) -> str:
    """BLAKE2b (16 bytes) of ``data``, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_blake2b(path: Location) -> str:
    """BLAKE2b (16 bytes) of a file's bytes, read in 1 MiB chunks (about 1 GB/s: small beside writing the part)."""
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        while chunk := fh.read(2**20):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def _atomic_file(path: Location) -> Iterator[Path]:
    """A local temporary path to write ``path``'s content to; on success it is fsynced and moved onto ``path``
    (renamed on disk, uploaded to object storage)."""
    with disk_errors(path):
        tmp = scratch_file(path)
        try:
            yield tmp
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            publish(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if isinstance(path, Path):
            _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every filesystem lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(stage_dir: Location) -> None:
    """Delete temporary files left by a killed run (they were never renamed, so nothing refers to them)."""
    for tmp in stage_dir.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def part_files(stage_dir: Location) -> list[Location]:
    """The finished part files of a stage, in part order."""
    return sorted(stage_dir.glob(PART_GLOB), key=str)


def read_parts(stage_dir: Location, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """All parts of a stage as one table (an empty table with ``schema`` when there are none)."""
    return read_tables(part_files(stage_dir), stage_dir, columns, schema)


def read_tables(
    files: list[Location],
    where: Location,
    columns: list[str] | None = None,
    schema: pa.Schema | None = None,
    keep: Callable[[pa.Table], pa.ChunkedArray] | None = None,
) -> pa.Table:
    """``files`` (a stage's parts, found in ``where``) as one table (an empty table with ``schema`` when there are
    none). ``keep``: a row mask of one file's table, applied file by file, so memory holds the rows kept and one
    file, not every file."""
    if not files:
        if schema is None:
            raise FileNotFoundError(f"no {PART_GLOB} in {where}")
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    tables = (pq.read_table(f, columns=columns, schema=schema) for f in files)
    return pa.concat_tables([t.filter(keep(t)) if keep is not None else t for t in tables])


def read_json(path: Location) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None if absent or unreadable (a torn write counts as absent)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: Location, data: dict[str, Any]) -> None:
    """Write JSON atomically (a rename on disk, one whole object on object storage; :class:`DiskFullError` when
    the disk is full)."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode())


def write_bytes_atomic(path: Location, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: via a temporary file, ``fsync`` and a rename on disk; as one whole
    object on object storage."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
        return
    with disk_errors(path):
        tmp = scratch_file(path)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)


def load_npy(path: Location) -> Any:
    """A ``.npy`` array from disk or object storage."""
    if isinstance(path, Path):
        return np.load(path)
    return np.load(io.BytesIO(path.read_bytes()))
