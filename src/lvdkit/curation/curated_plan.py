"""``curated``'s work list, made where the rows are: no task holds the curated set.

1. scatter, one task per ``cluster`` part: the rows picked (the balanced sample, the retrieved images, seeds that
   are pool images; every row when the curated set is the whole pool), each image's selections merged
   (:func:`~lvdkit.curation.curated.merge_selections`: every selection of an image meets at its one cluster row),
   keyed by the embed part that holds the image (``embed_part``); the embed parts it touched and the seeds found;
2. plan: one listing file per embed part with picked rows, then one for the seeds that are not pool images;
3. write, one task per listing file: its rows (a key range of every scatter table), sorted by image id, with their
   metadata (embed's work list, the same row group) and embeddings (the same embed part).

The curated parts are the listing files' row groups (``rows_per_part`` rows each) in file order
(:class:`~lvdkit.curation.curated.CuratedWork`). The same inputs give the same files: a resumed run finds its
finished parts where it left them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.scratch_read import read_range
from lvdkit.core.stage import PartitionedWork, Resources, Scratch, StageInputs, StageOutput
from lvdkit.core.storage import Location
from lvdkit.core.views import EMBED, aligned, embed_listing, embed_listing_rows, embed_parts_of, ingested
from lvdkit.curation.curated import SELECTION, CuratedConfig, listing_parts, merge_selections, selections

META = [schema.URI, schema.FORMAT, schema.WIDTH, schema.HEIGHT, schema.CONTENT_HASH]  # besides METADATA
SEEDS = -1  # the partition of the seeds that are not pool images


@dataclass
class PlanState:
    """What every task gets by reference: the retrieved images and the seeds (both bounded by config)."""

    retrieved: pa.Table
    seeds: pa.Table | None


@dataclass
class CuratedPlan(PartitionedWork):
    """The partitioned steps that write ``curated``'s listing files (see the module)."""

    cfg: CuratedConfig
    inputs: StageInputs
    whole_pool: bool  # nothing selects: the curated set is the whole deduplicated pool
    n_embed: int  # embed parts
    dim: int | None  # width of the embedding column (None: no column)
    has_seeds: bool
    solves = False  # no solve step: the writes join what the scatter keyed
    write_per_partition = True
    scratch_row_group_rows = 256  # a write reads one embed part's few rows from every scatter table

    @classmethod
    def create(cls, cfg: CuratedConfig, inputs: StageInputs, whole_pool: bool) -> CuratedPlan:
        embed_parts = inputs.parts(EMBED)
        dim = None
        if cfg.embedding is not None and embed_parts:
            field = pq.read_schema(embed_parts[0]).field(schema.embedding_column(cfg.embedding))
            dim = field.type.list_size
        has_seeds = cfg.include_seeds and inputs.side("retrieve", schema.SEEDS_FILE).exists()
        work = cls(cfg, inputs, whole_pool, len(embed_parts), dim, has_seeds)
        work.n_inputs = len(inputs.parts("cluster"))
        work.resources = Resources(cpus=1.0, memory_mb=cfg.plan_memory_mb)
        work.output_row_group_rows = cfg.rows_per_part  # a curated part is one row group of a listing file
        return work

    def empty_output(self) -> pa.Table:
        return listing_schema(self.dim).empty_table()

    def prepare(self) -> PlanState:
        retrieved = self.inputs.table("retrieve", schema=schema.RETRIEVED)
        seeds = pq.read_table(self.inputs.side("retrieve", schema.SEEDS_FILE)) if self.has_seeds else None
        return PlanState(retrieved, seeds)

    def scatter(self, state: PlanState, index: int) -> tuple[pa.Table, dict[str, Any]]:
        rows = pq.read_table(self.inputs.parts("cluster")[index], schema=schema.CLUSTER)
        if not self.whole_pool:
            named = pa.concat_arrays([_ids(state.retrieved), _ids(state.seeds)])
            rows = rows.filter(pc.or_(rows[schema.BALANCED], pc.is_in(rows[schema.IMAGE_ID], named)))
        ids = rows[schema.IMAGE_ID]
        retrieved = state.retrieved.filter(pc.is_in(state.retrieved[schema.IMAGE_ID], ids))
        seeds = None if state.seeds is None else state.seeds.filter(pc.is_in(state.seeds[schema.IMAGE_ID], ids))
        chosen = merge_selections(selections(retrieved, rows, seeds, self.whole_pool))
        picked = aligned(chosen[schema.IMAGE_ID], rows)
        part = picked[schema.EMBED_PART].combine_chunks()
        if part.null_count:  # a cluster output from before the column: ask embed's work list
            part = pc.coalesce(part, embed_parts_of(self.inputs, chosen[schema.IMAGE_ID]))
        table = chosen.append_column(schema.CLUSTER_IDS, picked[schema.CLUSTER_IDS])
        table = table.append_column(schema.EMBED_PART, part).sort_by([(schema.EMBED_PART, "ascending")])
        # sparse: a cluster part touches few embed parts, and a summary per cluster part waits in the object store
        touched = np.unique(part.to_numpy(zero_copy_only=False))
        found = seeds[schema.IMAGE_ID].to_pylist() if seeds is not None else []
        return table, {"parts": touched, "seeds_found": set(found)}

    def merge(self, total: dict[str, Any] | None, summary: dict[str, Any]) -> dict[str, Any]:
        if total is None:
            total = {"picked": np.zeros(self.n_embed, bool), "seeds_found": set()}
        total["picked"][summary["parts"]] = True
        total["seeds_found"] |= summary["seeds_found"]
        return total

    def plan(self, total: dict[str, Any] | None) -> tuple[list[Any], dict[str, Any]]:
        picked = total["picked"] if total is not None else np.zeros(0, bool)
        partitions = [int(p) for p in np.flatnonzero(picked)] + ([SEEDS] if self.has_seeds else [])
        found = sorted(total["seeds_found"]) if total is not None else []
        return partitions, {"partitions": partitions, "seeds_found": found}

    def reduce(self, state: PlanState, figures: dict[str, Any], solved: list[Location]) -> StageOutput:
        return StageOutput(pa.table({}))

    def write(
        self, state: PlanState, figures: dict[str, Any], decisions: Any, index: int, scratch: Scratch
    ) -> pa.Table:
        part = figures["partitions"][index]
        if part == SEEDS:
            assert state.seeds is not None
            return self._seed_listing(state.seeds, figures["seeds_found"])
        rows = read_range(scratch.scattered, schema.EMBED_PART, part, part + 1).sort_by(schema.IMAGE_ID)
        ids = rows[schema.IMAGE_ID]
        meta = self._metadata(part, ids)
        cols = {name: rows[name] for name in SELECTION.names}
        cols.update({name: meta[name] for name in [*META, schema.METADATA]})
        cols[schema.CLUSTER_IDS] = rows[schema.CLUSTER_IDS]
        if self.dim is not None:
            cols[schema.EMBEDDING] = self._embeddings(part, ids)
        return pa.table(cols, schema=listing_schema(self.dim))

    def _metadata(self, part: int, ids: pa.ChunkedArray) -> pa.Table:
        """``ids``' metadata from row group ``part`` of embed's work list (which lists that part's images)."""
        wanted = [schema.IMAGE_ID, *META, schema.METADATA]
        if not set(wanted) <= set(pq.ParquetFile(embed_listing(self.inputs)).schema_arrow.names):  # from before them
            return aligned(ids, ingested(self.inputs, wanted, ids))
        return embed_listing_rows(self.inputs, part, ids, wanted)

    def _embeddings(self, part: int, ids: pa.ChunkedArray) -> pa.ChunkedArray:
        assert self.cfg.embedding is not None
        col = schema.embedding_column(self.cfg.embedding)
        table = pq.read_table(self.inputs.parts(EMBED)[part], columns=[schema.IMAGE_ID, col])
        found = aligned(ids, table)[col]
        if found.null_count:
            raise RuntimeError(f"{self.inputs.parts(EMBED)[part]} lacks embeddings of curated images: rerun embed")
        return found.cast(schema.embedding_type(self.dim or 0))

    def _seed_listing(self, seeds: pa.Table, found: list[str]) -> pa.Table:
        """The seeds that are not pool images (those that are went with their pool rows), one row per image."""
        seeds = seeds.filter(pc.invert(pc.is_in(seeds[schema.IMAGE_ID], pa.array(found, pa.string()))))
        chosen = merge_selections(selections(None, None, seeds)).sort_by(schema.IMAGE_ID)
        ids = chosen[schema.IMAGE_ID]
        meta = aligned(ids, seeds)
        cols = {name: chosen[name] for name in SELECTION.names}
        cols.update({name: meta[name] for name in META})
        cols[schema.METADATA] = pa.nulls(len(ids), pa.string())  # seeds carry none
        cols[schema.CLUSTER_IDS] = pa.nulls(len(ids), pa.list_(pa.int32()))
        if self.dim is not None:
            cols[schema.EMBEDDING] = meta[schema.EMBEDDING].cast(schema.embedding_type(self.dim))
        return pa.table(cols, schema=listing_schema(self.dim))

    def final_stats(self, stats: dict[str, Any], parts: list[Location]) -> dict[str, Any]:
        rows = [pq.ParquetFile(p).metadata.num_rows for p in parts]
        n_parts = sum(listing_parts(r, self.cfg.rows_per_part) for r in rows)
        return {"listing_rows": rows, "n_parts": n_parts}


def _ids(table: pa.Table | None) -> pa.Array:
    if table is None or not table.num_rows:
        return pa.array([], pa.string())
    return table[schema.IMAGE_ID].combine_chunks().cast(pa.string())


def listing_schema(dim: int | None) -> pa.Schema:
    """A listing file's schema: each curated row but its bytes (``dim``: the embedding's width; None: no column)."""
    ingest = schema.INGEST
    fields = [*SELECTION, *(ingest.field(c) for c in [*META, schema.METADATA])]
    fields.append(schema.CLUSTER.field(schema.CLUSTER_IDS).with_nullable(True))
    if dim is not None:
        fields.append(pa.field(schema.EMBEDDING, schema.embedding_type(dim)))
    return pa.schema(fields)
