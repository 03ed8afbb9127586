"""Reading the curated set in a notebook: ``lvdkit.load_curated(OUT)`` and ``decode(row_or_bytes)``.

The shards are plain Parquet, so pandas, polars or duckdb read them without lvdkit; this is a convenience.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pyarrow.dataset as ds
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.image import decode_rgb
from lvdkit.core.stage import StageInputs
from lvdkit.core.storage import fs_paths, location

CURATED_DIR = "curated"


def load_curated(
    out: str | Path, as_: Literal["dataset", "pandas"] = "dataset", columns: list[str] | None = None
) -> Any:
    """The curated shards under ``OUT/curated`` as a pyarrow Dataset (lazy, streams row groups) or a pandas frame.

    ``out``: a local folder or a URI (``s3://bucket/run``; other S3-compatible services through
    ``AWS_ENDPOINT_URL``, see :mod:`lvdkit.core.storage`)."""
    folder = location(out) / CURATED_DIR
    parts = StageInputs(str(out), (CURATED_DIR,)).parts(CURATED_DIR)  # those its _SUCCESS lists, once finished
    if not parts:
        raise FileNotFoundError(f"no curated shards in {folder}: run `lvdkit curate` (or `lvdkit run shard`)")
    fs, paths = fs_paths(parts)
    dataset = ds.dataset(paths, format="parquet", filesystem=fs)
    if as_ == "dataset":
        return dataset
    if as_ == "pandas":
        return dataset.to_table(columns=columns).to_pandas()
    raise ValueError(f"as_={as_!r}; valid: 'dataset', 'pandas'")


def decode(row_or_bytes: Any) -> Image.Image:
    """A curated row (dict / pandas row with an ``image`` field) or raw bytes -> an RGB PIL image.

    Decoded by :func:`lvdkit.core.image.decode_rgb`, as ingest, embed and pretraining do: upright, transparency on
    white, the same pixels everywhere. Unusable bytes raise :class:`lvdkit.core.image.DecodeError` (with ``reason``).
    """
    data = row_or_bytes if isinstance(row_or_bytes, (bytes, bytearray, memoryview)) else row_or_bytes[schema.IMAGE]
    return decode_rgb(bytes(data))
