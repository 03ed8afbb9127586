"""Read-side views over finished stage outputs: which images are still alive, and the final per-image status.

Everything here is plain pyarrow over the outputs a :class:`~lvdkit.core.stage.StageInputs` may read; it is what
later stages, the summary and the report use to ask "what survived?" and "what is its embedding?".
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.stage import StageInputs

INGEST, EMBED = "ingest", "embed"  # the stages whose outputs every later stage reads
DEDUP_STAGES = ("dedup_exact", "dedup_phash", "dedup_copy", "dedup_relative")


def dedups_before(stage: str) -> tuple[str, ...]:
    """The dedup stages that run before ``stage`` (whose removals it must not see again)."""
    return DEDUP_STAGES[: DEDUP_STAGES.index(stage)]


def ingested(inputs: StageInputs, columns: list[str] | None = None) -> pa.Table:
    """The ingest table (all rows, usable or not)."""
    return inputs.table(INGEST, columns=columns, schema=schema.INGEST)


def alive(inputs: StageInputs, after: tuple[str, ...], columns: list[str]) -> pa.Table:
    """Usable ingested images not removed by any of the dedup stages in ``after``, with ``columns`` from ingest."""
    wanted = list(dict.fromkeys([schema.IMAGE_ID, schema.STATUS_COL, *columns]))
    table = ingested(inputs, wanted)
    table = table.filter(pc.equal(table[schema.STATUS_COL], schema.STATUS_OK))
    for stage in after:
        dedup = inputs.table(stage, columns=[schema.IMAGE_ID, schema.KEEP], schema=schema.DEDUP)
        kept_ids = dedup.filter(dedup[schema.KEEP])[schema.IMAGE_ID]
        table = table.filter(pc.is_in(table[schema.IMAGE_ID], value_set=kept_ids))
    return table.select(list(dict.fromkeys([schema.IMAGE_ID, *columns])))


def alive_in_part(inputs: StageInputs, index: int, after: tuple[str, ...], columns: list[str]) -> pa.Table:
    """:func:`alive` for the rows of ingest part ``index`` only (what a per-part task of a partitioned stage reads)."""
    wanted = list(dict.fromkeys([schema.IMAGE_ID, schema.STATUS_COL, *columns]))
    table = pq.read_table(inputs.parts(INGEST)[index], columns=wanted)
    table = table.filter(pc.equal(table[schema.STATUS_COL], schema.STATUS_OK))
    return _drop_removed(inputs, table, index, after).select(list(dict.fromkeys([schema.IMAGE_ID, *columns])))


def alive_embedded(inputs: StageInputs, index: int, after: tuple[str, ...], columns: list[str]) -> pa.Table:
    """The rows of embed part ``index`` (``image_id`` and ``columns``) that no dedup stage in ``after`` removed.

    embed only embedded what exact and PHash dedup kept, so only the later dedups (whose partitioned parts follow
    embed's) are applied."""
    table = pq.read_table(inputs.parts(EMBED)[index], columns=list(dict.fromkeys([schema.IMAGE_ID, *columns])))
    return _drop_removed(inputs, table, index, tuple(s for s in after if s not in dedups_before("dedup_copy")))


def _drop_removed(inputs: StageInputs, table: pa.Table, index: int, after: tuple[str, ...]) -> pa.Table:
    """``table`` without the images the stages in ``after`` removed. A stage that ran partitioned wrote its part
    ``index`` for the same part of its own input as ``table``'s (ingest for exact and PHash dedup, embed after),
    and is read alone; one that ran as a single task (a small pool) is read whole, for its removed images only."""
    for stage in after:
        aligned_part = inputs.record(stage).get("stats", {}).get("path") == "partitioned"
        parts = inputs.parts(stage)
        parts = [parts[index]] if aligned_part else parts
        if not parts:
            continue
        dedup = pa.concat_tables([pq.read_table(p, columns=[schema.IMAGE_ID, schema.KEEP]) for p in parts])
        removed = dedup.filter(pc.invert(dedup[schema.KEEP]))[schema.IMAGE_ID]
        table = table.filter(pc.invert(pc.is_in(table[schema.IMAGE_ID], value_set=removed)))
    return table


def final_status(inputs: StageInputs, dedup_stages: tuple[str, ...]) -> pa.Table:
    """One row per ingested file: kept, duplicate (naming the finally kept image) or quarantined (with reason).

    Columnar throughout (positions found with ``index_in``, no per-image Python objects beyond the output columns).
    """
    ing = ingested(inputs, [schema.IMAGE_ID, schema.URI, schema.STATUS_COL, schema.ERROR])
    ids = ing[schema.IMAGE_ID]
    ok = ing[schema.STATUS_COL].to_numpy(zero_copy_only=False) == schema.STATUS_OK
    status = np.where(ok, schema.FINAL_KEPT, schema.STATUS_QUARANTINED).astype(object)
    reason = ing[schema.ERROR].to_numpy(zero_copy_only=False).astype(object)
    dup_of = np.full(len(ids), None, dtype=object)
    for stage in dedup_stages:
        dedup = inputs.table(stage, columns=[schema.IMAGE_ID, schema.DUP_OF], schema=schema.DEDUP)
        dups = dedup.filter(pc.is_valid(dedup[schema.DUP_OF]))
        at = pc.index_in(dups[schema.IMAGE_ID], value_set=ids).to_numpy(zero_copy_only=False)
        if np.isnan(at.astype(np.float64)).any():
            raise RuntimeError(f"{inputs.folder(stage)} names images that ingest does not have: rerun the stage")
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
            schema.STATUS_COL: pa.array(status, pa.string()),
            schema.REASON: pa.array(reason, pa.string()),
            schema.DUP_OF: pa.array(dup_of, pa.string()),
        },
        schema=schema.STATUS,
    )


def aligned(ids: pa.Array | pa.ChunkedArray, table: pa.Table) -> pa.Table:
    """Rows of ``table`` (keyed by image_id) in the order of ``ids``; null rows where absent."""
    return table.take(pc.index_in(ids, value_set=table[schema.IMAGE_ID]))


def embeddings_of(
    inputs: StageInputs,
    key: str,
    ids: pa.Array | pa.ChunkedArray,
    calibration: bool = False,
    allow_missing: bool = False,
) -> np.ndarray:
    """Embeddings of model ``key`` for ``ids`` (in that order), as a [N, D] float32 array (zeros where missing and
    ``allow_missing``); ``calibration``: of the synthetic copies."""
    col = schema.embedding_column(key)
    sub = schema.CALIBRATION if calibration else ""
    parts = inputs.parts(EMBED, sub)
    if not parts:  # embed had no image to embed (everything quarantined or removed before it)
        if len(ids) and not allow_missing:
            raise RuntimeError(f"{inputs.folder(EMBED)} holds no embeddings: rerun embed")
        return np.zeros((len(ids), 0), np.float32)
    if col not in pq.read_schema(parts[0]).names:
        raise ValueError(f"no embeddings for model {key!r} in {inputs.folder(EMBED)}: set it in embed.models")
    table = inputs.table(EMBED, columns=[schema.IMAGE_ID, col], sub=sub)
    pos = pc.index_in(ids, value_set=table[schema.IMAGE_ID])
    missing = pc.is_null(pos).to_numpy(zero_copy_only=False)
    if missing.any() and not allow_missing:
        raise RuntimeError(f"{inputs.folder(EMBED)} lacks embeddings for some images: rerun embed")
    flat = table[col].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    out_x = np.zeros((len(ids), flat.shape[1]), np.float32)
    out_x[~missing] = flat[pc.drop_null(pos).to_numpy()]
    return out_x
