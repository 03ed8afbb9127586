"""``dedup_relative`` partitioned: the protected set is broadcast, the pool is compared part by part.

1. prepare: the protected images read and embedded (an evaluation set is small beside the pool), whitened with
   ``dedup_copy``'s whitening;
2. scatter, per embed part: each surviving image's best protected match (exact, Faiss flat) kept as scratch; a
   65,536-bin histogram of those similarities; the synthetic copies' similarity to their sources;
3. plan (driver): the threshold, as the single task sets it: given, dedup_copy's, or the recall rule (the budget's
   quantile read from the merged histogram: the same removals except images within 3e-5 of it);
4. write, per embed part: one dedup row per image, naming the protected image where it is a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.partitions import top_against
from lvdkit.core.stage import PartitionedWork, Resources, Scratch, StageInputs, StageOutput
from lvdkit.core.storage import Location
from lvdkit.core.views import EMBED, alive_embedded
from lvdkit.core.whitening import Whitener
from lvdkit.curation.dedup_relative import DedupRelativeConfig, copy_threshold, dedup_relative, recall_within_budget
from lvdkit.curation.side_sets import SideSetReader

BINS = 65_536  # histogram of best similarities over [-1, 1]
BEST = "best"


@dataclass
class Protected:
    whitener: Whitener
    ids: list[str]
    x: np.ndarray  # [P, D] whitened
    rows: pa.Table | None  # the protected images as ingested (side file)
    unusable: int


@dataclass
class RelativePartitions(PartitionedWork):
    cfg: DedupRelativeConfig
    reader: SideSetReader
    inputs: StageInputs

    def empty_output(self) -> pa.Table:
        return schema.DEDUP.empty_table()

    @classmethod
    def create(cls, cfg: DedupRelativeConfig, reader: SideSetReader, inputs: StageInputs) -> RelativePartitions:
        work = cls(cfg, reader, inputs)
        work.n_inputs = len(inputs.parts(EMBED))
        work.resources = Resources(cpus=1.0, memory_mb=2048)
        return work

    def prepare(self) -> Protected:
        whitener = Whitener.from_bytes(self.inputs.side("dedup_copy", schema.WHITENING_FILE).read_bytes())
        if not self.cfg.protected:
            return Protected(whitener, [], np.zeros((0, 1), np.float32), None, 0)
        protected = self.reader.read(self.cfg.embedding, self.cfg.protected)
        ids = protected.ok[schema.IMAGE_ID].to_pylist()
        return Protected(whitener, ids, whitener(protected.x), protected.rows, protected.rows.num_rows - len(ids))

    def _pool(self, index: int) -> tuple[pa.Array, np.ndarray]:
        """The surviving images of embed part ``index``: ids, and whitened descriptors (by the caller)."""
        col = schema.embedding_column(self.cfg.embedding)
        rows = alive_embedded(self.inputs, index, ("dedup_copy",), [col])
        return rows[schema.IMAGE_ID], rows[col]

    def scatter(self, state: Protected, index: int) -> tuple[pa.Table, dict[str, Any]]:
        _, col = self._pool(index)
        x = _whitened(state.whitener, col)
        best = np.full(len(x), -1.0, np.float32)
        if len(state.ids) and len(x):
            best = top_against(x, state.x, np.arange(len(state.ids), dtype=np.int64), 1)[0][:, 0]
        hist = np.histogram(best, bins=BINS, range=(-1.0, 1.0))[0]
        summary = {"hist": hist, "positives": self._positives(state, index)}
        return pa.table({BEST: pa.array(best)}).slice(0, 0), summary  # nothing to keep: write compares again

    def _positives(self, state: Protected, index: int) -> np.ndarray:
        """Similarity of each synthetic copy of this part's images to its source (both whitened)."""
        col = schema.embedding_column(self.cfg.embedding)
        path = self.inputs.folder(EMBED, schema.CALIBRATION) / self.inputs.parts(EMBED)[index].name
        if not path.exists():
            return np.empty(0, np.float32)
        copies = pq.read_table(path, columns=[schema.IMAGE_ID, col])
        sources = pq.read_table(self.inputs.parts(EMBED)[index], columns=[schema.IMAGE_ID, col])
        at = pc.index_in(copies[schema.IMAGE_ID], value_set=sources[schema.IMAGE_ID])
        found = pc.is_valid(at).to_numpy(zero_copy_only=False)
        if not found.any():
            return np.empty(0, np.float32)
        y = _whitened(state.whitener, copies[col])[found]
        z = _whitened(state.whitener, sources[col].take(pc.drop_null(at)))
        return np.sum(y * z, axis=1).astype(np.float32)

    def merge(self, total: dict[str, Any] | None, summary: dict[str, Any]) -> dict[str, Any]:
        if total is None:
            return {"hist": summary["hist"].astype(np.int64), "positives": [summary["positives"]]}
        total["hist"] += summary["hist"]
        total["positives"].append(summary["positives"])
        return total

    def plan(self, total: dict[str, Any] | None) -> tuple[list[Any], dict[str, Any]]:
        hist = total["hist"] if total is not None else np.zeros(BINS, np.int64)
        n = int(hist.sum())
        threshold, rule_stats = self.cfg.threshold, dict[str, object]()
        compared = n > 0 and bool(self.cfg.protected)
        if threshold is None and compared:
            if self.cfg.rule == "copy":
                threshold = copy_threshold(self.inputs)
            else:
                positives = np.concatenate(total["positives"]) if total is not None else np.empty(0)
                budget = histogram_quantile(hist, 1.0 - self.cfg.max_removed)
                threshold, rule_stats = recall_within_budget(positives, budget, self.cfg.target_recall)
        return [], {"threshold": threshold, "n": n, "rule": rule_stats}

    def solve(self, state: Protected, figures: Any, partition: Any, scratch: list[Location]) -> pa.Table:
        raise NotImplementedError("dedup_relative has no partitions: every image is compared in its own part")

    def reduce(self, state: Protected, figures: dict[str, Any], solved: list[Location]) -> StageOutput:
        sides = {schema.PROTECTED_FILE: state.rows} if state.rows is not None else {}
        stats = {"protected": len(state.ids), "protected_unusable": state.unusable, "threshold": figures["threshold"]}
        return StageOutput(schema.DEDUP.empty_table(), {**stats, **figures["rule"]}, dict(sides))

    def write(self, state: Protected, figures: Any, decisions: pa.Table, index: int, scratch: Scratch) -> pa.Table:
        ids, col = self._pool(index)
        return dedup_relative(ids, _whitened(state.whitener, col), state.ids, state.x, figures["threshold"])

    def final_stats(self, stats: dict[str, Any], parts: list[Location]) -> dict[str, Any]:
        removed = sum(_removed(p) for p in parts)
        n = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        return {"in": n, "kept": n - removed, "duplicates": removed, **stats}


def histogram_quantile(hist: np.ndarray, q: float) -> float:
    """A threshold standing for the ``q`` quantile of the values counted in ``hist`` (equal bins over [-1, 1]): the
    upper edge of the bin holding the order statistic below it. ``value > threshold`` then selects what the exact
    quantile selects, except values within that one bin (2 / bins wide) of it."""
    n = int(hist.sum())
    if n == 0:
        return -1.0
    below = int(np.floor(q * (n - 1)))  # numpy's linear quantile lies between this order statistic and the next
    b = int(np.searchsorted(np.cumsum(hist), below, side="right"))
    return float(-1.0 + 2.0 * (b + 1) / len(hist))


def _whitened(whitener: Whitener, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    c = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not len(c):
        return np.zeros((0, 1), np.float32)
    return whitener(c.flatten().to_numpy().reshape(len(c), -1))


def _removed(part: Location) -> int:
    keep = pq.read_table(part, columns=[schema.KEEP])[schema.KEEP]
    return int(pc.sum(pc.invert(keep)).as_py() or 0)
