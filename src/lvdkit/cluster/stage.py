"""Stage ``cluster``: hierarchical k-means of the deduplicated pool's semantic embeddings, and balanced sampling.

The per-image output (cluster id at every level, distance to the level-1 centroid, balanced-sample flag) and the
centroids feed cluster-based retrieval and the curated set.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from lvdkit.cluster.hierarchical import HierarchicalConfig, hierarchical_kmeans
from lvdkit.cluster.sampling import balanced_sample
from lvdkit.core import schema
from lvdkit.core.settings import setting
from lvdkit.core.stage import StageInputs, StageOutput
from lvdkit.core.views import DEDUP_STAGES, alive, embeddings_of


@dataclass
class ClusterConfig:
    """Which embedding to cluster, the hierarchy, and an optional balanced sample of the pool."""

    embedding: str = "semantic"  # an embed.models key
    hierarchy: HierarchicalConfig = field(default_factory=HierarchicalConfig)
    # balanced sample of this many images goes to the curated set; null: none
    target_size: int | None = setting(None, ge=0)
    strategy: Literal["random", "closest"] = "random"  # leaf picks of the balanced sample


def cluster_images(
    ids: pa.Array | pa.ChunkedArray, x: np.ndarray, cfg: ClusterConfig
) -> tuple[pa.Table, list[np.ndarray], dict[str, Any]]:
    """Cluster unit rows x [N, D]; returns the per-image table (schema.CLUSTER), centroids per level, and stats."""
    n = len(ids)
    if n == 0:  # nothing survived dedup: no clusters, no centroids
        return schema.CLUSTER.empty_table(), [], {"levels": [], "level1_sizes": None, "balanced": 0}
    result = hierarchical_kmeans(x, cfg.hierarchy)
    levels = np.stack(result.assign, axis=1).astype(np.int32)  # [N, L]
    balanced = np.zeros(n, dtype=bool)
    if cfg.target_size is not None:
        balanced[balanced_sample(result, cfg.target_size, strategy=cfg.strategy, seed=cfg.hierarchy.seed)] = True
    table = pa.table(
        {
            schema.IMAGE_ID: ids,
            schema.CLUSTER_IDS: pa.FixedSizeListArray.from_arrays(pa.array(levels.ravel()), levels.shape[1]).cast(
                pa.list_(pa.int32())
            ),
            schema.DISTANCE: pa.array(np.asarray(result.distance, dtype=np.float32)),
            schema.BALANCED: pa.array(balanced),
        },
        schema=schema.CLUSTER,
    )
    sizes = np.bincount(result.assign[0])
    stats = {
        "levels": [len(c) for c in result.centroids],
        "level1_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "balanced": int(balanced.sum()),
    }
    return table, list(result.centroids), stats


def run_cluster(cfg: ClusterConfig, inputs: StageInputs) -> StageOutput:
    """The stage: the deduplicated pool's embeddings -> per-image clusters, plus each level's centroids."""
    images = alive(inputs, DEDUP_STAGES, [])
    x = embeddings_of(inputs, cfg.embedding, images[schema.IMAGE_ID])
    table, centroids, stats = cluster_images(images[schema.IMAGE_ID], x, cfg)
    sides: dict[str, bytes] = {}
    for level, c in enumerate(centroids, start=1):
        buf = io.BytesIO()
        np.save(buf, c)
        sides[schema.centroids_file(level)] = buf.getvalue()
    return StageOutput(table, stats, dict(sides))
