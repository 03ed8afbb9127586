"""Small side sets (protected images, seed sets): ingested and embedded in the stage's own process.

They are read with the pool's ingest rules and embedded with the model the pool was embedded with, so their
descriptors are comparable with the pool's. They are small by nature (an evaluation set, a few seed folders);
pools go through the per-part stages instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvdkit.core import schema
from lvdkit.curation.ingest import IngestConfig, ingest_files, list_for_ingest
from lvdkit.embeddings.stage import PIXELS_PREFIX, EmbedConfig, decode_batch


@dataclass(frozen=True)
class SideSet:
    """A side set's ingest rows (all, then the usable ones) and the usable ones' embeddings [N, D]."""

    rows: pa.Table
    ok: pa.Table
    x: np.ndarray


@dataclass(frozen=True)
class SideSetReader:
    """Reads side sets with the pool's ingest and embed settings."""

    ingest: IngestConfig
    embed: EmbedConfig

    def read(self, key: str, inputs: list[str], batch: int = 64) -> SideSet:
        """Ingest ``inputs`` and embed the usable images with model ``key`` of ``embed.models``."""
        from lvdkit.embeddings import create_embedder

        if key not in self.embed.models:
            raise ValueError(f"{key!r} is not a key of embed.models ({', '.join(self.embed.models)})")
        listed = list(list_for_ingest(inputs, self.ingest))
        rows = ingest_files([u for u, _ in listed], self.ingest, [o for _, o in listed])
        rows = rows.drop_columns([schema.IMAGE_BYTES, schema.PHASH])
        ok = rows.filter(pc.equal(rows[schema.STATUS_COL], schema.STATUS_OK))
        model = create_embedder(self.embed.models[key], **self.embed.options(key))
        ids, uris = ok[schema.IMAGE_ID].to_pylist(), ok[schema.URI].to_pylist()
        out = []
        for start in range(0, len(ids), batch):
            pre = {key: model.preprocess}
            cols = decode_batch(ids[start : start + batch], uris[start : start + batch], pre, 0.0, self.embed)
            out.append(model.embed(cols[PIXELS_PREFIX + key]))
        x = np.concatenate(out) if out else np.empty((0, model.dim), np.float32)
        return SideSet(rows, ok, x)
