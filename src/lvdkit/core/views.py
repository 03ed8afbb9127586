"""Read-side views over finished stage outputs: which images are still alive, and the final per-image status.

Everything here is plain pyarrow over the outputs a :class:`~lvdkit.core.stage.StageInputs` may read; it is what
later stages, the summary and the report use to ask "what survived?" and "what is its embedding?".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.stage import StageInputs
from lvdkit.core.storage import Location

INGEST, EMBED = "ingest", "embed"  # the stages whose outputs every later stage reads
DEDUP_STAGES = ("dedup_exact", "dedup_phash", "dedup_copy", "dedup_relative")


def dedups_before(stage: str) -> tuple[str, ...]:
    """The dedup stages that run before ``stage`` (whose removals it must not see again)."""
    return DEDUP_STAGES[: DEDUP_STAGES.index(stage)]


def ingested(
    inputs: StageInputs, columns: list[str] | None = None, ids: pa.Array | pa.ChunkedArray | None = None
) -> pa.Table:
    """The ingest table (all rows, usable or not); with ``ids``, only those images' rows, read part by part."""
    keep = None if ids is None else (lambda t: pc.is_in(t[schema.IMAGE_ID], ids))
    return inputs.table(INGEST, columns=columns, schema=schema.INGEST, keep=keep)


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


def alive_by_part(inputs: StageInputs, after: tuple[str, ...], columns: list[str]) -> Iterator[pa.Table]:
    """:func:`alive`, one ingest part at a time (same rows, same order): memory holds one part and the images the
    stages in ``after`` removed (which grow with the duplicates, not with the pool)."""
    removed = [_removed_ids(inputs, stage) for stage in after]
    wanted = list(dict.fromkeys([schema.IMAGE_ID, schema.STATUS_COL, *columns]))
    for part in inputs.parts(INGEST):
        table = pq.read_table(part, columns=wanted, schema=schema.INGEST)  # a column added since: null
        table = table.filter(pc.equal(table[schema.STATUS_COL], schema.STATUS_OK))
        for ids in removed:
            table = table.filter(pc.invert(pc.is_in(table[schema.IMAGE_ID], value_set=ids)))
        yield table.select(list(dict.fromkeys([schema.IMAGE_ID, *columns])))


def _removed_ids(inputs: StageInputs, stage: str) -> pa.Array:
    return _removed_in(inputs.parts(stage))


def _removed_in(parts: list[Location]) -> pa.Array:
    """The ids a dedup stage's ``parts`` mark as not kept (one part in memory at a time)."""
    pieces = []
    for part in parts:
        dedup = pq.read_table(part, columns=[schema.IMAGE_ID, schema.KEEP])
        pieces.append(dedup.filter(pc.invert(dedup[schema.KEEP]))[schema.IMAGE_ID].combine_chunks())
    return pa.concat_arrays(pieces) if pieces else pa.array([], pa.string())


def alive_in_part(inputs: StageInputs, index: int, after: tuple[str, ...], columns: list[str]) -> pa.Table:
    """:func:`alive` for the rows of ingest part ``index`` only (what a per-part task of a partitioned stage reads)."""
    wanted = list(dict.fromkeys([schema.IMAGE_ID, schema.STATUS_COL, *columns]))
    table = pq.read_table(inputs.parts(INGEST)[index], columns=wanted, schema=schema.INGEST)
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
        if parts:
            table = table.filter(pc.invert(pc.is_in(table[schema.IMAGE_ID], value_set=_removed_in(parts))))
    return table


def final_status(inputs: StageInputs, dedup_stages: tuple[str, ...]) -> pa.Table:
    """One row per ingested file: kept, duplicate (naming the finally kept image) or quarantined (with reason).

    The whole table at once; the runner builds it part by part (:func:`removed`, then :func:`status_of` per ingest
    part), which gives the same rows.
    """
    dups = removed(inputs, dedup_stages)
    parts = [status_of(pq.read_table(p, columns=STATUS_INPUT), dups) for p in inputs.parts("ingest")]
    status = pa.concat_tables(parts) if parts else schema.STATUS.empty_table()
    st = status.filter(pc.equal(status[schema.STATUS_COL], schema.FINAL_DUPLICATE))
    check_removed_found(inputs, removed_per_stage(dups), removed_per_stage(st))
    return status


STATUS_INPUT = [schema.IMAGE_ID, schema.URI, schema.STATUS_COL, schema.ERROR]  # ingest columns status_of reads


def removed(inputs: StageInputs, dedup_stages: tuple[str, ...]) -> pa.Table:
    """Every duplicate of the dedup stages (``image_id``, ``reason``: the stage, ``dup_of``: the image finally
    kept), read part by part: it grows with the duplicates, not with the pool.

    A later stage may remove the image an earlier duplicate pointed at: the chain is followed to the survivor (an
    image no stage removed, or a protected image, which is not in the pool).
    """
    pieces = []
    for stage in dedup_stages:
        for part in inputs.parts(stage):
            t = pq.read_table(part, columns=[schema.IMAGE_ID, schema.DUP_OF])
            t = t.filter(pc.is_valid(t[schema.DUP_OF]))
            pieces.append(t.append_column(schema.REASON, pa.array([stage] * t.num_rows, pa.string())))
    if not pieces:
        return pa.table({schema.IMAGE_ID: [], schema.DUP_OF: [], schema.REASON: []}, schema=_REMOVED)
    dups = pa.concat_tables(pieces).select([schema.IMAGE_ID, schema.DUP_OF, schema.REASON]).cast(_REMOVED)
    ids = dups[schema.IMAGE_ID].to_numpy(zero_copy_only=False)
    # an image removed by two stages: the later stage's decision stands
    last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]
    dups = dups.take(np.sort(last))
    ids, dup_of = dups[schema.IMAGE_ID], dups[schema.DUP_OF].to_numpy(zero_copy_only=False).astype(object)
    for _ in range(len(dedup_stages)):
        onward = pc.index_in(pa.array(dup_of, pa.string()), value_set=ids).to_numpy(zero_copy_only=False)
        valid = ~np.isnan(onward.astype(np.float64))  # the target was removed too: follow it
        if not valid.any():
            break
        dup_of[valid] = dup_of[onward[valid].astype(np.int64)]
    return dups.set_column(1, schema.DUP_OF, pa.array(dup_of, pa.string()))


_REMOVED = pa.schema([(schema.IMAGE_ID, pa.string()), (schema.DUP_OF, pa.string()), (schema.REASON, pa.string())])


def status_of(ingest_part: pa.Table, dups: pa.Table) -> pa.Table:
    """The final status rows of one ingest part's files, given :func:`removed`'s duplicates."""
    ids = ingest_part[schema.IMAGE_ID]
    ok = ingest_part[schema.STATUS_COL].to_numpy(zero_copy_only=False) == schema.STATUS_OK
    status = np.where(ok, schema.FINAL_KEPT, schema.STATUS_QUARANTINED).astype(object)
    reason = ingest_part[schema.ERROR].to_numpy(zero_copy_only=False).astype(object)
    dup_of = np.full(len(ids), None, dtype=object)
    at = pc.index_in(ids, value_set=dups[schema.IMAGE_ID]).to_numpy(zero_copy_only=False)
    hit = ~np.isnan(at.astype(np.float64))
    src = at[hit].astype(np.int64)
    status[hit] = schema.FINAL_DUPLICATE
    reason[hit] = dups[schema.REASON].to_numpy(zero_copy_only=False)[src]
    dup_of[hit] = dups[schema.DUP_OF].to_numpy(zero_copy_only=False)[src]
    return pa.table(
        {
            schema.IMAGE_ID: ids,
            schema.URI: ingest_part[schema.URI],
            schema.STATUS_COL: pa.array(status, pa.string()),
            schema.REASON: pa.array(reason, pa.string()),
            schema.DUP_OF: pa.array(dup_of, pa.string()),
        },
        schema=schema.STATUS,
    )


def removed_per_stage(dups: pa.Table) -> dict[str, int]:
    """How many duplicates each stage named (in :func:`removed`'s table)."""
    return {str(r["values"]): int(r["counts"]) for r in pc.value_counts(dups[schema.REASON]).to_pylist()}


def check_removed_found(inputs: StageInputs, named: dict[str, int], found: dict[str, int]) -> None:
    """Every duplicate a dedup stage names (``named``, per stage) must be an ingested image (``found``: the
    duplicates per stage the status rows hold)."""
    for stage, n in named.items():
        if found.get(stage, 0) != n:
            raise RuntimeError(f"{inputs.folder(stage)} names images that ingest does not have: rerun the stage")


def aligned(ids: pa.Array | pa.ChunkedArray, table: pa.Table) -> pa.Table:
    """Rows of ``table`` (keyed by image_id) in the order of ``ids``; null rows where absent."""
    return table.take(pc.index_in(ids, value_set=table[schema.IMAGE_ID]))


def embed_listing(inputs: StageInputs) -> Location:
    """embed's work list: row group ``i`` lists the images of embed part ``i`` (id, uri, size, content hash...)."""
    return inputs.folder(EMBED) / schema.LISTING


def embed_listing_rows(
    inputs: StageInputs, index: int, ids: pa.Array | pa.ChunkedArray, columns: list[str]
) -> pa.Table:
    """``image_id`` and ``columns`` of embed's work list for embed part ``index`` (its row group ``index``), in the
    order of ``ids`` (images of that part); ``RuntimeError`` when the part holds an image its work list lacks."""
    listing = pq.ParquetFile(embed_listing(inputs)).read_row_group(
        index, columns=list(dict.fromkeys([schema.IMAGE_ID, *columns]))
    )
    at = pc.index_in(ids, value_set=listing[schema.IMAGE_ID].combine_chunks())
    if at.null_count:
        raise RuntimeError(f"{inputs.folder(EMBED)}: part {index} holds images its work list lacks: rerun embed")
    return listing.take(at)


def embed_parts_of(inputs: StageInputs, ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The embed part holding each of ``ids`` (int32; null for an image embed did not list), from embed's work list
    read one row group at a time: memory holds ``ids`` and one part's rows."""
    file = pq.ParquetFile(embed_listing(inputs))
    found = []
    for g in range(file.num_row_groups):
        rows = file.read_row_group(g, columns=[schema.IMAGE_ID, schema.PART])
        found.append(rows.filter(pc.is_in(rows[schema.IMAGE_ID], ids)))
    table = pa.concat_tables(found) if found else file.schema_arrow.empty_table().select([schema.IMAGE_ID, schema.PART])
    return pc.cast(aligned(ids, table)[schema.PART], pa.int32()).combine_chunks()


def calibration_copies(inputs: StageInputs, key: str) -> tuple[pa.Table, np.ndarray]:
    """embed's synthetic copies as stored: ``image_id`` (the source) and ``edit`` of each [C], and model ``key``'s
    embeddings [C, D]. An image may have several copies (one per edit family), so they are read in order, not by id.
    """
    col = schema.embedding_column(key)
    parts = inputs.parts(EMBED, schema.CALIBRATION)
    ids = pa.schema([(schema.IMAGE_ID, pa.string()), (schema.EDIT, pa.string())])
    if not parts:  # calibration_copies=0, or nothing reached embed
        return ids.empty_table(), np.zeros((0, 0), np.float32)
    if col not in pq.read_schema(parts[0]).names:
        raise ValueError(f"no embeddings for model {key!r} in {inputs.folder(EMBED)}: set it in embed.models")
    table = inputs.table(EMBED, columns=[schema.IMAGE_ID, schema.EDIT, col], sub=schema.CALIBRATION)
    x = table[col].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1).astype(np.float32, copy=False)
    return table.select([schema.IMAGE_ID, schema.EDIT]), x


def rotated_views(inputs: StageInputs, key: str, ids: pa.Array | pa.ChunkedArray, own: np.ndarray) -> np.ndarray:
    """Model ``key``'s embeddings of embed's views (``embed.copy_views``) of ``ids`` (whose own embeddings are
    ``own`` [N, D]), as [A, N, D] float32 (one slab per angle, rows in ``ids``' order); [0, N, D] where embed made
    none. An image a view is missing for gets its own embedding there (a view adds candidates, never removes one)."""
    if not inputs.parts(EMBED, schema.VIEWS):
        return own[None][:0]
    edits = sorted(set(inputs.table(EMBED, columns=[schema.EDIT], sub=schema.VIEWS)[schema.EDIT].to_pylist()))
    slabs = np.repeat(own[None], len(edits), axis=0)
    for slab, edit in zip(slabs, edits, strict=True):
        x, missing = _rows_of(inputs, key, ids, schema.VIEWS, partial(_edit_is, edit))
        slab[~missing] = x[~missing]
    return slabs


def embeddings_of(
    inputs: StageInputs,
    key: str,
    ids: pa.Array | pa.ChunkedArray,
    allow_missing: bool = False,
) -> np.ndarray:
    """Embeddings of model ``key`` for ``ids`` (in that order), as a [N, D] float32 array (zeros where missing and
    ``allow_missing``). The synthetic copies: :func:`calibration_copies`."""
    col = schema.embedding_column(key)
    parts = inputs.parts(EMBED)
    if not parts:  # embed had no image to embed (everything quarantined or removed before it)
        if len(ids) and not allow_missing:
            raise RuntimeError(f"{inputs.folder(EMBED)} holds no embeddings: rerun embed")
        return np.zeros((len(ids), 0), np.float32)
    if col not in pq.read_schema(parts[0]).names:
        raise ValueError(f"no embeddings for model {key!r} in {inputs.folder(EMBED)}: set it in embed.models")
    out_x, missing = _rows_of(inputs, key, ids)
    if missing.any() and not allow_missing:
        raise RuntimeError(f"{inputs.folder(EMBED)} lacks embeddings for some images: rerun embed")
    return out_x


def _edit_is(edit: str, table: pa.Table) -> pa.ChunkedArray:
    return pc.equal(table[schema.EDIT], edit)


def _rows_of(
    inputs: StageInputs,
    key: str,
    ids: pa.Array | pa.ChunkedArray,
    sub: str = "",
    also: Callable[[pa.Table], pa.ChunkedArray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Model ``key``'s embeddings of ``ids`` [N, D] from embed's parts (sub-folder ``sub``; rows ``also`` marks,
    at most one per image), zeros where missing, and which are missing [N]."""
    col = schema.embedding_column(key)

    def keep(t: pa.Table) -> pa.ChunkedArray:
        wanted = pc.is_in(t[schema.IMAGE_ID], ids)
        return wanted if also is None else pc.and_(wanted, also(t))

    # kept part by part: memory holds the rows asked for and one part, not every embedding of the pool
    columns = [schema.IMAGE_ID, col] + ([schema.EDIT] if sub else [])
    table = inputs.table(EMBED, columns=columns, sub=sub, keep=keep)
    pos = pc.index_in(ids, value_set=table[schema.IMAGE_ID])
    missing = pc.is_null(pos).to_numpy(zero_copy_only=False)
    width = getattr(table.schema.field(col).type, "list_size", 0)  # none kept: the width from the schema
    flat = table[col].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1 if table.num_rows else width)
    out_x = np.zeros((len(ids), flat.shape[1]), np.float32)
    out_x[~missing] = flat[pc.drop_null(pos).to_numpy()]
    return out_x, missing
