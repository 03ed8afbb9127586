"""Read-side views over finished stage outputs: which images are still alive, and the final per-image status.

Everything here is plain pyarrow over ``OUT/<stage>/part-*.parquet``; it is what later stages, the summary and
notebooks use to ask "what survived?".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvdkit import schema
from lvdkit.pipeline.io import read_parts

DEDUP_STAGES = ("dedup_exact", "dedup_phash", "dedup_copy", "dedup_relative")


def dedups_before(stage: str) -> tuple[str, ...]:
    """The dedup stages that run before ``stage`` (whose removals it must not see again)."""
    return DEDUP_STAGES[: DEDUP_STAGES.index(stage)]


def ingested(out: Path, columns: list[str] | None = None) -> pa.Table:
    """The ingest table (all rows, usable or not)."""
    return read_parts(out / "ingest", columns=columns, schema=schema.INGEST)


def alive(out: Path, after: tuple[str, ...], columns: list[str]) -> pa.Table:
    """Usable ingested images not removed by any of the dedup stages in ``after``, with ``columns`` from ingest."""
    wanted = list(dict.fromkeys([schema.IMAGE_ID, "status", *columns]))
    table = ingested(out, wanted)
    table = table.filter(pc.equal(table["status"], schema.STATUS_OK))
    for stage in after:
        dedup = read_parts(out / stage, columns=[schema.IMAGE_ID, schema.KEEP], schema=schema.DEDUP)
        kept_ids = dedup.filter(dedup[schema.KEEP])[schema.IMAGE_ID]
        table = table.filter(pc.is_in(table[schema.IMAGE_ID], value_set=kept_ids))
    return table.select(list(dict.fromkeys([schema.IMAGE_ID, *columns])))


def final_status(out: Path, dedup_stages: tuple[str, ...]) -> pa.Table:
    """One row per ingested file: kept, duplicate (naming the finally kept image) or quarantined (with reason)."""
    ing = ingested(out, [schema.IMAGE_ID, schema.URI, "status", "error"])
    ids = ing[schema.IMAGE_ID].to_numpy(zero_copy_only=False)
    status = np.where(
        ing["status"].to_numpy(zero_copy_only=False) == schema.STATUS_OK, schema.FINAL_KEPT, schema.STATUS_QUARANTINED
    ).astype(object)
    reason = np.array(ing["error"].to_pylist(), dtype=object)
    dup_of = np.full(len(ids), None, dtype=object)
    pos: dict[str, int] = {image_id: i for i, image_id in enumerate(ids)}
    for stage in dedup_stages:
        dedup = read_parts(out / stage, columns=[schema.IMAGE_ID, schema.DUP_OF], schema=schema.DEDUP)
        dups = dedup.filter(pc.invert(pc.is_null(dedup[schema.DUP_OF])))
        for image_id, target in zip(dups[schema.IMAGE_ID].to_pylist(), dups[schema.DUP_OF].to_pylist(), strict=True):
            i = pos[image_id]
            status[i], reason[i], dup_of[i] = schema.FINAL_DUPLICATE, stage, target
    # A later stage may remove the image an earlier duplicate pointed at: follow the chain to the survivor.
    for i in map(int, np.nonzero(status == schema.FINAL_DUPLICATE)[0]):
        target = dup_of[i]
        for _ in range(len(dedup_stages)):
            j = pos.get(target)
            if j is None or dup_of[j] is None:  # kept, or not a pool image (a protected image)
                break
            target = dup_of[j]
        dup_of[i] = target
    return pa.table(
        {
            schema.IMAGE_ID: pa.array(ids, pa.string()),
            schema.URI: ing[schema.URI],
            "status": pa.array(status, pa.string()),
            "reason": pa.array(reason, pa.string()),
            schema.DUP_OF: pa.array(dup_of, pa.string()),
        },
        schema=schema.STATUS,
    )
