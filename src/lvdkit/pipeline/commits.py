"""Part commit records: a part file is trusted only if it matches the record written when it was committed.

Each part file (``part-*.parquet``, in a stage folder or one of its sub-folders) is written atomically (a rename on
disk, one whole-object PUT on object storage), then its size and BLAKE2b checksum go to ``_commits/NAME.json``
beside it. On resume, a part without a matching record (torn by a crash between the part and its record, changed, or
put there by someone else) is moved to the stage's ``_torn/`` and redone. On object storage the record also holds
the object's last-modified time, which is compared instead of re-reading the part for its checksum: a PUT cannot
leave half an object, and any later PUT changes that time. A finished stage's ``_SUCCESS`` lists every part's size;
a rerun checks the sizes (a ``stat`` or one listing) before skipping the stage, and resumes it when one differs.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa

from lvdkit.core.io import ROW_GROUP_ROWS, file_blake2b, read_json, write_json_atomic
from lvdkit.core.storage import Location, ObjectPath, file_sizes
from lvdkit.pipeline import faults

COMMITS = "_commits"


def record_of(part: Location) -> Location:
    return part.parent / COMMITS / f"{part.name}.json"


def commit_part(
    table: pa.Table, path: Location, hooks: faults.Hooks | None, row_group_rows: int = ROW_GROUP_ROWS
) -> None:
    """Write a part atomically, then its commit record (the part counts as done only once both exist)."""
    digest = faults.write_part(table, path, hooks, row_group_rows)
    stat = path.stat()
    record: dict[str, Any] = {"bytes": stat.st_size, "blake2b": digest}
    if isinstance(path, ObjectPath):
        record["mtime"] = stat.st_mtime
    write_json_atomic(record_of(path), record)


def untrusted(part: Location) -> str | None:
    """Why ``part`` cannot be trusted (no record, another size, another checksum or object time), or None when it
    matches."""
    record = read_json(record_of(part))
    if record is None:
        return "no commit record"
    stat = part.stat()
    if stat.st_size != record.get("bytes"):
        return f"{stat.st_size} bytes, {record.get('bytes')} committed"
    if isinstance(part, ObjectPath):
        return None if stat.st_mtime == record.get("mtime") else "replaced since it was committed"
    if file_blake2b(part) != record.get("blake2b"):
        return "checksum differs from the committed one"
    return None


def committed_sizes(stage_dir: Location) -> dict[str, int]:
    """Every committed part of a stage (sub-folders included: a part with its commit record) by path relative to
    the stage: its size in bytes. One listing, no file read (a part just committed or checked matches its record)."""
    files = file_sizes(stage_dir)
    sizes = {}
    for rel in sorted(files):
        record = PurePosixPath(rel)  # STAGE/[SUB/]_commits/part-NNNNNN.parquet.json
        part = (record.parent.parent / record.stem).as_posix()
        if record.parent.name == COMMITS and record.suffix == ".json" and part in files:
            sizes[part] = files[part]
    return sizes


def changed_since_success(stage_dir: Location, record: dict[str, Any]) -> list[str]:
    """Parts a finished stage's ``_SUCCESS`` lists whose size is no longer the committed one (or that are gone);
    one listing."""
    files = file_sizes(stage_dir)
    return [rel for rel, size in (record.get("part_bytes") or {}).items() if files.get(rel) != size]
