"""``cluster`` partitioned: hierarchical k-means and balanced sampling with no task holding the pool.

1. prepare: coarse cells, k-means on a sample of the deduplicated pool read from evenly spread embed parts;
2. scatter, per embed part: each image to its nearest cell (a scratch table sorted by cell); counts per cell;
3. plan (driver): consecutive cells grouped into partitions of at most ``partition_rows`` images; level 1's ``k``
   (from the whole pool's size, no cap: millions of clusters work) split over the partitions by their size;
4. solve, per partition: level 1 (k-means with the paper's resampling steps) on its images: clusters, distances,
   centroids and sizes;
5. reduce: levels 2.. fitted on the level-1 centroids (as the single task does), balanced shares from the
   per-cluster counts alone (:func:`lvdkit.cluster.sampling.shares`);
6. write, per partition: its images' cluster at every level, distance, and the balanced picks of its clusters
   (every member of a level-1 cluster is in one partition, so picks are made there, in parallel).

With one partition the points, seeds and keys are those of the single task, so the decisions are the same.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit.cluster.hierarchical import fit_level, fit_upper_levels
from lvdkit.cluster.kmeans import assign_to_centroids, kmeans, prepare
from lvdkit.cluster.sampling import pick_by_share, shares
from lvdkit.cluster.stage import ClusterConfig, pick_keys
from lvdkit.core import schema
from lvdkit.core.packed import pack, unpack
from lvdkit.core.partitions import plan_ranges
from lvdkit.core.scratch_read import read_range
from lvdkit.core.stage import PartitionedWork, Resources, Scratch, StageInputs, StageOutput, scratch_row_group_rows
from lvdkit.core.storage import Location
from lvdkit.core.timing import timed
from lvdkit.core.views import DEDUP_STAGES, EMBED, alive_embedded, embed_listing_rows

CELL, X, LOCAL, PARTITION, SIZE, CENTROID = "cell", "x", "local", "partition", "size", "centroid"


@dataclass
class ClusterState:
    cells: np.ndarray  # [C, D] coarse cells


@dataclass
class ClusterPartitions(PartitionedWork):
    cfg: ClusterConfig
    inputs: StageInputs
    part_rows: list[int]
    dims: int
    write_per_partition = True

    def empty_output(self) -> pa.Table:
        return schema.CLUSTER.empty_table()

    @classmethod
    def create(cls, cfg: ClusterConfig, inputs: StageInputs) -> ClusterPartitions:
        parts = inputs.parts(EMBED)
        col = schema.embedding_column(cfg.embedding)
        dims = pq.read_schema(parts[0]).field(col).type.list_size if parts else 0
        work = cls(cfg, inputs, [pq.ParquetFile(p).metadata.num_rows for p in parts], dims)
        work.n_inputs = len(parts)
        per_row = 4 * max(dims, 1) * 3 + 64
        memory = cfg.task_memory_mb or int(2 * cfg.partition_rows * per_row / 2**20) + 512
        work.resources = Resources(cpus=cfg.task_cpus, memory_mb=memory)
        work.scratch_row_group_rows = scratch_row_group_rows(cfg.partition_rows, len(parts))
        return work

    def _rows(self, index: int) -> pa.Table:
        col = schema.embedding_column(self.cfg.embedding)
        rows = alive_embedded(self.inputs, index, DEDUP_STAGES, [col])
        return _with_hashes(self.inputs, index, rows)

    def prepare(self) -> ClusterState:
        total, wanted = sum(self.part_rows), self.cfg.fit_sample
        step = max(1, int(total / wanted)) if total > wanted else 1
        picked, held = [], 0
        for i in range(0, len(self.part_rows), step):
            picked.append(self._x(self._rows(i)))
            held += len(picked[-1])
            if held >= wanted:
                break
        sample = np.concatenate(picked) if picked else np.zeros((0, self.dims), np.float32)
        n_cells = max(1, min(len(sample), math.ceil(4 * total / self.cfg.partition_rows)))
        if len(sample) == 0 or n_cells == 1:
            return ClusterState(np.zeros((1, self.dims), np.float32))
        cells, _, _ = kmeans(sample, n_cells, n_iter=10, spherical=True, seed=self.cfg.hierarchy.seed)
        return ClusterState(cells)

    def _x(self, rows: pa.Table) -> np.ndarray:
        col = rows[schema.embedding_column(self.cfg.embedding)].combine_chunks()
        flat = col.flatten().to_numpy().reshape(len(col), -1) if len(col) else np.zeros((0, self.dims))
        return prepare(flat, self.cfg.hierarchy.spherical)

    def scatter(self, state: ClusterState, index: int) -> tuple[pa.Table, np.ndarray]:
        rows = self._rows(index)
        x = self._x(rows)
        cell = assign_to_centroids(x, state.cells)[0] if len(x) else np.zeros(0, np.int64)
        table = rows.select([schema.IMAGE_ID, schema.CONTENT_HASH]).append_column(CELL, pa.array(cell))
        table = table.append_column(schema.EMBED_PART, pa.array(np.full(len(cell), index, np.int32)))
        table = table.append_column(X, pack(x)).sort_by(CELL)
        return table, np.bincount(cell, minlength=len(state.cells))

    def merge(self, total: np.ndarray | None, summary: np.ndarray) -> np.ndarray:
        return summary if total is None else total + summary

    def plan(self, total: np.ndarray | None) -> tuple[list[Any], dict[str, Any]]:
        n = int(total.sum()) if total is not None else 0
        if n == 0:
            return [], {"n": 0}
        assert total is not None
        levels, steps, sizes = self.cfg.hierarchy.resolve(n, max_leaf=None)
        ranges = plan_ranges(total, self.cfg.partition_rows)
        rows = np.array([int(total[a:b].sum()) for a, b in ranges])
        ranges, rows = at_most_k_ranges(ranges, rows, levels[0])
        ks = split_k(levels[0], rows)
        partitions = [(a, b, int(k)) for (a, b), k in zip(ranges, ks, strict=True) if k > 0]
        return partitions, {"n": n, "levels": levels, "steps": steps, "sizes": sizes}

    def solve(self, state: ClusterState, figures: dict[str, Any], partition: Any, scratch: list[Location]) -> pa.Table:
        start, stop, k = partition
        with timed("read"):
            rows = read_range(scratch, CELL, start, stop)
            rows = rows.sort_by([(schema.CONTENT_HASH, "ascending"), (schema.IMAGE_ID, "ascending")])
            x = unpack(rows[X], self.dims)
            rows = rows.drop_columns([X])  # the vectors are in x now: one copy held through k-means, not two
        h = self.cfg.hierarchy
        with timed("kmeans"):
            centroids, assign, dist = fit_level(
                x,
                k,
                figures["steps"][0],
                figures["sizes"][0],
                n_iter=h.n_iter,
                spherical=h.spherical,
                seed=h.seed,
                sample=h.sample,
            )
        images = pa.table(
            {
                schema.IMAGE_ID: rows[schema.IMAGE_ID],
                schema.CONTENT_HASH: rows[schema.CONTENT_HASH],
                LOCAL: pa.array(assign.astype(np.int32)),
                schema.DISTANCE: pa.array(dist.astype(np.float32)),
                schema.EMBED_PART: rows[schema.EMBED_PART],
                CENTROID: pa.nulls(rows.num_rows, pa.list_(pa.float32())),
                SIZE: pa.nulls(rows.num_rows, pa.int64()),
            }
        )
        tops = pa.table(
            {
                schema.IMAGE_ID: pa.nulls(k, pa.string()),
                schema.CONTENT_HASH: pa.nulls(k, pa.string()),
                LOCAL: pa.array(np.arange(k, dtype=np.int32)),
                schema.DISTANCE: pa.nulls(k, pa.float32()),
                schema.EMBED_PART: pa.nulls(k, pa.int32()),
                CENTROID: pa.array(list(centroids.astype(np.float32)), pa.list_(pa.float32())),
                SIZE: pa.array(np.bincount(assign, minlength=k).astype(np.int64)),
            }
        )
        return pa.concat_tables([images, tops])

    def reduce(self, state: ClusterState, figures: dict[str, Any], solved: list[Location]) -> StageOutput:
        if not solved:
            return StageOutput(_leaves(np.zeros((0, 1), np.int32), np.zeros(0, np.int64), []), _stats([], None, 0), {})
        tops = [_centroid_rows(p) for p in solved]
        level1 = np.concatenate([t[0] for t in tops])
        sizes = np.concatenate([t[1] for t in tops])
        part = np.concatenate([np.full(len(t[1]), j, np.int32) for j, t in enumerate(tops)])
        local = np.concatenate([np.arange(len(t[1]), dtype=np.int32) for t in tops])
        levels, steps, ss = figures["levels"], figures["steps"], figures["sizes"]
        upper, parents = fit_upper_levels(level1, self.cfg.hierarchy, levels, steps, ss)
        ids = [np.arange(len(level1))]
        for parent in parents:
            ids.append(parent[ids[-1]])
        target = self.cfg.target_size
        share = shares(sizes, parents, levels, target) if target is not None else np.zeros(len(sizes), np.int64)
        leaves = _leaves(np.stack(ids, axis=1).astype(np.int32), share, [part, local])
        centroids = [level1, *upper]
        sides = {schema.centroids_file(lv): _npy(c) for lv, c in enumerate(centroids, start=1)}
        return StageOutput(leaves, _stats(centroids, sizes, int(share.sum())), dict(sides))

    def write(self, state: ClusterState, figures: Any, decisions: pa.Table, index: int, scratch: Scratch) -> pa.Table:
        rows = pq.read_table(
            scratch.solved[index],
            columns=[schema.IMAGE_ID, schema.CONTENT_HASH, LOCAL, schema.DISTANCE, schema.EMBED_PART],
        )
        rows = rows.filter(pc.is_valid(rows[schema.IMAGE_ID]))
        mine = decisions.filter(pc.equal(decisions[PARTITION], index)).sort_by(LOCAL)
        local = rows[LOCAL].to_numpy().astype(np.int64)
        levels = np.stack(mine[schema.CLUSTER_IDS].to_numpy(zero_copy_only=False)).astype(np.int32)[local]
        share = mine["share"].to_numpy()
        balanced = np.zeros(rows.num_rows, bool)
        dist = rows[schema.DISTANCE].to_numpy()
        key = dist if self.cfg.strategy == "closest" else pick_keys(rows[schema.CONTENT_HASH], self.cfg.hierarchy.seed)
        balanced[pick_by_share(local, key, share)] = True
        return pa.table(
            {
                schema.IMAGE_ID: rows[schema.IMAGE_ID],
                schema.CLUSTER_IDS: pa.FixedSizeListArray.from_arrays(pa.array(levels.ravel()), levels.shape[1]).cast(
                    pa.list_(pa.int32())
                ),
                schema.DISTANCE: rows[schema.DISTANCE],
                schema.BALANCED: pa.array(balanced),
                schema.EMBED_PART: rows[schema.EMBED_PART],
            },
            schema=schema.CLUSTER,
        )


def at_most_k_ranges(
    ranges: list[tuple[int, int]], rows: np.ndarray, k: int
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Merge neighbouring cell ranges (the lightest pair first) until at most ``k`` hold rows: every partition with
    rows fits at least one level-1 cluster, so level 1 has exactly ``k`` clusters however the cells fell. Only a
    pool whose level-1 clusters outgrow ``partition_rows`` needs it. rows: [R] images per range."""
    kept = [(r, int(n)) for r, n in zip(ranges, rows, strict=True) if n > 0]
    while len(kept) > max(1, k):
        j = int(np.argmin([kept[i][1] + kept[i + 1][1] for i in range(len(kept) - 1)]))
        (a, _), n1 = kept[j]
        (_, b), n2 = kept[j + 1]
        kept[j : j + 2] = [((a, b), n1 + n2)]
    if len(kept) == sum(1 for n in rows if n > 0):
        return ranges, np.asarray(rows)
    return [r for r, _ in kept], np.array([n for _, n in kept], np.int64)


def split_k(k: int, rows: np.ndarray) -> np.ndarray:
    """``k`` clusters split over partitions in proportion to their ``rows`` (largest remainders; each at most its
    rows, at least one where it has rows; never more than ``k`` in all when at most ``k`` partitions have rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    exact = k * rows / max(1, rows.sum())
    ks = np.minimum(np.maximum(np.floor(exact).astype(np.int64), (rows > 0).astype(np.int64)), rows)
    for j in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if ks.sum() >= k:
            break
        if ks[j] < rows[j]:
            ks[j] += 1
    while ks.sum() > k:  # the ones given to small partitions overshot: take back from the most over-served
        j = int(np.argmax(np.where(ks > 1, ks - exact, -np.inf)))
        ks[j] -= 1
    return ks


def _with_hashes(inputs: StageInputs, index: int, rows: pa.Table) -> pa.Table:
    """Add each image's content hash (from the embed work list's row group ``index``): the order and the random
    keys of clustering follow content, not where the files lie."""
    hashes = embed_listing_rows(inputs, index, rows[schema.IMAGE_ID], [schema.CONTENT_HASH])[schema.CONTENT_HASH]
    return rows.append_column(schema.CONTENT_HASH, hashes)


def _centroid_rows(path: Location) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path, columns=[schema.IMAGE_ID, LOCAL, CENTROID, SIZE])
    tops = table.filter(pc.is_null(table[schema.IMAGE_ID])).sort_by(LOCAL)
    c = tops[CENTROID].combine_chunks()
    return c.flatten().to_numpy().reshape(len(c), -1).astype(np.float32), tops[SIZE].to_numpy()


def _leaves(ids: np.ndarray, share: np.ndarray, where: list[np.ndarray]) -> pa.Table:
    """One row per level-1 cluster: where it was fitted (partition, local id), its id at every level, its share."""
    part, local = where if where else (np.zeros(0, np.int32), np.zeros(0, np.int32))
    return pa.table(
        {
            PARTITION: pa.array(part, pa.int32()),
            LOCAL: pa.array(local, pa.int32()),
            schema.CLUSTER_IDS: pa.array(list(ids), pa.list_(pa.int32())),
            "share": pa.array(share, pa.int64()),
        }
    )


def _stats(centroids: list[np.ndarray], sizes: np.ndarray | None, balanced: int) -> dict[str, Any]:
    if sizes is None or not len(sizes):
        return {"levels": [], "level1_sizes": None, "balanced": 0}
    spread = {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())}
    return {"levels": [len(c) for c in centroids], "level1_sizes": spread, "balanced": balanced}


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()
