"""Stage ``dedup_exact``: byte-identical files (same content hash) keep one copy.

The kept file of a group is the one whose URI sorts first (shortest, then lexicographic), a rule that does not depend
on listing order or on which worker saw the file first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvdkit.core import schema
from lvdkit.core.settings import setting
from lvdkit.core.stage import StageInputs, StageOutput
from lvdkit.core.views import alive, dedups_before
from lvdkit.curation.components import dedup_stats, representatives


@dataclass
class DedupExactConfig:
    """Exact dedup costs a sort of the content hashes; on a large pool, one sort per hash partition."""

    enabled: bool = True
    # where it runs: one task ("single") or partitioned by content hash over the cluster ("partitioned");
    # "auto": partitioned from partition_min_rows ingested files on
    path: Literal["auto", "single", "partitioned"] = "auto"
    partition_min_rows: int = setting(1_000_000, ge=0)
    partition_rows: int = setting(1_000_000, ge=1)  # rows per partition task (about 250 bytes each)


def dedup_exact(images: pa.Table, cfg: DedupExactConfig) -> pa.Table:
    """``images`` (``image_id``, ``uri``, ``content_hash`` of ingested, usable images) -> dedup rows (schema.DEDUP)."""
    n = images.num_rows
    if not cfg.enabled or n == 0:
        return _no_duplicates(images)
    _, labels = np.unique(images[schema.CONTENT_HASH].to_numpy(zero_copy_only=False), return_inverse=True)
    uris = images[schema.URI].to_numpy(zero_copy_only=False)
    uri_rank = np.lexsort((uris, pc.utf8_length(images[schema.URI]).to_numpy()))  # shortest URI, then lexicographic
    priority = np.empty(n, dtype=np.int64)
    priority[uri_rank] = np.arange(n)
    rep = representatives(labels.ravel(), priority)
    return groups_table(images[schema.IMAGE_ID], rep, np.zeros(n, dtype=np.float32))


def _no_duplicates(images: pa.Table) -> pa.Table:
    n = images.num_rows
    return groups_table(images[schema.IMAGE_ID], np.arange(n), np.zeros(n, dtype=np.float32))


def groups_table(ids: pa.ChunkedArray | pa.Array, rep: np.ndarray, distance: np.ndarray) -> pa.Table:
    """Dedup rows from each image's representative index: the representative is kept, the others name it."""
    ids_np = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)
    keep = rep == np.arange(len(rep))
    group = ids_np[rep]
    dup_of = np.where(keep, None, group)
    return pa.table(
        {
            schema.IMAGE_ID: pa.array(ids_np, pa.string()),
            schema.GROUP_ID: pa.array(group, pa.string()),
            schema.KEEP: pa.array(keep),
            schema.DUP_OF: pa.array(dup_of, pa.string()),
            schema.DISTANCE: pa.array(np.where(keep, 0, distance).astype(np.float32)),
        },
        schema=schema.DEDUP,
    )


def run_dedup_exact(cfg: DedupExactConfig, inputs: StageInputs) -> StageOutput:
    """The stage: usable images that no earlier dedup removed -> one dedup row each."""
    images = alive(inputs, dedups_before("dedup_exact"), [schema.URI, schema.CONTENT_HASH])
    table = dedup_exact(images, cfg)
    return StageOutput(table, dedup_stats(table, {}))
