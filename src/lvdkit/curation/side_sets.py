"""Small side sets (protected images, seed sets): ingested and embedded in the stage's own process.

They are read with the pool's ingest rules and embedded with the model the pool was embedded with, so their
descriptors are comparable with the pool's. They are small by nature (an evaluation set, a few seed folders);
pools go through the per-part stages instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvdkit.core import schema
from lvdkit.curation.ingest import IngestConfig, ingest_files, list_for_ingest
from lvdkit.embeddings.stage import PIXELS_PREFIX, EmbedConfig, calibration_rate, decode_batch


@dataclass(frozen=True)
class SideSet:
    """A side set's ingest rows (all, then the usable ones) and the usable ones' embeddings [N, D]; with
    ``copies`` asked for, synthetic copies of them too: embeddings [C, D] and each one's edit family [C]."""

    rows: pa.Table
    ok: pa.Table
    x: np.ndarray
    copies: np.ndarray | None = None
    copy_edit: np.ndarray | None = None


@dataclass(frozen=True)
class SideSetReader:
    """Reads side sets with the pool's ingest and embed settings."""

    ingest: IngestConfig
    embed: EmbedConfig

    def read(self, key: str, inputs: list[str], batch: int = 64, copies: int = 0) -> SideSet:
        """Ingest ``inputs`` and embed the usable images with model ``key`` of ``embed.models``; with ``copies``,
        about that many synthetic copies of them too (drawn as embed draws the pool's calibration copies)."""
        from lvdkit.embeddings import create_embedder

        if key not in self.embed.models:
            raise ValueError(f"{key!r} is not a key of embed.models ({', '.join(self.embed.models)})")
        listed = list(list_for_ingest(inputs, self.ingest))
        rows = ingest_files([u for u, _ in listed], self.ingest, [o for _, o in listed])
        rows = rows.drop_columns([schema.IMAGE_BYTES, schema.PHASH, schema.DHASH])
        ok = rows.filter(pc.equal(rows[schema.STATUS_COL], schema.STATUS_OK))
        model = create_embedder(self.embed.models[key], **self.embed.options(key))
        ids, uris = ok[schema.IMAGE_ID].to_pylist(), ok[schema.URI].to_pylist()
        rate = calibration_rate(len(ids), copies)
        embed = replace(self.embed, copy_views=[])  # views are the pool's index's (dedup_copy), not copies
        out, edits = [], []
        for start in range(0, len(ids), batch):
            pre = {key: model.preprocess}
            cols = decode_batch(ids[start : start + batch], uris[start : start + batch], pre, rate, embed)
            out.append(model.embed(cols[PIXELS_PREFIX + key]))
            edits.append(cols[schema.EDIT])
        if not out:
            return SideSet(rows, ok, np.empty((0, model.dim), np.float32))
        x, edit = np.concatenate(out), np.concatenate(edits)
        original = edit == ""
        if not copies:
            return SideSet(rows, ok, x[original])
        return SideSet(rows, ok, x[original], x[~original], edit[~original])
