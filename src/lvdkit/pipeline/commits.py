"""Part commit records: a part file is trusted only if it matches the record written when it was committed.

Each part file (``part-*.parquet``, in a stage folder or one of its sub-folders) is written atomically, then its size
and BLAKE2b checksum go to ``_commits/NAME.json`` beside it. On resume, a part without a matching record (torn by a
crash between the rename and the record, changed, or put there by someone else) is moved to the stage's ``_torn/``
and redone. A finished stage's ``_SUCCESS`` lists every part's size; a rerun checks the sizes (a ``stat`` each) before
skipping the stage, and resumes it when one differs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa

from lvdkit.core.io import ROW_GROUP_ROWS, read_json, write_json_atomic
from lvdkit.pipeline import faults

COMMITS = "_commits"
CHUNK = 2**20


def checksum(path: Path) -> str:
    """BLAKE2b (16 bytes) of the file's bytes, read in 1 MiB chunks (about 1 GB/s: small beside writing the part)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def record_of(part: Path) -> Path:
    return part.parent / COMMITS / f"{part.name}.json"


def commit_part(table: pa.Table, path: Path, hooks: faults.Hooks | None, row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """Write a part atomically, then its commit record (the part counts as done only once both exist)."""
    faults.write_part(table, path, hooks, row_group_rows)
    write_json_atomic(record_of(path), {"bytes": path.stat().st_size, "blake2b": checksum(path)})


def untrusted(part: Path) -> str | None:
    """Why ``part`` cannot be trusted (no record, another size, another checksum), or None when it matches."""
    record = read_json(record_of(part))
    if record is None:
        return "no commit record"
    size = part.stat().st_size
    if size != record.get("bytes"):
        return f"{size} bytes, {record.get('bytes')} committed"
    if checksum(part) != record.get("blake2b"):
        return "checksum differs from the committed one"
    return None


def committed_sizes(stage_dir: Path) -> dict[str, int]:
    """Every committed part of a stage (sub-folders included) by path relative to the stage: its size in bytes."""
    sizes = {}
    for record in sorted(stage_dir.rglob(f"{COMMITS}/*.json")):
        part = record.parent.parent / record.name.removesuffix(".json")
        value = read_json(record)
        if part.exists() and value is not None:
            sizes[part.relative_to(stage_dir).as_posix()] = int(value["bytes"])
    return sizes


def changed_since_success(stage_dir: Path, record: dict[str, Any]) -> list[str]:
    """Parts a finished stage's ``_SUCCESS`` lists whose size is no longer the committed one (or that are gone)."""
    changed = []
    for rel, size in (record.get("part_bytes") or {}).items():
        part = stage_dir / rel
        if not part.is_file() or part.stat().st_size != size:
            changed.append(rel)
    return changed
