"""``dedup_copy`` partitioned: the same decisions as :func:`lvdkit.curation.dedup_copy.dedup_copy`, with no task
holding the pool.

1. prepare: whitening and ``C`` k-means cells fitted on a sample read from evenly spread embed parts; a sample of
   calibration queries (the whole pool when it is small);
2. scatter, per embed part: descriptors whitened and assigned to their ``cell_copies`` nearest cells (a scratch table
   sorted by cell); per-cell counts; the calibration queries' nearest rows in this part (an exact k-NN of the queries
   over the whole pool, merged in the driver); the synthetic copies' similarity to their sources;
3. plan (driver): the threshold calibrated from those figures (a bounded sample, not the pool), consecutive cells
   grouped into partitions of at most ``partition_rows`` rows;
4. solve, per partition: exact k-NN among its rows (Faiss flat), pairs above the threshold;
5. reduce: the pairs (their number grows with the copies, not with the pool) grouped with the same star rule;
6. write, per embed part: one dedup row per image.

With one cell (a small pool) this is an exact k-NN and the decisions equal the single-task path's; with more cells a
pair is found when its two images share one of their nearest cells (recall measured in ``bench/scale_curation.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.packed import pack, unpack
from lvdkit.core.partitions import assign_cells, fit_cells, merge_top, pairs_within, plan_ranges, row_keys, top_against
from lvdkit.core.scratch_read import read_range
from lvdkit.core.stage import PartitionedWork, Resources, Scratch, StageInputs, StageOutput, scratch_row_group_rows
from lvdkit.core.storage import Location
from lvdkit.core.timing import timed
from lvdkit.core.views import EMBED, embed_listing_rows
from lvdkit.core.whitening import Whitener, fit_whitener
from lvdkit.curation.components import NODE_COLUMNS, dedup_rows, found_pairs, group_found
from lvdkit.curation.dedup_copy import (
    Calibration,
    DedupCopyConfig,
    calibrate,
    calibration_warnings,
    tail_gate,
    whitening_mode,
)

CELL, KEY, X = "cell", "key", "x"  # scratch columns: a row's cell, its global key, its whitened descriptor


@dataclass
class CopyState:
    """What prepare fitted: handed to every later task."""

    whitener: Whitener
    whitening: str
    whitening_why: str
    centroids: np.ndarray  # [C, D_out]
    queries: np.ndarray  # [Q, D_out] calibration queries, whitened
    query_keys: np.ndarray  # [Q] their global row keys
    rows: int  # images in the pool


@dataclass
class CopyTotals:
    """Scatter summaries merged: bounded by the number of cells and of calibration queries."""

    counts: np.ndarray  # [C] rows per cell
    top: tuple[np.ndarray, np.ndarray]  # queries' nearest rows: sims, keys [Q, negative_rank + 1]
    positives: list[np.ndarray] = field(default_factory=list)  # synthetic copies' similarity to their sources
    edits: list[np.ndarray] = field(default_factory=list)  # ... and their edit families


@dataclass
class CopyFigures:
    threshold: float | None  # None: nothing to compare (disabled, or fewer than two images)
    calibration: Calibration | None


@dataclass
class CopyPartitions(PartitionedWork):
    """The partitioned dedup_copy over ``inputs`` (see the module docstring)."""

    cfg: DedupCopyConfig
    inputs: StageInputs
    part_rows: list[int]  # rows of each embed part (from the Parquet footers)
    dims: int  # descriptor dimension
    per_task: int = 1  # partitions one solve task reads at once (:func:`solve_group`)

    def empty_output(self) -> pa.Table:
        return schema.DEDUP.empty_table()

    @classmethod
    def create(cls, cfg: DedupCopyConfig, inputs: StageInputs) -> CopyPartitions:
        parts = inputs.parts(EMBED)
        rows = [pq.ParquetFile(p).metadata.num_rows for p in parts]
        col = schema.embedding_column(cfg.embedding)
        dims = pq.read_schema(parts[0]).field(col).type.list_size if parts else 0
        work = cls(cfg=cfg, inputs=inputs, part_rows=rows, dims=dims, per_task=solve_group(cfg, sum(rows)))
        work.n_inputs = len(parts)
        work.resources = Resources(cpus=cfg.task_cpus, memory_mb=cfg.task_memory_mb or work.memory_estimate_mb())
        # a solve task's share of one scatter table: its rows in every table, spread over the tables
        work.scratch_row_group_rows = scratch_row_group_rows(cfg.partition_rows * work.per_task, len(parts))
        return work

    def memory_estimate_mb(self) -> int:
        """A solve task's working set: the rows of its partitions as read, then one partition at a time (its rows
        deduplicated and indexed: two more copies) and its k-NN results, plus the state; doubled for Arrow and Faiss
        overheads."""
        d = min(self.dims, self.cfg.whiten_dims) if self.cfg.whiten == "pca" else self.dims
        read = self.per_task * self.cfg.partition_rows * (4 * max(d, 1) + 64)
        per_row = 2 * 4 * max(d, 1) + 12 * (self.cfg.k + 1)
        state = 4 * max(d, 1) * (self.cfg.calibration_queries + self.cfg.whiten_sample)
        return int(2 * (read + self.cfg.partition_rows * per_row + state) / 2**20) + 256

    # --- 1. prepare ---------------------------------------------------------------------------------------------

    def prepare(self) -> CopyState:
        cfg, total = self.cfg, sum(self.part_rows)
        picked = _spread(self.part_rows, cfg.whiten_sample)
        raw = np.concatenate([self._descriptors(i) for i in picked]) if picked else np.zeros((0, self.dims), np.float32)
        keys = np.concatenate([row_keys(i, self.part_rows[i]) for i in picked]) if picked else np.zeros(0, np.int64)
        rng = np.random.default_rng(cfg.seed)
        take = np.sort(rng.choice(len(raw), size=min(len(raw), cfg.whiten_sample), replace=False))
        mode, why = whitening_mode(cfg, len(take))
        whitener = fit_whitener(raw[take], mode, cfg.whiten_dims)
        x = whitener(raw[take])
        q = np.sort(rng.choice(len(x), size=min(len(x), cfg.calibration_queries), replace=False))
        n_cells = max(1, math.ceil(total * cfg.cell_copies / cfg.cell_rows))
        centroids = fit_cells(x, n_cells, cfg.seed) if len(x) else np.zeros((1, x.shape[1]), np.float32)
        return CopyState(whitener, mode, why, centroids, x[q], keys[take][q], total)

    def _descriptors(self, index: int) -> np.ndarray:
        col = schema.embedding_column(self.cfg.embedding)
        table = pq.read_table(self.inputs.parts(EMBED)[index], columns=[col])
        return _matrix(table[col])

    # --- 2. scatter ----------------------------------------------------------------------------------------------

    def scatter(self, state: CopyState, index: int) -> tuple[pa.Table, dict[str, Any]]:
        cfg = self.cfg
        col = schema.embedding_column(cfg.embedding)
        with timed("read"):
            part = pq.read_table(self.inputs.parts(EMBED)[index], columns=[schema.IMAGE_ID, col])
            nodes = _nodes(self.inputs, index, part[schema.IMAGE_ID])
        with timed("assign"):
            x = state.whitener(_matrix(part[col]))
            keys = row_keys(index, part.num_rows)
            cells = assign_cells(x, state.centroids, cfg.cell_copies)  # [n, m]
            counts = np.bincount(cells.ravel(), minlength=len(state.centroids))
        with timed("queries"):
            sims, near = top_against(state.queries, x, keys, cfg.negative_rank + 1)
            itself = near == state.query_keys[:, None]
            top = (np.where(itself, -np.inf, sims).astype(np.float32), np.where(itself, -1, near))
        with timed("table"):
            m = cells.shape[1]
            rows = np.repeat(np.arange(part.num_rows), m)
            table = nodes.take(pa.array(rows)).append_column(KEY, pa.array(keys[rows]))
            table = table.append_column(CELL, pa.array(cells.ravel().astype(np.int32)))
            table = table.append_column(X, pack(x[rows])).sort_by(CELL)
        positives, edits = self._positives(state, index, part, x)
        summary = {"counts": counts, "top": top, "positives": positives, "edits": edits}
        return table, summary

    def _positives(self, state: CopyState, index: int, part: pa.Table, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Similarity of each synthetic copy made from this part's images to its source, and the copy's edit."""
        name = self.inputs.parts(EMBED)[index].name
        path = self.inputs.folder(EMBED, schema.CALIBRATION) / name
        if not path.exists():
            return np.empty(0, np.float32), np.empty(0, object)
        col = schema.embedding_column(self.cfg.embedding)
        copies = pq.read_table(path, columns=[schema.IMAGE_ID, schema.EDIT, col])
        at = pc.index_in(copies[schema.IMAGE_ID], value_set=part[schema.IMAGE_ID]).to_numpy(zero_copy_only=False)
        found = ~np.isnan(at.astype(np.float64))
        y = state.whitener(_matrix(copies[col]))[found]
        edits = copies[schema.EDIT].to_numpy(zero_copy_only=False)[found]
        return np.sum(y * x[at[found].astype(np.int64)], axis=1).astype(np.float32), edits

    def merge(self, total: CopyTotals | None, summary: dict[str, Any]) -> CopyTotals:
        if total is None:
            return CopyTotals(summary["counts"], summary["top"], [summary["positives"]], [summary["edits"]])
        total.counts = total.counts + summary["counts"]
        total.top = merge_top(total.top, summary["top"])
        total.positives.append(summary["positives"])
        total.edits.append(summary["edits"])
        return total

    # --- 3. plan ---------------------------------------------------------------------------------------------------

    def plan(self, total: CopyTotals | None) -> tuple[list[Any], CopyFigures]:
        cfg = self.cfg
        n = sum(self.part_rows)
        if not cfg.enabled or n < 2 or total is None:
            return [], CopyFigures(None, None)
        threshold, cal = cfg.threshold, None
        if threshold is None:
            cal = self._calibrate(total)
            threshold = cal.threshold
        ranges = plan_ranges(total.counts, cfg.partition_rows)
        groups = [ranges[i : i + self.per_task] for i in range(0, len(ranges), self.per_task)]
        return groups, CopyFigures(float(threshold), cal)

    def _calibrate(self, total: CopyTotals) -> Calibration:
        """As the single-task path, from the calibration queries' exact neighbours over the whole pool."""
        ranked = total.top[0]  # [Q, rank + 1] best first, the query itself masked out (-inf) in scatter
        pos = np.concatenate(total.positives) if total.positives else np.empty(0, np.float32)
        edits = np.concatenate(total.edits) if total.edits else np.empty(0, object)
        cfg = self.cfg
        neg, best = ranked[:, cfg.negative_rank - 1], ranked[:, 0]
        return calibrate(pos, neg, best, cfg.target_precision, cfg.min_threshold, edits, *tail_gate(cfg))

    # --- 4. solve --------------------------------------------------------------------------------------------------

    def solve(self, state: CopyState, figures: CopyFigures, partition: Any, scratch: list[Location]) -> pa.Table:
        """``partition``: consecutive cell ranges ``[(start, stop), ...]``, read at once and solved one by one."""
        with timed("read"):
            read = read_range(scratch, CELL, partition[0][0], partition[-1][1])
            cells = read[CELL].to_numpy()
        found = [self._solve_range(read, cells, start, stop, figures) for start, stop in partition]
        return pa.concat_tables(found)

    def _solve_range(self, read: pa.Table, cells: np.ndarray, start: int, stop: int, figures: CopyFigures) -> pa.Table:
        with timed("read"):
            rows = read.filter(pa.array((cells >= start) & (cells < stop)))
            _, first = np.unique(rows[KEY].to_numpy(), return_index=True)  # a row whose two cells are both here
            rows = rows.take(pa.array(np.sort(first)))
        assert figures.threshold is not None
        with timed("knn"):
            pairs, sims = pairs_within(unpack(rows[X]), self.cfg.k, figures.threshold)
        a, b = rows.take(pa.array(pairs[:, 0])), rows.take(pa.array(pairs[:, 1]))
        return found_pairs(a, b, a[KEY], b[KEY], 1.0 - sims)

    # --- 5. reduce -------------------------------------------------------------------------------------------------

    def reduce(self, state: CopyState, figures: CopyFigures, solved: list[Location]) -> StageOutput:
        found = pa.concat_tables([pq.read_table(p) for p in solved]) if solved else None
        decisions, stats = group_found(found, state.rows)
        stats.update(
            threshold=figures.threshold,
            whitening=state.whitening,
            whitening_why=state.whitening_why,
            index="partitioned",
            cells=len(state.centroids),
            calibration_queries=len(state.queries),
        )
        if figures.calibration is not None:
            stats["calibration"] = asdict(figures.calibration)
            stats["warnings"] = calibration_warnings(figures.calibration, state.rows, state.whitening, self.cfg)
        sides = {
            schema.WHITENING_FILE: state.whitener.to_bytes(),
            schema.THRESHOLD_FILE: {"threshold": figures.threshold},
        }
        return StageOutput(decisions, stats, sides)

    # --- 6. write --------------------------------------------------------------------------------------------------

    def write(self, state: CopyState, figures: Any, decisions: pa.Table, index: int, scratch: Scratch) -> pa.Table:
        ids = pq.read_table(self.inputs.parts(EMBED)[index], columns=[schema.IMAGE_ID])[schema.IMAGE_ID]
        return dedup_rows(ids, decisions)


def solve_group(cfg: DedupCopyConfig, rows: int) -> int:
    """Partitions per solve task: ``solve_partitions``, fewer when the pool's estimated partitions
    (rows x cell_copies / partition_rows) would then make fewer than ``solve_tasks_min`` tasks. Fixed by the
    config and the pool's size, so an interrupted run's solved groups are the same groups again."""
    partitions = math.ceil(rows * cfg.cell_copies / cfg.partition_rows)
    return max(1, min(cfg.solve_partitions, partitions // cfg.solve_tasks_min))


def _spread(part_rows: list[int], wanted: int) -> list[int]:
    """Parts spread evenly over the pool holding at least ``wanted`` rows (all parts when the pool is smaller)."""
    total = sum(part_rows)
    if total <= wanted:
        return [i for i, n in enumerate(part_rows) if n]
    step = max(1, int(total / wanted))
    picked, held = [], 0
    for i in range(0, len(part_rows), step):
        picked.append(i)
        held += part_rows[i]
        if held >= wanted:
            break
    return [i for i in picked if part_rows[i]]


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column as a [N, D] float32 array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, arr.type.list_size), np.float32)
    return arr.flatten().to_numpy().reshape(len(arr), -1).astype(np.float32, copy=False)


def _nodes(inputs: StageInputs, index: int, ids: pa.ChunkedArray) -> pa.Table:
    """What ranks the images of embed part ``index`` for keeping (size, content hash, id), in the order of ``ids``:
    from the embed work list, whose row group ``index`` holds that part's images."""
    return embed_listing_rows(inputs, index, ids, NODE_COLUMNS)
