"""Stage ``retrieve``: uncurated images near the seed sets, as LVD-142M selected them (DINOv2 paper, section 3).

- Sample-based retrieval (large seed sets): the k nearest pool images of every seed image (k = 4 in LVD for
  ImageNet-22k; a larger k makes seeds "collide" on the same images), merged across seeds.
- Cluster-based retrieval (small seed sets): the pool is clustered; every cluster holding more than
  ``min_seeds_per_cluster`` seed images (3 in LVD) contributes up to ``per_cluster`` of its images (closest to the
  centroid first), at most ``max_per_set`` per seed set.

Each hit records the seed set, the seed image behind it and a similarity score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa

from lvdkit.core.knn import build_index, knn

Mode = Literal["auto", "sample", "cluster"]
SAMPLE, CLUSTER = "sample_retrieval", "cluster_retrieval"

RETRIEVED = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("seed_set", pa.string(), nullable=False),
        pa.field("seed_id", pa.string()),  # the seed image (sample retrieval) or null (cluster retrieval)
        pa.field("score", pa.float32()),  # cosine similarity to the seed, or to the cluster centroid
        pa.field("method", pa.string(), nullable=False),  # sample_retrieval | cluster_retrieval
    ]
)


@dataclass
class SeedSet:
    """One seed set: images that show what the user cares about."""

    inputs: list[str] = field(default_factory=list)  # folders, globs, file lists or URIs
    mode: Mode = "auto"  # auto: sample-based for sets of at least sample_min_seeds images, else cluster-based
    k: int = 4  # sample-based: nearest pool images per seed image


@dataclass
class RetrieveConfig:
    """Seed sets by name, and the cluster-based retrieval rule."""

    seed_sets: dict[str, SeedSet] = field(default_factory=dict)
    embedding: str = "semantic"  # which embed model key (seeds are embedded with the same model)
    sample_min_seeds: int = 1000  # auto mode: sets at least this large use sample-based retrieval
    min_seeds_per_cluster: int = 3  # cluster-based: a cluster must hold more than this many seed images
    per_cluster: int = 10_000  # cluster-based: images taken from each such cluster
    max_per_set: int = 1_000_000  # cluster-based: cap per seed set


def resolve_mode(seed_set: SeedSet, n_seeds: int, cfg: RetrieveConfig) -> str:
    """The retrieval method a seed set gets: explicit, or by size as in the paper."""
    if seed_set.mode == "sample" or (seed_set.mode == "auto" and n_seeds >= cfg.sample_min_seeds):
        return SAMPLE
    if seed_set.mode in ("cluster", "auto"):
        return CLUSTER
    raise ValueError(f"seed set mode {seed_set.mode!r}; valid: 'auto', 'sample', 'cluster'")


def sample_retrieval(
    pool_ids: np.ndarray, pool_x: np.ndarray, seed_ids: list[str], seed_x: np.ndarray, k: int, seed_set: str
) -> pa.Table:
    """The ``k`` nearest pool images (pool_x [N, D], unit rows) of each seed (seed_x [S, D]); one row per pool image,
    credited to its most similar seed."""
    if not len(pool_ids) or not len(seed_ids):
        return RETRIEVED.empty_table()
    sims, nn = knn(build_index(pool_x, "auto"), seed_x, k)  # [S, k]
    flat_img, flat_sim = nn.ravel(), sims.ravel()
    flat_seed = np.repeat(np.arange(len(seed_ids)), nn.shape[1])
    valid = flat_img >= 0
    order = np.lexsort((-flat_sim[valid], flat_img[valid]))  # per image, best similarity first
    img, sim, seed = flat_img[valid][order], flat_sim[valid][order], flat_seed[valid][order]
    first = np.concatenate([[True], img[1:] != img[:-1]])
    return _table(pool_ids[img[first]], seed_set, np.asarray(seed_ids, dtype=object)[seed[first]], sim[first], SAMPLE)


def cluster_retrieval(
    pool_ids: np.ndarray,
    pool_cluster: np.ndarray,
    pool_distance: np.ndarray,
    seed_cluster: np.ndarray,
    seed_set: str,
    cfg: RetrieveConfig,
) -> pa.Table:
    """Pool images from clusters holding more than ``cfg.min_seeds_per_cluster`` seeds.

    pool_cluster / seed_cluster: [N] / [S] level-1 cluster ids; pool_distance: [N] 1 - cosine to the centroid.
    Each chosen cluster gives its ``per_cluster`` closest images; the set is capped at ``max_per_set``, closest first.
    """
    counts = np.bincount(seed_cluster, minlength=int(pool_cluster.max(initial=-1)) + 1)
    chosen = np.nonzero(counts > cfg.min_seeds_per_cluster)[0]
    members = np.nonzero(np.isin(pool_cluster, chosen))[0]
    if not len(members):
        return RETRIEVED.empty_table()
    order = members[np.lexsort((pool_distance[members], pool_cluster[members]))]  # by cluster, closest first
    rank = np.arange(len(order)) - np.searchsorted(pool_cluster[order], pool_cluster[order], side="left")
    take = order[rank < cfg.per_cluster]
    take = take[np.argsort(pool_distance[take], kind="stable")][: cfg.max_per_set]
    return _table(pool_ids[take], seed_set, np.full(len(take), None), 1.0 - pool_distance[take], CLUSTER)


def _table(ids: np.ndarray, seed_set: str, seed_ids: np.ndarray, score: np.ndarray, method: str) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "seed_set": pa.array([seed_set] * n, pa.string()),
            "seed_id": pa.array(seed_ids, pa.string()),
            "score": pa.array(np.asarray(score, dtype=np.float32)),
            "method": pa.array([method] * n, pa.string()),
        },
        schema=RETRIEVED,
    )
