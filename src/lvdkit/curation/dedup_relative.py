"""Stage ``dedup_relative``: remove pool images that copy a protected image (an evaluation or test set).

As in LVD-142M (DINOv2 paper, appendix A), so benchmarks stay uncontaminated: every pool image whose copy-detection
similarity to any protected image exceeds a threshold is removed, and the protected image it matched is recorded.
Descriptors go through the same whitening that ``dedup_copy`` fitted on the pool, so one threshold scale applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from lvdkit.core import schema
from lvdkit.core.knn import build_index, knn


@dataclass
class DedupRelativeConfig:
    """Protected sets and the similarity above which a pool image counts as their copy."""

    protected: list[str] = field(default_factory=list)  # folders, globs, file lists or URIs; empty: stage is a no-op
    threshold: float | None = None  # cosine after whitening; null: the threshold dedup_copy calibrated
    embedding: str = "copy"  # which embed model (must match dedup_copy's)


def dedup_relative(
    pool_ids: pa.Array | pa.ChunkedArray,
    pool_x: np.ndarray,
    protected_ids: list[str],
    protected_x: np.ndarray,
    threshold: float,
) -> pa.Table:
    """Mark pool images (descriptors pool_x [N, D], whitened) whose best match in protected_x [P, D] exceeds
    ``threshold``. dup_of / group_id name the protected image (its id), distance = 1 - similarity."""
    n = len(pool_ids)
    ids = np.asarray(
        pool_ids.to_numpy(zero_copy_only=False) if hasattr(pool_ids, "to_numpy") else pool_ids, dtype=object
    )
    if n == 0 or len(protected_ids) == 0:
        best_sim, best = np.full(n, -1.0, np.float32), np.zeros(n, np.int64)
    else:
        sims, nn = knn(build_index(protected_x, "flat"), pool_x, 1)  # [N, 1]
        best_sim, best = sims[:, 0], nn[:, 0]
    hit = best_sim > threshold
    matched = np.asarray(protected_ids, dtype=object)[best] if len(protected_ids) else np.full(n, None)
    return pa.table(
        {
            schema.IMAGE_ID: pa.array(ids, pa.string()),
            schema.GROUP_ID: pa.array(np.where(hit, matched, ids), pa.string()),
            schema.KEEP: pa.array(~hit),
            schema.DUP_OF: pa.array([m if h else None for m, h in zip(matched, hit, strict=True)], pa.string()),
            "distance": pa.array(np.where(hit, 1.0 - best_sim, 0.0).astype(np.float32)),
        },
        schema=schema.DEDUP,
    )
