"""Where ``embed`` runs: Ray Data decode tasks on CPU feeding an actor pool that holds the models.

Rows of the pending shards stream through ``map_batches(decode)`` (tasks) and ``map_batches(Embed)`` (actors, one
model set each, batched); the driver gathers the embeddings of each shard and writes its part file atomically as soon
as the shard is complete, so an interrupted run resumes at shard granularity like every other stage.

A file that can no longer be decoded (it changed or vanished since ingest) fails the stage with a message naming it:
every surviving image needs its embedding, so there is no quarantine here. Rerunning ``lvdkit curate`` re-ingests
the changed files (ingest's fingerprint holds each file's size and mtime) and redoes the stages after it.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from lvdkit.core import schema
from lvdkit.core.io import part_name
from lvdkit.embeddings.stage import PIXELS_PREFIX, EmbedConfig, calibration_rate, decode_batch, is_calibration_sample
from lvdkit.pipeline import faults
from lvdkit.pipeline.faults import Hooks

SHARD = "_shard"
CALIBRATION_DIR = "calibration"


class EmbedActor:
    """Ray Data actor: builds every configured model once, then embeds batches of preprocessed pixels."""

    def __init__(self, cfg: EmbedConfig, threads: int) -> None:
        from lvdkit.embeddings import create_embedder

        self.models = {
            key: create_embedder(name, device=cfg.device, num_threads=threads, **cfg.options(key))
            for key, name in cfg.models.items()
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {
            schema.IMAGE_ID: batch[schema.IMAGE_ID],
            schema.EDIT: batch[schema.EDIT],
            SHARD: batch[SHARD],
        }
        for key, model in self.models.items():
            out[schema.embedding_column(key)] = model.embed(batch[PIXELS_PREFIX + key])  # [B, D] float32
        return out


class EmbedInputError(RuntimeError):
    """Images that decoded at ingest cannot be decoded now (changed or removed since)."""


def _decode(
    batch: dict[str, np.ndarray], preprocess: dict[str, Any], rate: float, cfg: EmbedConfig, retries: int = 0
) -> dict:
    ids, uris = list(batch[schema.IMAGE_ID]), list(batch[schema.URI])
    for attempt in range(retries + 1):
        try:
            out = decode_batch(ids, uris, preprocess, rate, cfg)
            break
        except Exception:
            if attempt == retries:
                raise EmbedInputError(_undecodable(ids, uris, preprocess, rate, cfg)) from None
    shard_of = dict(zip(batch[schema.IMAGE_ID], batch[SHARD], strict=True))
    out[SHARD] = np.asarray([shard_of[i] for i in out[schema.IMAGE_ID]], dtype=np.int64)
    return out


def _undecodable(ids: list[str], uris: list[str], preprocess: dict[str, Any], rate: float, cfg: EmbedConfig) -> str:
    """Name the images of a failing batch that fail on their own."""
    bad = []
    for image_id, uri in zip(ids, uris, strict=True):
        try:
            decode_batch([image_id], [uri], preprocess, rate, cfg)
        except Exception as exc:
            cause = exc.__cause__ or exc
            bad.append(f"{uri} ({type(cause).__name__}: {cause})")
    named = "; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") if bad else ", ".join(uris)
    return (
        f"embed: cannot decode {named}. It decoded at ingest: the file changed or vanished since. Rerun `lvdkit "
        "curate`: ingest notices changed files (size, mtime) and redoes the stages after it"
    )


def expected_rows(listing: pa.Table, rate: float, seed: int) -> dict[int, tuple[int, int]]:
    """Per shard: (images, synthetic copies) the driver must collect before writing the shard."""
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for image_id, shard in zip(listing[schema.IMAGE_ID].to_pylist(), listing[SHARD].to_pylist(), strict=True):
        counts[shard][0] += 1
        counts[shard][1] += is_calibration_sample(image_id, rate, seed)
    return {k: (v[0], v[1]) for k, v in counts.items()}


def run_embed(
    cfg: EmbedConfig,
    listing_path: Path,
    stage_dir: Path,
    pending: list[int],
    progress: bool,
    n_total: int,
    retries: int = 3,
    hooks: Hooks | None = None,
) -> None:
    """Embed the images of the ``pending`` shards of ``listing_path`` and write their part files (a decode task is
    retried ``retries`` times, in the task when it raises and by Ray when its worker dies)."""
    from lvdkit.embeddings import create_embedder

    listing = pq.read_table(listing_path)
    rate = calibration_rate(n_total, cfg.calibration_copies)
    # One model load on the driver: fails fast with a clear error (bad name, missing weights) and gives each model's
    # preprocessing and dimension, before any Ray work starts.
    probes = {k: create_embedder(n, device="cpu", **cfg.options(k)) for k, n in cfg.models.items()}
    dims = {k: m.dim for k, m in probes.items()}
    preprocess = {k: m.preprocess for k, m in probes.items()}
    del probes
    todo = listing.filter(pc.is_in(listing[SHARD], value_set=pa.array(pending, pa.int64())))
    expected = expected_rows(todo, rate, cfg.seed)
    node_cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    threads = cfg.threads_per_actor or max(1, node_cpus // max(1, cfg.num_actors))
    use_gpu = cfg.device in ("auto", "cuda") and _cuda_available()
    ds = ray.data.from_arrow(todo).map_batches(
        _decode,  # type: ignore[arg-type]
        fn_kwargs={"preprocess": preprocess, "rate": rate, "cfg": cfg, "retries": retries},
        batch_size=cfg.batch_size,
        num_cpus=cfg.decode_cpus,
        max_retries=retries,
    )
    ds = ds.map_batches(
        EmbedActor,  # type: ignore[arg-type]
        fn_constructor_kwargs={"cfg": cfg, "threads": threads},
        batch_size=cfg.batch_size,
        concurrency=cfg.num_actors,
        num_cpus=cfg.actor_cpus,
        num_gpus=1 if use_gpu else 0,
    )
    buffers: dict[int, list[pa.Table]] = defaultdict(list)
    got: dict[int, int] = defaultdict(int)
    with tqdm(total=len(todo), desc="embed", unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            assert isinstance(batch, pa.Table)
            for shard in pc.unique(batch[SHARD]).to_pylist():
                part = batch.filter(pc.equal(batch[SHARD], shard))
                buffers[shard].append(part)
                got[shard] += part.num_rows
                if got[shard] == sum(expected[shard]):
                    _write_shard(pa.concat_tables(buffers.pop(shard)), shard, stage_dir, dims, hooks)
                    if hooks is not None:
                        hooks.pause()  # a test kills the run here
            bar.update(int(pc.sum(pc.equal(batch[schema.EDIT], "")).as_py() or 0))


def _write_shard(rows: pa.Table, shard: int, stage_dir: Path, dims: dict[str, int], hooks: Hooks | None) -> None:
    """Split a complete shard into image rows and synthetic-copy rows and write both; the image part goes last,
    since its existence is what marks the shard done."""
    is_copy = pc.not_equal(rows[schema.EDIT], "")
    copies = _as_schema(rows.filter(is_copy), schema.embed_schema(dims, calibration=True))
    faults.write_part(copies, stage_dir / CALIBRATION_DIR / part_name(shard), hooks)
    faults.write_part(
        _as_schema(rows.filter(pc.invert(is_copy)), schema.embed_schema(dims)), stage_dir / part_name(shard), hooks
    )


def _as_schema(table: pa.Table, sch: pa.Schema) -> pa.Table:
    cols = {name: _column(table[name], sch.field(name).type) for name in sch.names}
    return pa.table(cols, schema=sch).sort_by([(schema.IMAGE_ID, "ascending")])


def _column(col: pa.ChunkedArray, typ: pa.DataType) -> pa.Array:
    """Ray Data's tensor columns -> ``fixed_size_list<float32>[D]``; other columns cast to ``typ``."""
    if not pa.types.is_fixed_size_list(typ):
        return col.combine_chunks().cast(typ) if len(col) else pa.array([], typ)
    if not len(col):
        return pa.array([], typ)
    flat = np.concatenate([np.asarray(c.to_numpy_ndarray()).reshape(len(c), -1) for c in col.chunks])  # [N, D]
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float32).ravel()), typ.list_size)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())
