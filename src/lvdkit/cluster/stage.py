"""Stage ``cluster``: hierarchical k-means of the deduplicated pool's semantic embeddings, and balanced sampling.

The per-image output (cluster id at every level, distance to the level-1 centroid, balanced-sample flag) and the
centroids feed cluster-based retrieval and the curated set.
"""

from __future__ import annotations

import hashlib
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
from lvdkit.core.views import DEDUP_STAGES, alive, embed_parts_of, embeddings_of


@dataclass
class ClusterConfig:
    """Which embedding to cluster, the hierarchy, and an optional balanced sample of the pool."""

    embedding: str = "semantic"  # an embed.models key
    hierarchy: HierarchicalConfig = field(default_factory=HierarchicalConfig)
    # balanced sample of this many images goes to the curated set; null: none
    target_size: int | None = setting(None, ge=0)
    strategy: Literal["random", "closest"] = "random"  # leaf picks of the balanced sample
    # where it runs: one task ("single") or partitioned over the cluster ("partitioned": level 1 fitted per
    # partition of coarse cells, so level-1 counts in the millions work); "auto": partitioned from
    # partition_min_rows images on
    path: Literal["auto", "single", "partitioned"] = "auto"
    partition_min_rows: int = setting(1_000_000, ge=0)
    partition_rows: int = setting(500_000, ge=2)  # images per partition task (level 1 is fitted on them)
    fit_sample: int = setting(200_000, ge=1)  # images the coarse cells are fitted on
    task_cpus: float = setting(1.0, gt=0)
    task_memory_mb: int | None = setting(None, ge=64)  # null: from partition_rows and the embedding size


def pick_keys(content_hashes: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """The random order of balanced sampling's picks: a hash of each image's content, the same on every path,
    partition and machine. [N] float64 in [0, 1)."""
    out = np.empty(len(content_hashes), np.float64)
    for i, h in enumerate(content_hashes.to_pylist()):
        digest = hashlib.blake2b(f"pick:{seed}:{h}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2**64
    return out


def cluster_images(
    ids: pa.Array | pa.ChunkedArray,
    x: np.ndarray,
    cfg: ClusterConfig,
    keys: np.ndarray | None = None,
    embed_part: pa.Array | None = None,
) -> tuple[pa.Table, list[np.ndarray], dict[str, Any]]:
    """Cluster unit rows x [N, D]; returns the per-image table (schema.CLUSTER), centroids per level, and stats.
    ``keys`` [N]: the random order of balanced picks (default: seeded random numbers); ``embed_part`` [N]: the embed
    part of each image (default: null)."""
    n = len(ids)
    if n == 0:  # nothing survived dedup: no clusters, no centroids
        return schema.CLUSTER.empty_table(), [], {"levels": [], "level1_sizes": None, "balanced": 0}
    result = hierarchical_kmeans(x, cfg.hierarchy)
    levels = np.stack(result.assign, axis=1).astype(np.int32)  # [N, L]
    balanced = np.zeros(n, dtype=bool)
    if cfg.target_size is not None:
        picks = balanced_sample(result, cfg.target_size, strategy=cfg.strategy, seed=cfg.hierarchy.seed, keys=keys)
        balanced[picks] = True
    table = pa.table(
        {
            schema.IMAGE_ID: ids,
            schema.CLUSTER_IDS: pa.FixedSizeListArray.from_arrays(pa.array(levels.ravel()), levels.shape[1]).cast(
                pa.list_(pa.int32())
            ),
            schema.DISTANCE: pa.array(np.asarray(result.distance, dtype=np.float32)),
            schema.BALANCED: pa.array(balanced),
            schema.EMBED_PART: embed_part if embed_part is not None else pa.nulls(n, pa.int32()),
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
    images = alive(inputs, DEDUP_STAGES, [schema.CONTENT_HASH])
    # in content order, with content-keyed picks: the same clusters wherever the files lie, and on both paths
    images = images.sort_by([(schema.CONTENT_HASH, "ascending"), (schema.IMAGE_ID, "ascending")])
    x = embeddings_of(inputs, cfg.embedding, images[schema.IMAGE_ID])
    keys = pick_keys(images[schema.CONTENT_HASH], cfg.hierarchy.seed)
    parts = embed_parts_of(inputs, images[schema.IMAGE_ID])
    table, centroids, stats = cluster_images(images[schema.IMAGE_ID], x, cfg, keys, parts)
    sides: dict[str, bytes] = {}
    for level, c in enumerate(centroids, start=1):
        buf = io.BytesIO()
        np.save(buf, c)
        sides[schema.centroids_file(level)] = buf.getvalue()
    return StageOutput(table, stats, dict(sides))
