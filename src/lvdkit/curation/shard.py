"""Stage ``shard``: the curated pretraining set as Parquet shards with the image bytes and their provenance.

Selections are merged (an image picked several ways keeps its strongest reason: sample retrieval, then cluster
retrieval, then the balanced sample; seed images can be included as they are), then every shard reads its images'
bytes, re-encoding only those larger than ``max_side`` when it is set.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.files import MAX_FILE_BYTES, read_bytes
from lvdkit.core.image import decode, to_rgb

REASON_ORDER = (schema.REASON_SAMPLE, schema.REASON_CLUSTER, schema.REASON_BALANCED, schema.REASON_SEED)
SELECTION = pa.schema(
    [("image_id", pa.string()), ("reason", pa.string()), ("seed_set", pa.string()), ("score", pa.float32())]
)


@dataclass
class ShardConfig:
    """Shard size, what goes in, and optional downsizing."""

    rows_per_shard: int = 1000  # images per part file
    row_group_rows: int = 256  # rows per Parquet row group (streaming readers fetch one at a time)
    include_seeds: bool = True  # add the seed images themselves (reason: seed)
    max_side: int | None = None  # re-encode (JPEG, quality 90) images whose longer side exceeds this; null: as stored
    embedding: str | None = "semantic"  # embed.models key stored as the `embedding` column; null: no column


def merge_selections(selections: list[pa.Table]) -> pa.Table:
    """Concatenate selection tables (image_id, reason, seed_set, score) and keep each image's best row."""
    table = pa.concat_tables([s.select(SELECTION.names).cast(SELECTION) for s in selections])
    if table.num_rows == 0:
        return table
    rank = pc.index_in(table["reason"], value_set=pa.array(REASON_ORDER))
    order = np.lexsort(
        (
            -np.nan_to_num(table["score"].to_numpy(zero_copy_only=False), nan=-np.inf),
            rank.to_numpy(zero_copy_only=False),
            table["image_id"].to_numpy(zero_copy_only=False),
        )
    )
    ids = table["image_id"].to_numpy(zero_copy_only=False)[order]
    first = np.concatenate([[True], ids[1:] != ids[:-1]])
    return table.take(pa.array(order[first]))


def fetch_images(rows: pa.Table, cfg: ShardConfig, dim: int | None) -> pa.Table:
    """Add the ``image`` bytes to selected rows (one shard) and return a table with :func:`schema.curated_schema`."""
    images, widths, heights, formats = [], [], [], []
    for uri, fmt, w, h in zip(
        rows[schema.URI].to_pylist(),
        rows["format"].to_pylist(),
        rows["width"].to_pylist(),
        rows["height"].to_pylist(),
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
    cols.update(
        image=pa.array(images, pa.binary()),
        format=pa.array(formats, pa.string()),
        width=pa.array(widths, pa.int32()),
        height=pa.array(heights, pa.int32()),
    )
    return pa.table({name: cols[name] for name in sch.names}, schema=sch)


def _shrink(data: bytes, max_side: int) -> tuple[bytes, int, int]:
    image = to_rgb(decode(data, 2**31).image)
    image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), image.width, image.height
