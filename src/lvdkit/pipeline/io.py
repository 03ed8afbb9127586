"""Stage output files: ``part-*.parquet`` written atomically, read back as one table.

A part file is written under a hidden temporary name and renamed into place, so a reader (or a resumed run) never
sees a half-written part: it is either complete or absent.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PART_GLOB = "part-*.parquet"
ROW_GROUP_ROWS = 8192  # small enough to stream, large enough to compress well


def part_name(index: int) -> str:
    """File name of shard ``index``: zero-padded so lexical order is shard order."""
    return f"part-{index:06d}.parquet"


def write_parquet_atomic(table: pa.Table, path: Path, row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """Write ``table`` to ``path`` via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pq.write_table(table, tmp, row_group_size=row_group_rows, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_temporaries(stage_dir: Path) -> None:
    """Delete temporary files left by a killed run (they were never renamed, so nothing refers to them)."""
    for tmp in stage_dir.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def part_files(stage_dir: Path) -> list[Path]:
    """The finished part files of a stage, in shard order."""
    return sorted(stage_dir.glob(PART_GLOB))


def read_parts(stage_dir: Path, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """All parts of a stage as one table (an empty table with ``schema`` when there are none)."""
    files = part_files(stage_dir)
    if not files:
        if schema is None:
            raise FileNotFoundError(f"no {PART_GLOB} in {stage_dir}")
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    return pa.concat_tables([pq.read_table(f, columns=columns, schema=schema) for f in files])
