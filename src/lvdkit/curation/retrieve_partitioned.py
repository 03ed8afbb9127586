"""``retrieve`` partitioned: the seed sets' neighbours found part by part, merged per seed set.

1. prepare: every seed set read and embedded (seed sets are small beside the pool); cluster-mode sets get the
   level-1 clusters holding more than ``min_seeds_per_cluster`` of their seeds;
2. scatter, per embed part: each sample-mode seed's ``k`` nearest images in this part (exact, Faiss flat); per
   part of the cluster stage: the ``per_cluster`` closest members of each chosen cluster found there;
3. plan: one partition per seed set;
4. solve, per seed set: the candidates merged (a seed's k nearest over the pool are among its k nearest of every
   part; a cluster's closest among each part's closest), each image credited to its most similar seed;
5. reduce: the hits (they grow with what is retrieved, not with the pool) and the seeds side file;
6. write, per seed set: its hits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.io import load_npy
from lvdkit.core.partitions import ROW_KEY_SHIFT, row_keys, top_against
from lvdkit.core.stage import PartitionedWork, Resources, Scratch, StageInputs, StageOutput
from lvdkit.core.storage import Location
from lvdkit.core.views import DEDUP_STAGES, EMBED, alive_embedded
from lvdkit.curation.retrieve import (
    CLUSTER,
    RETRIEVED,
    SAMPLE,
    RetrieveConfig,
    hits_table,
    resolve_mode,
    retrieve_stats,
    seed_rows,
)
from lvdkit.curation.side_sets import SideSetReader

SET, SEED, LEVEL1 = "seed_set", "seed", "level1"
_CANDIDATES = pa.schema(
    [
        (SET, pa.string()),
        (SEED, pa.int64()),
        (LEVEL1, pa.int64()),
        (schema.IMAGE_ID, pa.string()),
        (schema.SCORE, pa.float32()),
    ]
)


@dataclass
class SeedState:
    """The seed sets as read once: per set its mode, seeds (ids and embeddings), k, chosen clusters."""

    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: pa.Table | None = None  # the seeds side file
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class RetrievePartitions(PartitionedWork):
    cfg: RetrieveConfig
    reader: SideSetReader
    inputs: StageInputs
    embed_parts: int
    cluster_parts: int
    write_per_partition = True

    def empty_output(self) -> pa.Table:
        return RETRIEVED.empty_table()

    @classmethod
    def create(cls, cfg: RetrieveConfig, reader: SideSetReader, inputs: StageInputs) -> RetrievePartitions:
        work = cls(cfg, reader, inputs, len(inputs.parts(EMBED)), len(inputs.parts("cluster")))
        work.n_inputs = max(work.embed_parts, work.cluster_parts)
        work.resources = Resources(cpus=1.0, memory_mb=2048)
        return work

    def prepare(self) -> SeedState:
        state = SeedState()
        centroids = None
        tables = []
        for name, seed_set in self.cfg.seed_sets.items():
            seeds = self.reader.read(self.cfg.embedding, seed_set.inputs)
            tables.append(seed_rows(name, seeds))
            mode = resolve_mode(seed_set, seeds.ok.num_rows, self.cfg)
            entry: dict[str, Any] = {"mode": mode, "ids": seeds.ok[schema.IMAGE_ID].to_pylist(), "x": seeds.x}
            entry["k"] = seed_set.k
            if mode == CLUSTER:
                if centroids is None:
                    centroids = load_npy(self.inputs.side("cluster", schema.centroids_file(1)))
                nearest = np.argmax(seeds.x @ centroids.T, axis=1) if len(seeds.x) else np.zeros(0, np.int64)
                counts = np.bincount(nearest, minlength=len(centroids))
                entry["chosen"] = np.flatnonzero(counts > self.cfg.min_seeds_per_cluster)
            state.sets[name] = entry
            unusable = seeds.rows.num_rows - seeds.ok.num_rows
            state.stats[name] = {"seeds": seeds.ok.num_rows, "seeds_unusable": unusable, "mode": mode}
        state.seeds = pa.concat_tables(tables) if tables else None
        return state

    def scatter(self, state: SeedState, index: int) -> tuple[pa.Table, None]:
        pieces = []
        if index < self.embed_parts and any(s["mode"] == SAMPLE for s in state.sets.values()):
            pieces.extend(self._nearest(state, index))
        if index < self.cluster_parts and any(s["mode"] == CLUSTER for s in state.sets.values()):
            pieces.extend(self._closest(state, index))
        table = pa.concat_tables(pieces) if pieces else _CANDIDATES.empty_table()
        return table.sort_by(SET), None

    def _nearest(self, state: SeedState, index: int) -> list[pa.Table]:
        col = schema.embedding_column(self.cfg.embedding)
        rows = alive_embedded(self.inputs, index, DEDUP_STAGES, [col])
        c = rows[col].combine_chunks()
        x = c.flatten().to_numpy().reshape(len(c), -1) if len(c) else np.zeros((0, 1), np.float32)
        ids = np.asarray(rows[schema.IMAGE_ID].to_numpy(zero_copy_only=False), dtype=object)
        out = []
        for name, s in state.sets.items():
            if s["mode"] != SAMPLE or not len(s["ids"]) or not len(x):
                continue
            sims, keys = top_against(s["x"], x, row_keys(index, len(x)), s["k"])  # [S, k]
            seed = np.repeat(np.arange(len(s["ids"])), keys.shape[1])
            ok = keys.ravel() >= 0
            local = (keys.ravel()[ok] & ((1 << ROW_KEY_SHIFT) - 1)).astype(np.int64)
            out.append(_candidates(name, seed[ok], None, ids[local], sims.ravel()[ok]))
        return out

    def _closest(self, state: SeedState, index: int) -> list[pa.Table]:
        rows = pq.read_table(
            self.inputs.parts("cluster")[index], columns=[schema.IMAGE_ID, schema.CLUSTER_IDS, schema.DISTANCE]
        )
        level1 = pc.list_element(rows[schema.CLUSTER_IDS], 0).to_numpy(zero_copy_only=False).astype(np.int64)
        distance = rows[schema.DISTANCE].to_numpy(zero_copy_only=False)
        ids = np.asarray(rows[schema.IMAGE_ID].to_numpy(zero_copy_only=False), dtype=object)
        out = []
        for name, s in state.sets.items():
            if s["mode"] != CLUSTER:
                continue
            take = _closest_per_cluster(level1, distance, ids, s["chosen"], self.cfg.per_cluster)
            out.append(_candidates(name, None, level1[take], ids[take], 1.0 - distance[take]))
        return out

    def merge(self, total: Any, summary: Any) -> None:
        return None

    def plan(self, total: Any) -> tuple[list[Any], None]:
        return list(self.cfg.seed_sets), None

    def solve(self, state: SeedState, figures: Any, partition: Any, scratch: list[Location]) -> pa.Table:
        name, s = partition, state.sets[partition]
        data = pads.dataset([str(p) for p in scratch], format="parquet", schema=_CANDIDATES)
        rows = data.to_table(filter=pc.field(SET) == name)
        if s["mode"] == SAMPLE:
            return _by_seed(rows, name, s["ids"], s["k"])
        return _by_cluster(rows, name, self.cfg)

    def reduce(self, state: SeedState, figures: Any, solved: list[Location]) -> StageOutput:
        stats = {}
        for name, path in zip(self.cfg.seed_sets, solved, strict=True):
            stats[name] = {**state.stats[name], "retrieved": pq.ParquetFile(path).metadata.num_rows}
        sides = {schema.SEEDS_FILE: state.seeds} if state.seeds is not None else {}
        return StageOutput(RETRIEVED.empty_table(), retrieve_stats(stats, self.cfg), dict(sides))

    def write(self, state: SeedState, figures: Any, decisions: pa.Table, index: int, scratch: Scratch) -> pa.Table:
        return pq.read_table(scratch.solved[index], schema=RETRIEVED)


def _candidates(name: str, seed: Any, level1: Any, ids: np.ndarray, score: np.ndarray) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            SET: pa.array([name] * n, pa.string()),
            SEED: pa.array(seed, pa.int64()) if seed is not None else pa.nulls(n, pa.int64()),
            LEVEL1: pa.array(level1, pa.int64()) if level1 is not None else pa.nulls(n, pa.int64()),
            schema.IMAGE_ID: pa.array(ids, pa.string()),
            schema.SCORE: pa.array(np.asarray(score, np.float32)),
        },
        schema=_CANDIDATES,
    )


def _closest_per_cluster(
    level1: np.ndarray, distance: np.ndarray, ids: np.ndarray, chosen: np.ndarray, per_cluster: int
) -> np.ndarray:
    """Indices of the ``per_cluster`` members closest to their centroid of each chosen cluster (ties: by id)."""
    members = np.flatnonzero(np.isin(level1, chosen))
    order = members[np.lexsort((ids[members].astype(str), distance[members], level1[members]))]
    rank = np.arange(len(order)) - np.searchsorted(level1[order], level1[order], side="left")
    return order[rank < per_cluster]


def _by_seed(rows: pa.Table, name: str, seed_ids: list[str], k: int) -> pa.Table:
    """Each seed's k nearest over every part's candidates; one hit per image, credited to its most similar seed."""
    seed = rows[SEED].to_numpy(zero_copy_only=False).astype(np.int64)
    score = rows[schema.SCORE].to_numpy(zero_copy_only=False)
    ids = np.asarray(rows[schema.IMAGE_ID].to_numpy(zero_copy_only=False), dtype=object).astype(str)
    order = np.lexsort((ids, -score, seed))
    rank = np.arange(len(order)) - np.searchsorted(seed[order], seed[order], side="left")
    top = order[rank < k]
    best = top[np.lexsort((seed[top], -score[top], ids[top]))]  # per image: best score, then lowest seed
    first = np.concatenate([[True], ids[best][1:] != ids[best][:-1]]) if len(best) else np.zeros(0, bool)
    hit = best[first]
    seeds = np.asarray(seed_ids, dtype=object)[seed[hit]]
    return hits_table(ids[hit].astype(object), name, seeds, score[hit], SAMPLE)


def _by_cluster(rows: pa.Table, name: str, cfg: RetrieveConfig) -> pa.Table:
    """Each chosen cluster's closest over every part's candidates, then the set's cap, closest first."""
    level1 = rows[LEVEL1].to_numpy(zero_copy_only=False).astype(np.int64)
    distance = 1.0 - rows[schema.SCORE].to_numpy(zero_copy_only=False)
    ids = np.asarray(rows[schema.IMAGE_ID].to_numpy(zero_copy_only=False), dtype=object)
    take = _closest_per_cluster(level1, distance, ids, np.unique(level1), cfg.per_cluster)
    take = take[np.lexsort((ids[take].astype(str), distance[take]))][: cfg.max_per_set]
    return hits_table(ids[take], name, np.full(len(take), None), 1.0 - distance[take], CLUSTER)
