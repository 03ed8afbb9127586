"""``dedup_relative`` partitioned: the protected set is broadcast, the pool is compared part by part.

1. prepare: the protected images (and synthetic copies of them) read and embedded (an evaluation set is small
   beside the pool), whitened with ``dedup_copy``'s whitening;
2. scatter, per embed part: the part's decoys and probes (hash-drawn samples of the pool, the same images the
   single task draws) kept as scratch;
3. plan (driver): the threshold when given or dedup_copy's; else one solve task for the recall rule;
4. solve (the recall rule): every decoy and probe read (bounded: as many decoys as protected images, ``probes``
   probes), the rule applied exactly as the single task applies it;
5. write, per embed part: one dedup row per image, naming the protected image where it is a copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.stage import PartitionedWork, Resources, Scratch, StageInputs, StageOutput
from lvdkit.core.storage import Location
from lvdkit.core.views import EMBED, alive_embedded, embed_listing_rows
from lvdkit.core.whitening import Whitener
from lvdkit.curation.dedup_relative import (
    DedupRelativeConfig,
    Protected,
    copy_threshold,
    dedup_relative,
    pool_samples,
    protected_set,
    recall_threshold,
)
from lvdkit.curation.side_sets import SideSetReader

ROLE, X = "role", "x"  # scratch columns: decoy or probe, and the whitened descriptor
THRESHOLD, RULE = "threshold", "rule"  # the solve task's one row: the threshold and the rule's figures (JSON)


@dataclass
class State:
    whitener: Whitener
    protected: Protected


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

    def prepare(self) -> State:
        whitener = Whitener.from_bytes(self.inputs.side("dedup_copy", schema.WHITENING_FILE).read_bytes())
        return State(whitener, protected_set(self.cfg, self.reader, self.inputs, whitener))

    def _pool(self, index: int) -> tuple[pa.Array, np.ndarray]:
        """The surviving images of embed part ``index``: ids, and whitened descriptors (by the caller)."""
        col = schema.embedding_column(self.cfg.embedding)
        rows = alive_embedded(self.inputs, index, ("dedup_copy",), [col])
        return rows[schema.IMAGE_ID], rows[col]

    def scatter(self, state: State, index: int) -> tuple[pa.Table, dict[str, Any]]:
        ids, col = self._pool(index)
        x = _whitened(state.whitener, col)
        keys = _content_hashes(self.inputs, index, ids)
        decoys, probes = pool_samples(keys, self.inputs, len(state.protected.ids), self.cfg.probes)
        picked = decoys | probes
        y = np.ascontiguousarray(x[picked], dtype=np.float32)
        table = pa.table(
            {
                ROLE: pa.array(np.where(decoys[picked], "decoy", "probe"), pa.string()),
                X: pa.FixedSizeListArray.from_arrays(pa.array(y.ravel()), max(y.shape[1], 1)),
            }
        )
        return table, {"n": len(ids)}

    def merge(self, total: dict[str, Any] | None, summary: dict[str, Any]) -> dict[str, Any]:
        return {"n": (total or {"n": 0})["n"] + summary["n"]}

    def plan(self, total: dict[str, Any] | None) -> tuple[list[Any], dict[str, Any]]:
        n = int((total or {"n": 0})["n"])
        threshold = self.cfg.threshold
        compared = n > 0 and bool(self.cfg.protected)
        if threshold is None and compared:
            if self.cfg.rule == "copy":
                threshold = copy_threshold(self.inputs)
            else:
                return ["recall rule"], {THRESHOLD: None, "n": n}
        return [], {THRESHOLD: threshold, "n": n}

    def solve(self, state: State, figures: Any, partition: Any, scratch: list[Location]) -> pa.Table:
        rows = pa.concat_tables([pq.read_table(p) for p in scratch])
        x = rows[X].combine_chunks()
        x = x.flatten().to_numpy().reshape(len(x), -1) if len(x) else np.zeros((0, 1), np.float32)
        decoys = pc.equal(rows[ROLE], "decoy").to_numpy(zero_copy_only=False)
        threshold, stats = recall_threshold(self.cfg, state.protected, x[decoys], x[~decoys])
        return pa.table({THRESHOLD: [threshold], RULE: [json.dumps(stats)]})

    def reduce(self, state: State, figures: dict[str, Any], solved: list[Location]) -> StageOutput:
        threshold, rule = figures[THRESHOLD], {}
        if solved:
            row = pq.read_table(solved[0]).to_pylist()[0]
            threshold, rule = row[THRESHOLD], json.loads(row[RULE])
        prot = state.protected
        sides = {schema.PROTECTED_FILE: prot.rows} if prot.rows is not None else {}
        stats = {
            "protected": len(prot.ids),
            "protected_unusable": prot.unusable,
            "score": self.cfg.scored_by(),
            "threshold": threshold,
            **rule,
        }
        return StageOutput(pa.table({THRESHOLD: pa.array([threshold], pa.float64())}), stats, dict(sides))

    def write(self, state: State, figures: Any, decisions: pa.Table, index: int, scratch: Scratch) -> pa.Table:
        ids, col = self._pool(index)
        prot = state.protected
        threshold = decisions[THRESHOLD][0].as_py()
        x = _whitened(state.whitener, col)
        return dedup_relative(ids, x, prot.ids, prot.x, threshold, prot.groups, self.cfg.scored_by())

    def final_stats(self, stats: dict[str, Any], parts: list[Location]) -> dict[str, Any]:
        removed = sum(_removed(p) for p in parts)
        n = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        return {"in": n, "kept": n - removed, "duplicates": removed, **stats}


def _content_hashes(inputs: StageInputs, index: int, ids: pa.Array | pa.ChunkedArray) -> list[str]:
    """The content hash of each image ``ids`` of embed part ``index`` (from embed's work list, the part's row group)."""
    return embed_listing_rows(inputs, index, ids, [schema.CONTENT_HASH])[schema.CONTENT_HASH].to_pylist()


def _whitened(whitener: Whitener, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    c = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not len(c):
        return np.zeros((0, 1), np.float32)
    return whitener(c.flatten().to_numpy().reshape(len(c), -1))


def _removed(part: Location) -> int:
    keep = pq.read_table(part, columns=[schema.KEEP])[schema.KEEP]
    return int(pc.sum(pc.invert(keep)).as_py() or 0)
