"""Read-side views over finished stage outputs: which images are still alive, and the final per-image status.

Everything here is plain pyarrow over ``OUT/<stage>/part-*.parquet``; it is what later stages, the summary and
notebooks use to ask "what survived?".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvdkit.core import schema
from lvdkit.core.io import read_parts

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
    """One row per ingested file: kept, duplicate (naming the finally kept image) or quarantined (with reason).

    Columnar throughout (positions found with ``index_in``, no per-image Python objects beyond the output columns).
    """
    ing = ingested(out, [schema.IMAGE_ID, schema.URI, "status", "error"])
    ids = ing[schema.IMAGE_ID]
    ok = ing["status"].to_numpy(zero_copy_only=False) == schema.STATUS_OK
    status = np.where(ok, schema.FINAL_KEPT, schema.STATUS_QUARANTINED).astype(object)
    reason = ing["error"].to_numpy(zero_copy_only=False).astype(object)
    dup_of = np.full(len(ids), None, dtype=object)
    for stage in dedup_stages:
        dedup = read_parts(out / stage, columns=[schema.IMAGE_ID, schema.DUP_OF], schema=schema.DEDUP)
        dups = dedup.filter(pc.is_valid(dedup[schema.DUP_OF]))
        at = pc.index_in(dups[schema.IMAGE_ID], value_set=ids).to_numpy(zero_copy_only=False)
        if np.isnan(at.astype(np.float64)).any():
            raise RuntimeError(f"{out / stage} names images that ingest does not have: rerun the stage")
        at = at.astype(np.int64)
        status[at], reason[at] = schema.FINAL_DUPLICATE, stage
        dup_of[at] = dups[schema.DUP_OF].to_numpy(zero_copy_only=False)
    # A later stage may remove the image an earlier duplicate pointed at: follow the chain to the survivor.
    chained = np.flatnonzero(status == schema.FINAL_DUPLICATE)
    for _ in range(len(dedup_stages)):
        if not len(chained):
            break
        target = pc.index_in(pa.array(dup_of[chained], pa.string()), value_set=ids).to_numpy(zero_copy_only=False)
        found = ~np.isnan(target.astype(np.float64))  # not a pool image (a protected image): final
        nxt = np.zeros(len(chained), np.int64)
        nxt[found] = target[found].astype(np.int64)
        onward = found & (status[nxt] == schema.FINAL_DUPLICATE)  # the target was removed too: follow it
        dup_of[chained[onward]] = dup_of[nxt[onward]]
        chained = chained[onward]
    return pa.table(
        {
            schema.IMAGE_ID: ids,
            schema.URI: ing[schema.URI],
            "status": pa.array(status, pa.string()),
            "reason": pa.array(reason, pa.string()),
            schema.DUP_OF: pa.array(dup_of, pa.string()),
        },
        schema=schema.STATUS,
    )
