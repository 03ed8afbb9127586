"""``dedup_exact`` and ``dedup_phash`` partitioned by hash: the same decisions as their single-task paths, with no
task holding the pool.

- exact: each usable image goes to the bucket of its content hash; a bucket holds every copy of its bytes, so
  grouping inside a bucket is the whole answer.
- PHash (``max_distance`` d <= 3): the 64 bits are cut into d + 1 bands; two hashes within d bits agree exactly on at
  least one band (pigeonhole), so each image goes to the buckets of its d + 1 (band, value) keys and every pair
  within d meets in some bucket, where it is checked exactly (Faiss multi-index hashing). Pairs found twice are
  merged; groups are formed by the same star rule, ranked by the same priority, as the single task.

Scatter, solve, reduce and write are :class:`~lvdkit.core.stage.PartitionedWork` steps; output part ``i`` holds the
rows of ingest part ``i`` (later per-part tasks read it alone: :func:`lvdkit.core.views.alive_in_part`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.partitions import plan_ranges, row_keys
from lvdkit.core.scratch_read import read_range
from lvdkit.core.stage import PartitionedWork, Resources, Scratch, StageInputs, StageOutput
from lvdkit.core.storage import Location
from lvdkit.core.views import INGEST, alive_in_part, dedups_before
from lvdkit.curation.components import NODE_COLUMNS, dedup_rows, found_pairs, group_found
from lvdkit.curation.dedup_exact import DedupExactConfig, dedup_exact
from lvdkit.curation.dedup_phash import DedupPhashConfig, confirmed, dhashes_of, hamming_pairs

BUCKET, KEY = "bucket", "key"
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads band values over buckets


@dataclass
class _HashWork(PartitionedWork):
    """What both share: ingest parts in, hash buckets grouped into partitions of ``partition_rows``."""

    inputs: StageInputs
    stage: str
    partition_rows: int
    buckets: int

    def empty_output(self) -> pa.Table:
        return schema.DEDUP.empty_table()

    @classmethod
    def _sized(cls, inputs: StageInputs, stage: str, partition_rows: int, copies: int, **kw: Any) -> Any:
        rows = int(inputs.record(INGEST).get("rows") or 0) * copies
        work = cls(
            inputs=inputs, stage=stage, partition_rows=partition_rows, buckets=_buckets(rows, partition_rows), **kw
        )
        work.n_inputs = len(inputs.parts(INGEST))
        work.resources = Resources(cpus=1.0, memory_mb=int(partition_rows * 400 / 2**20) + 512)
        return work

    def prepare(self) -> None:
        return None

    def merge(self, total: dict[str, Any] | None, summary: dict[str, Any]) -> dict[str, Any]:
        if total is None:
            return dict(summary)
        return {
            "counts": total["counts"] + summary["counts"],
            "rows": total["rows"] + summary["rows"],
            "unhashed": total["unhashed"] + summary["unhashed"],
        }

    def plan(self, total: dict[str, Any] | None) -> tuple[list[Any], dict[str, Any]]:
        if total is None:
            return [], {"rows": 0, "unhashed": 0}
        figures = {"rows": int(total["rows"]), "unhashed": int(total["unhashed"])}
        return list(plan_ranges(total["counts"], self.partition_rows)), figures

    def rows_of(self, scratch: list[Location], partition: tuple[int, int]) -> pa.Table:
        start, stop = partition
        return read_range(scratch, BUCKET, start, stop)

    def write(self, state: Any, figures: Any, decisions: pa.Table, index: int, scratch: Scratch) -> pa.Table:
        ids = alive_in_part(self.inputs, index, dedups_before(self.stage), [])[schema.IMAGE_ID]
        return dedup_rows(ids, decisions)

    def summary(self, counts: np.ndarray, rows: int, unhashed: int = 0) -> dict[str, Any]:
        return {"counts": counts, "rows": rows, "unhashed": unhashed}


@dataclass
class ExactPartitions(_HashWork):
    """dedup_exact by content-hash buckets."""

    cfg: DedupExactConfig = field(default_factory=DedupExactConfig)

    @classmethod
    def create(cls, cfg: DedupExactConfig, inputs: StageInputs) -> ExactPartitions:
        return cls._sized(inputs, "dedup_exact", cfg.partition_rows, 1, cfg=cfg)  # type: ignore[no-any-return]

    def scatter(self, state: None, index: int) -> tuple[pa.Table, dict[str, Any]]:
        rows = alive_in_part(self.inputs, index, (), [schema.URI, schema.CONTENT_HASH])
        hashes = rows[schema.CONTENT_HASH].to_numpy(zero_copy_only=False).astype(str)
        bucket = np.array([int(h[:15] or "0", 16) % self.buckets for h in hashes], dtype=np.int64)
        table = rows.append_column(BUCKET, pa.array(bucket)).sort_by(BUCKET)
        return table, self.summary(np.bincount(bucket, minlength=self.buckets), rows.num_rows)

    def solve(self, state: None, figures: Any, partition: Any, scratch: list[Location]) -> pa.Table:
        rows = self.rows_of(scratch, partition).drop_columns([BUCKET])
        table = dedup_exact(rows, self.cfg)
        return table.filter(pc.invert(table[schema.KEEP]))  # every copy of its bytes is in this partition

    def reduce(self, state: None, figures: dict[str, Any], solved: list[Location]) -> StageOutput:
        tables = [pq.read_table(p, schema=schema.DEDUP) for p in solved]
        decisions = pa.concat_tables(tables) if tables else schema.DEDUP.empty_table()
        n = figures["rows"]
        return StageOutput(decisions, {"in": n, "kept": n - decisions.num_rows, "duplicates": decisions.num_rows})


@dataclass
class PhashPartitions(_HashWork):
    """dedup_phash by (band, band value) buckets."""

    cfg: DedupPhashConfig = field(default_factory=DedupPhashConfig)

    @classmethod
    def create(cls, cfg: DedupPhashConfig, inputs: StageInputs) -> PhashPartitions:
        copies = cfg.max_distance + 1
        return cls._sized(inputs, "dedup_phash", cfg.partition_rows, copies, cfg=cfg)  # type: ignore[no-any-return]

    def scatter(self, state: None, index: int) -> tuple[pa.Table, dict[str, Any]]:
        columns = [schema.PHASH, schema.DHASH, *NODE_COLUMNS[1:]]
        rows = alive_in_part(self.inputs, index, dedups_before("dedup_phash"), columns)
        keys = row_keys(index, rows.num_rows)
        hashed = pc.is_valid(rows[schema.PHASH]).to_numpy(zero_copy_only=False)
        rows = rows.append_column(KEY, pa.array(keys)).filter(pa.array(hashed))
        hashes = rows[schema.PHASH].to_numpy(zero_copy_only=False).astype(np.uint64)
        buckets = band_buckets(hashes, self.cfg.max_distance, self.buckets)  # [n, bands]
        table = rows.take(pa.array(np.repeat(np.arange(rows.num_rows), buckets.shape[1])))
        table = table.append_column(BUCKET, pa.array(buckets.ravel())).sort_by(BUCKET)
        counts = np.bincount(buckets.ravel(), minlength=self.buckets)
        return table, self.summary(counts, len(keys), int((~hashed).sum()))

    def solve(self, state: None, figures: Any, partition: Any, scratch: list[Location]) -> pa.Table:
        rows = self.rows_of(scratch, partition)
        _, first = np.unique(rows[KEY].to_numpy(), return_index=True)  # an image in two of this range's buckets
        rows = rows.take(pa.array(np.sort(first)))
        hashes = rows[schema.PHASH].to_numpy(zero_copy_only=False).astype(np.uint64)
        pairs, dist = hamming_pairs(hashes, self.cfg.max_distance, self.cfg.query_chunk)
        keep = confirmed(pairs, dhashes_of(rows, self.cfg.confirm_dhash), self.cfg.confirm_dhash)
        pairs, dist = pairs[keep], dist[keep]
        a, b = rows.take(pa.array(pairs[:, 0])), rows.take(pa.array(pairs[:, 1]))
        return found_pairs(a, b, a[KEY], b[KEY], dist.astype(np.float32))

    def reduce(self, state: None, figures: dict[str, Any], solved: list[Location]) -> StageOutput:
        found = pa.concat_tables([pq.read_table(p) for p in solved]) if solved else None
        decisions, stats = group_found(found, figures["rows"])
        return StageOutput(decisions, {**stats, "without_phash": figures["unhashed"]} if figures["unhashed"] else stats)


def band_buckets(hashes: np.ndarray, max_distance: int, buckets: int) -> np.ndarray:
    """Each 64-bit hash's bucket per band: ``max_distance + 1`` disjoint bands covering all 64 bits, so two hashes
    within ``max_distance`` bits share at least one (band, value) and so one bucket. [N] uint64 -> [N, bands] int64."""
    bands = max_distance + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    out = np.empty((len(hashes), bands), np.int64)
    for band, (lo, hi) in enumerate(itertools.pairwise(edges)):
        mask = np.uint64((1 << (hi - lo)) - 1) if hi - lo < 64 else np.uint64(2**64 - 1)
        value = (hashes >> np.uint64(lo)) & mask
        with np.errstate(over="ignore"):
            mixed = (value + np.uint64(band + 1)) * _MIX
        out[:, band] = (mixed >> np.uint64(11)) % np.uint64(buckets)
    return out


def _buckets(rows: int, partition_rows: int) -> int:
    """Enough buckets that partitions of ``partition_rows`` can be packed evenly (four per partition)."""
    return max(1, 4 * math.ceil(max(rows, 1) / partition_rows))
