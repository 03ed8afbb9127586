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
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from lvdkit.core import schema
from lvdkit.core.io import load_npy
from lvdkit.core.knn import build_index, knn
from lvdkit.core.settings import setting
from lvdkit.core.stage import StageInputs, StageOutput
from lvdkit.core.views import DEDUP_STAGES, aligned, alive, embeddings_of
from lvdkit.curation.side_sets import SideSet, SideSetReader

Mode = Literal["auto", "sample", "cluster"]
SAMPLE, CLUSTER = schema.METHOD_SAMPLE, schema.METHOD_CLUSTER
RETRIEVED = schema.RETRIEVED


@dataclass
class SeedSet:
    """One seed set: images that show what the user cares about."""

    inputs: list[str] = field(default_factory=list)  # folders, globs, file lists or URIs
    mode: Mode = "auto"  # auto: sample-based for sets of at least sample_min_seeds images, else cluster-based
    k: int = setting(4, ge=1)  # sample-based: nearest pool images per seed image


@dataclass
class RetrieveConfig:
    """Seed sets by name, and the cluster-based retrieval rule."""

    seed_sets: dict[str, SeedSet] = field(default_factory=dict)
    embedding: str = "semantic"  # which embed model key (seeds are embedded with the same model)
    sample_min_seeds: int = setting(1000, ge=1)  # auto mode: sets at least this large use sample-based retrieval
    min_seeds_per_cluster: int = setting(3, ge=0)  # cluster-based: a cluster must hold more than this many seed images
    per_cluster: int = setting(10_000, ge=1)  # cluster-based: images taken from each such cluster
    max_per_set: int = setting(1_000_000, ge=1)  # cluster-based: cap per seed set
    # where it runs: one task over the pool ("single"), or seed neighbours found per embed part and merged per seed
    # set ("partitioned", lvdkit.curation.retrieve_partitioned); "auto": partitioned from partition_min_rows images
    path: Literal["auto", "single", "partitioned"] = "auto"
    partition_min_rows: int = setting(1_000_000, ge=0)


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
    return hits_table(
        pool_ids[img[first]], seed_set, np.asarray(seed_ids, dtype=object)[seed[first]], sim[first], SAMPLE
    )


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
    return hits_table(pool_ids[take], seed_set, np.full(len(take), None), 1.0 - pool_distance[take], CLUSTER)


def hits_table(ids: np.ndarray, seed_set: str, seed_ids: np.ndarray, score: np.ndarray, method: str) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            schema.IMAGE_ID: pa.array(ids, pa.string()),
            schema.SEED_SET: pa.array([seed_set] * n, pa.string()),
            schema.SEED_ID: pa.array(seed_ids, pa.string()),
            schema.SCORE: pa.array(np.asarray(score, dtype=np.float32)),
            schema.METHOD: pa.array([method] * n, pa.string()),
        },
        schema=RETRIEVED,
    )


def run_retrieve(cfg: RetrieveConfig, reader: SideSetReader, inputs: StageInputs) -> StageOutput:
    """The stage: every seed set is ingested and embedded here, then retrieves by its mode; the seeds (with their
    embeddings) are a side file for the curated set."""
    if not cfg.seed_sets:
        return StageOutput(RETRIEVED.empty_table(), {"seed_sets": {}})
    images = alive(inputs, DEDUP_STAGES, [])
    ids = images[schema.IMAGE_ID]
    pool = _Pool(ids.to_numpy(zero_copy_only=False), embeddings_of(inputs, cfg.embedding, ids), inputs)
    hits, seed_tables, stats = [], [], {}
    for name, seed_set in cfg.seed_sets.items():
        seeds = reader.read(cfg.embedding, seed_set.inputs)
        seed_tables.append(seed_rows(name, seeds))
        mode = resolve_mode(seed_set, seeds.ok.num_rows, cfg)
        hits.append(pool.retrieve(name, seed_set, seeds, mode, cfg))
        stats[name] = {
            "seeds": seeds.ok.num_rows,
            "seeds_unusable": seeds.rows.num_rows - seeds.ok.num_rows,
            "mode": mode,
            "retrieved": hits[-1].num_rows,
        }
    sides = {schema.SEEDS_FILE: pa.concat_tables(seed_tables)} if seed_tables else {}
    table = pa.concat_tables(hits) if hits else RETRIEVED.empty_table()
    return StageOutput(table, retrieve_stats(stats, cfg), dict(sides))


def retrieve_stats(per_set: dict[str, dict[str, Any]], cfg: RetrieveConfig) -> dict[str, Any]:
    """The stage's stats: per seed set, and a warning for each set that retrieved nothing (and why)."""
    warnings = []
    for name, s in per_set.items():
        if s["retrieved"] == 0 and s["seeds"] > 0 and s["mode"] == CLUSTER:
            warnings.append(
                f"retrieve: seed set {name!r} retrieved nothing: no level-1 cluster holds more than "
                f"retrieve.min_seeds_per_cluster={cfg.min_seeds_per_cluster} of its {s['seeds']} seeds (with "
                f"{cfg.embedding!r} embeddings the seeds spread over many clusters). Lower min_seeds_per_cluster, "
                "or use mode: sample for this set"
            )
    return {"seed_sets": per_set, "warnings": warnings}


class _Pool:
    """The deduplicated pool as retrieval sees it: ids, embeddings and (read on first use) level-1 clusters."""

    def __init__(self, ids: np.ndarray, x: np.ndarray, inputs: StageInputs) -> None:
        self.ids, self.x, self.inputs = ids, x, inputs
        self._clusters: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def retrieve(self, name: str, seed_set: SeedSet, seeds: SideSet, mode: str, cfg: RetrieveConfig) -> pa.Table:
        if mode == SAMPLE:
            return sample_retrieval(self.ids, self.x, seeds.ok[schema.IMAGE_ID].to_pylist(), seeds.x, seed_set.k, name)
        level1, distance, centroids = self.clusters()
        sx = seeds.x
        seed_cluster = np.argmax(sx @ centroids.T, axis=1) if len(sx) else np.zeros(0, np.int64)
        return cluster_retrieval(self.ids, level1, distance, seed_cluster, name, cfg)

    def clusters(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._clusters is None:
            clusters = aligned(pa.array(self.ids, pa.string()), self.inputs.table("cluster", schema=schema.CLUSTER))
            level1 = np.asarray([c[0] for c in clusters[schema.CLUSTER_IDS].to_pylist()], dtype=np.int64)
            distance = clusters[schema.DISTANCE].to_numpy(zero_copy_only=False)
            centroids = load_npy(self.inputs.side("cluster", schema.centroids_file(1)))
            self._clusters = (level1, distance, centroids)
        return self._clusters


def seed_rows(name: str, seeds: SideSet) -> pa.Table:
    """The usable seeds as ingested, with their set's name and their embeddings."""
    sx = seeds.x
    emb = pa.FixedSizeListArray.from_arrays(pa.array(sx.ravel(), pa.float32()), sx.shape[1])
    ok = seeds.ok.append_column(schema.SEED_SET, pa.array([name] * seeds.ok.num_rows, pa.string()))
    return ok.append_column(schema.EMBEDDING, emb)
