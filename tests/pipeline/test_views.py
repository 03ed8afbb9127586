"""The final per-image status: duplicates name the image finally kept, through chains across dedup stages."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from lvdkit.core import schema
from lvdkit.core.io import part_name, write_parquet_atomic
from lvdkit.core.stage import StageInputs
from lvdkit.core.views import final_status


def _dedup(pairs: dict[str, str | None]) -> pa.Table:
    ids = list(pairs)
    return pa.table(
        {
            schema.IMAGE_ID: ids,
            schema.GROUP_ID: [pairs[i] or i for i in ids],
            schema.KEEP: [pairs[i] is None for i in ids],
            schema.DUP_OF: pa.array([pairs[i] for i in ids], pa.string()),
            "distance": pa.array([0.0] * len(ids), pa.float32()),
        },
        schema=schema.DEDUP,
    )


def test_chains_across_stages_resolve_to_the_final_survivor(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "d", "e", "f"]
    rows = [
        {schema.IMAGE_ID: i, schema.URI: f"/p/{i}.png", "status": schema.STATUS_OK if i != "e" else "quarantined"}
        | ({"error": schema.REASON_TRUNCATED} if i == "e" else {})
        for i in ids
    ]
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema.INGEST), tmp_path / "ingest" / part_name(0))
    # exact: b copies a; copy: a copies d, f copies c; relative: d copies the protected image P (not in the pool).
    write_parquet_atomic(_dedup({"a": None, "b": "a", "c": None, "d": None, "f": None}), tmp_path / "x" / part_name(0))
    write_parquet_atomic(_dedup({"a": "d", "c": None, "d": None, "f": "c"}), tmp_path / "y" / part_name(0))
    write_parquet_atomic(_dedup({"c": None, "d": "P"}), tmp_path / "z" / part_name(0))
    got = {
        r[schema.IMAGE_ID]: (r["status"], r["reason"], r[schema.DUP_OF])
        for r in final_status(StageInputs(str(tmp_path), ("ingest", "x", "y", "z")), ("x", "y", "z")).to_pylist()
    }
    assert got == {
        "a": ("duplicate", "y", "P"),
        "b": ("duplicate", "x", "P"),  # b -> a -> d -> P
        "c": ("kept", None, None),
        "d": ("duplicate", "z", "P"),
        "e": ("quarantined", schema.REASON_TRUNCATED, None),
        "f": ("duplicate", "y", "c"),
    }
