"""Stage ``curated``: the curated pretraining set as Parquet parts with the image bytes and their provenance.

Selections are merged (an image picked several ways keeps its strongest reason: sample retrieval, then cluster
retrieval, then the balanced sample; seed images can be included as they are) where the rows lie
(:mod:`lvdkit.curation.curated_plan`), then every part reads its images' bytes, re-encoding only those larger than
``max_side`` when it is set.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.files import MAX_FILE_BYTES, content_hash, read_bytes
from lvdkit.core.image import decode, to_rgb
from lvdkit.core.io import part_name
from lvdkit.core.settings import setting
from lvdkit.core.stage import PartWork, StageInputs
from lvdkit.core.storage import Location

REASON_ORDER = (
    schema.REASON_SAMPLE,
    schema.REASON_CLUSTER,
    schema.REASON_BALANCED,
    schema.REASON_SEED,
    schema.REASON_POOL,
)
SELECTION = schema.SELECTION


@dataclass
class CuratedConfig:
    """Part size, what goes in, and optional downsizing."""

    RENAMED: ClassVar[dict[str, str]] = {"rows_per_part": "rows_per_part"}

    rows_per_part: int = setting(1000, ge=1)  # images per part file
    row_group_rows: int = setting(256, ge=1)  # rows per Parquet row group (streaming readers fetch one at a time)
    include_seeds: bool = True  # add the seed images themselves (reason: seed)
    # re-encode (JPEG, quality 90) images whose longer side exceeds this; null: as stored
    max_side: int | None = setting(None, ge=1)
    embedding: str | None = "semantic"  # embed.models key stored as the `embedding` column; null: no column
    # memory Ray reserves per task of the plan (a cluster part and the retrieved set; one embed part's picks)
    plan_memory_mb: int = setting(1024, ge=64)


def merge_selections(selections: list[pa.Table]) -> pa.Table:
    """Concatenate selection tables (image_id, reason, seed_set, score) and keep each image's best row."""
    table = pa.concat_tables([s.select(SELECTION.names).cast(SELECTION) for s in selections])
    if table.num_rows == 0:
        return table
    rank = pc.index_in(table[schema.REASON], value_set=pa.array(REASON_ORDER))
    order = np.lexsort(
        (
            -np.nan_to_num(table[schema.SCORE].to_numpy(zero_copy_only=False), nan=-np.inf),
            rank.to_numpy(zero_copy_only=False),
            table[schema.IMAGE_ID].to_numpy(zero_copy_only=False),
        )
    )
    ids = table[schema.IMAGE_ID].to_numpy(zero_copy_only=False)[order]
    first = np.concatenate([[True], ids[1:] != ids[:-1]])
    return table.take(pa.array(order[first]))


def fetch_images(rows: pa.Table, cfg: CuratedConfig, dim: int | None) -> pa.Table:
    """Add the ``image`` bytes to selected rows (one part) and return a table with :func:`schema.curated_schema`."""
    images, widths, heights, formats = [], [], [], []
    for uri, fmt, w, h in zip(
        rows[schema.URI].to_pylist(),
        rows[schema.FORMAT].to_pylist(),
        rows[schema.WIDTH].to_pylist(),
        rows[schema.HEIGHT].to_pylist(),
        strict=True,
    ):
        data = read_bytes(uri, MAX_FILE_BYTES)
        if cfg.max_side is not None and max(w, h) > cfg.max_side:
            data, w, h = _shrink(data, cfg.max_side)
            fmt = "JPEG"
        images.append(data)
        widths.append(w)
        heights.append(h)
        formats.append(fmt)
    sch = schema.curated_schema(dim)
    cols = {name: rows[name] for name in sch.names if name in rows.column_names}
    cols.setdefault(schema.METADATA, pa.nulls(rows.num_rows, pa.string()))  # a work list from before the column
    cols.update(
        {
            schema.IMAGE: pa.array(images, pa.binary()),
            schema.FORMAT: pa.array(formats, pa.string()),
            schema.WIDTH: pa.array(widths, pa.int32()),
            schema.HEIGHT: pa.array(heights, pa.int32()),
        }
    )
    return pa.table({name: cols[name] for name in sch.names}, schema=sch)


def _shrink(data: bytes, max_side: int) -> tuple[bytes, int, int]:
    image = to_rgb(decode(data, 2**31).image)
    image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), image.width, image.height


# --- the stage: the work list made where the rows are (curated_plan), bytes fetched per part ------------------------


def selections(
    retrieved: pa.Table | None, clusters: pa.Table | None, seeds: pa.Table | None, whole_pool: bool = False
) -> list[pa.Table]:
    """The ways images were picked, as SELECTION tables: the ``retrieved`` images, the balanced sample among the
    ``clusters`` rows (every row, reason ``deduplicated_pool``, with ``whole_pool``: nothing was configured to
    select) and the ``seeds``. :func:`merge_selections` keeps each image's strongest."""
    out = []
    if retrieved is not None:
        out.append(retrieved.rename_columns({schema.METHOD: schema.REASON}).select(SELECTION.names))
    if clusters is not None:
        out.append(_scored(clusters.filter(clusters[schema.BALANCED]), schema.REASON_BALANCED))
        if whole_pool:
            out.append(_scored(clusters, schema.REASON_POOL))
    if seeds is not None:
        out.append(
            pa.table(
                {
                    schema.IMAGE_ID: seeds[schema.IMAGE_ID],
                    schema.REASON: pa.array([schema.REASON_SEED] * seeds.num_rows, pa.string()),
                    schema.SEED_SET: seeds[schema.SEED_SET],
                    schema.SCORE: pa.array(np.ones(seeds.num_rows, np.float32)),
                }
            )
        )
    return out


def _scored(clusters: pa.Table, reason: str) -> pa.Table:
    """Pool images picked by ``reason`` as a SELECTION table, scored by cosine similarity to their centroid."""
    n = clusters.num_rows
    similarity = pc.subtract(1.0, pc.cast(clusters[schema.DISTANCE], pa.float64()))
    return pa.table(
        {
            schema.IMAGE_ID: clusters[schema.IMAGE_ID],
            schema.REASON: pa.array([reason] * n, pa.string()),
            schema.SEED_SET: pa.nulls(n, pa.string()),
            schema.SCORE: pc.cast(similarity, pa.float32()),
        }
    )


CHANGED = "changed_since_ingest"  # a curated file's bytes are not the ones ingest read
_REINGEST = "rerun `lvdkit curate`: ingest notices changed files (size, mtime) and redoes the stages after it"


class ChangedSinceIngest(RuntimeError):
    """A selected file no longer holds the bytes ingest read (edited, replaced or removed since)."""

    reason = CHANGED


def listing_parts(rows: int, rows_per_part: int) -> int:
    """The curated parts a listing file of ``rows`` rows holds: one per row group of ``rows_per_part`` rows."""
    return -(-rows // rows_per_part)


@dataclass(frozen=True)
class CuratedWork(PartWork):
    """Curated part ``i``: fetch the bytes of its rows of the listing files, checking each file is unchanged.

    ``listing``: the folder of listing files (:mod:`lvdkit.curation.curated_plan`), ``listing_rows`` the rows of
    each: their parts follow one another, ``rows_per_part`` rows at a time within a file."""

    listing: Location
    cfg: CuratedConfig
    listing_rows: tuple[int, ...]

    def load(self, index: int) -> pa.Table:
        for file, rows in enumerate(self.listing_rows):
            parts = listing_parts(rows, self.cfg.rows_per_part)
            if index < parts:  # the listing files are written in row groups of rows_per_part
                return pq.ParquetFile(self.listing / part_name(file)).read_row_group(index)
            index -= parts
        raise IndexError(f"curated has no part {index} past the last in {self.listing}")

    def process(self, rows: pa.Table, decoded: Any = None) -> pa.Table:
        dim = rows.schema.field(schema.EMBEDDING).type.list_size if schema.EMBEDDING in rows.column_names else None
        try:
            table = fetch_images(rows, self.cfg, dim)
        except FileNotFoundError as exc:
            raise ChangedSinceIngest(f"{exc}: it was read at ingest; {_REINGEST}") from exc
        _check_unchanged(rows, table, self.cfg)
        return table


def _check_unchanged(rows: pa.Table, table: pa.Table, cfg: CuratedConfig) -> None:
    """Raise :class:`ChangedSinceIngest` for the first file whose bytes differ from what ingest hashed."""
    if schema.CONTENT_HASH not in rows.column_names:
        return
    for uri, want, data, w, h in zip(
        rows[schema.URI].to_pylist(),
        rows[schema.CONTENT_HASH].to_pylist(),
        table[schema.IMAGE].to_pylist(),
        rows[schema.WIDTH].to_pylist(),
        rows[schema.HEIGHT].to_pylist(),
        strict=True,
    ):
        reencoded = cfg.max_side is not None and max(w, h) > cfg.max_side  # ``data`` is not the file: read it again
        got = content_hash(read_bytes(uri, MAX_FILE_BYTES) if reencoded else data)
        if want is not None and got != want:
            raise ChangedSinceIngest(
                f"{uri} changed since ingest (its bytes differ from the ones ingested); {_REINGEST}"
            )


def curated_stats(inputs: StageInputs) -> dict[str, Any]:
    """Curated images by selection reason and seed set, and the files left out (``on_part_error=quarantine``)."""
    table = inputs.table("curated", columns=[schema.REASON, schema.SEED_SET], schema=schema.curated_schema(None))
    by_reason = pc.value_counts(table[schema.REASON]).to_pylist()
    by_set = pc.value_counts(pc.fill_null(table[schema.SEED_SET], "")).to_pylist()
    stats: dict[str, Any] = {
        "by_reason": {r["values"]: r["counts"] for r in by_reason},
        "by_seed_set": {r["values"]: r["counts"] for r in by_set if r["values"]},
    }
    left_out = inputs.parts("curated", schema.QUARANTINED)
    if left_out:
        errors = pa.concat_tables([pq.read_table(p, columns=[schema.ERROR]) for p in left_out])[schema.ERROR]
        stats["quarantined"] = {r["values"]: r["counts"] for r in pc.value_counts(errors).to_pylist()}
    return stats
