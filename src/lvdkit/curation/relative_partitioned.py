"""``dedup_relative`` partitioned: the protected set is broadcast, the pool is compared part by part.

1. prepare: the protected images (and synthetic copies of them) read and embedded (an evaluation set is small
   beside the pool), whitened with ``dedup_copy``'s whitening;
2. scatter, per embed part: the part's decoys, probes and background images (hash-drawn samples of the pool, the
   same images the single task draws) kept as scratch;
3. plan (driver): the threshold when given or dedup_copy's; one solve task for the recall rule or the background
   set, where either is needed;
4. solve: every decoy, probe and background image read, with the decoy draws each is in (bounded: ``decoy_draws``
   x as many decoys as protected images, ``probes`` probes, ``background`` background images), the rule applied
   exactly as the single task applies it; its table
   (the threshold's row and the background set's) is the decisions every write receives;
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
from lvdkit.core.packed import pack, unpack
from lvdkit.core.stage import PartitionedWork, Resources, Scratch, StageInputs, StageOutput
from lvdkit.core.storage import Location
from lvdkit.core.views import EMBED, alive_embedded, embed_listing_rows
from lvdkit.core.whitening import Whitener
from lvdkit.curation.dedup_relative import (
    DedupRelativeConfig,
    Protected,
    RuleSample,
    background_of,
    background_stats,
    copy_threshold,
    dedup_relative,
    pool_samples,
    protected_set,
    recall_threshold,
)
from lvdkit.curation.side_sets import SideSetReader

# scratch columns: decoy, probe or background; the decoy draws the image is in (bit k: draw k); the whitened descriptor
ROLE, DRAWS, X = "role", "draws", "x"
# the solve's table: one "threshold" row (the threshold, the rule's figures as JSON), then the background set
THRESHOLD, RULE = "threshold", "rule"
DECOY, PROBE, BACKGROUND = "decoy", "probe", "background"


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
        samples = pool_samples(keys, self.inputs, len(state.protected.ids), self.cfg)
        roles = ((DECOY, samples.any_decoy()), (PROBE, samples.probes), (BACKGROUND, samples.background))
        tables = [_rows(role, x[mask]).append_column(DRAWS, pa.array(samples.draws(mask))) for role, mask in roles]
        return pa.concat_tables(tables), {"n": len(ids)}

    def merge(self, total: dict[str, Any] | None, summary: dict[str, Any]) -> dict[str, Any]:
        return {"n": (total or {"n": 0})["n"] + summary["n"]}

    def plan(self, total: dict[str, Any] | None) -> tuple[list[Any], dict[str, Any]]:
        n = int((total or {"n": 0})["n"])
        threshold = self.cfg.threshold
        compared = n > 0 and bool(self.cfg.protected)
        if threshold is None and compared and self.cfg.rule == "copy":
            threshold = copy_threshold(self.inputs)
        needed = compared and (threshold is None or self.cfg.uses_background())
        return (["rule and background"] if needed else []), {THRESHOLD: threshold, "n": n}

    def solve(self, state: State, figures: Any, partition: Any, scratch: list[Location]) -> pa.Table:
        rows = pa.concat_tables([pq.read_table(p) for p in scratch])
        x = unpack(rows[X], state.whitener.dim)
        draws = rows[DRAWS].to_numpy()
        role = {r: pc.equal(rows[ROLE], r).to_numpy(zero_copy_only=False) for r in (DECOY, PROBE, BACKGROUND)}
        sample = RuleSample(*(a for r in (DECOY, PROBE, BACKGROUND) for a in (x[role[r]], draws[role[r]])))
        threshold, stats = figures[THRESHOLD], dict[str, object]()
        if threshold is None:
            threshold, stats = recall_threshold(self.cfg, state.protected, sample)
        return _decisions(threshold, stats, sample.background[sample.not_in(sample.background_draws, 0)])

    def reduce(self, state: State, figures: dict[str, Any], solved: list[Location]) -> StageOutput:
        if solved:
            decisions = pq.read_table(solved[0])
        else:
            decisions = _decisions(figures[THRESHOLD], {}, np.zeros((0, state.whitener.dim), np.float32))
        threshold, rule, background = _decided(decisions)
        prot = state.protected
        sides = {schema.PROTECTED_FILE: prot.rows} if prot.rows is not None else {}
        stats = {
            "protected": len(prot.ids),
            "protected_unusable": prot.unusable,
            "score": self.cfg.scored_by(),
            "threshold": threshold,
            **background_stats(self.cfg, len(background)),
            **rule,
        }
        return StageOutput(decisions, stats, dict(sides))

    def write(self, state: State, figures: Any, decisions: pa.Table, index: int, scratch: Scratch) -> pa.Table:
        ids, col = self._pool(index)
        prot = state.protected
        threshold, _, background = _decided(decisions)
        x = _whitened(state.whitener, col)
        near = background_of(self.cfg, prot, x, background)
        return dedup_relative(
            ids, x, prot.ids, prot.x, threshold, prot.groups, self.cfg.scored_by(), near, self.cfg.background_weight
        )

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
        return np.zeros((0, whitener.dim), np.float32)
    return whitener(c.flatten().to_numpy().reshape(len(c), -1))


def _rows(role: str, y: np.ndarray) -> pa.Table:
    """Scratch rows: ``role`` and the descriptors y [N, D] (packed)."""
    return pa.table({ROLE: pa.array([role] * len(y), pa.string()), X: pack(y)})


def _decisions(threshold: float | None, rule: dict[str, Any], background: np.ndarray) -> pa.Table:
    """What every write receives: the threshold's row (threshold, the rule's figures), then the background set."""
    blank = np.zeros((1, max(background.shape[1], 1)), np.float32)  # as wide as pack makes an empty pool's
    rows = pa.concat_tables([_rows(THRESHOLD, blank), _rows(BACKGROUND, background)])
    filler = [None] * len(background)
    rows = rows.append_column(THRESHOLD, pa.array([threshold, *filler], pa.float64()))
    return rows.append_column(RULE, pa.array([json.dumps(rule), *filler], pa.string()))


def _decided(decisions: pa.Table) -> tuple[float | None, dict[str, Any], np.ndarray]:
    """(threshold, the rule's figures, the background set [B, D]) from :func:`_decisions`' table."""
    x = unpack(decisions[X])
    return decisions[THRESHOLD][0].as_py(), json.loads(decisions[RULE][0].as_py()), x[1:]


def _removed(part: Location) -> int:
    keep = pq.read_table(part, columns=[schema.KEEP])[schema.KEEP]
    return int(pc.sum(pc.invert(keep)).as_py() or 0)
