"""The curation stages, and where each one runs.

Stage code (``lvdkit.curation``) is plain functions on Arrow tables; this module binds each to an execution shape:
ingest is per-file work, split into shards that Ray Data maps in parallel (one resumable part file per shard); the
dedup stages are whole-dataset fits, one Ray task each.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit.cluster.stage import cluster_images
from lvdkit.core import schema
from lvdkit.core.files import MAX_FILE_BYTES, content_hash, image_id, list_inputs, local_path, read_bytes
from lvdkit.core.io import disk_errors, part_files, read_parts, write_parquet_atomic
from lvdkit.core.whitening import Whitener
from lvdkit.curation.dedup_copy import dedup_copy
from lvdkit.curation.dedup_exact import dedup_exact
from lvdkit.curation.dedup_phash import dedup_phash
from lvdkit.curation.dedup_relative import dedup_relative
from lvdkit.curation.ingest import IngestConfig, ingest_files, list_for_ingest
from lvdkit.curation.retrieve import RETRIEVED, SAMPLE, cluster_retrieval, resolve_mode, sample_retrieval
from lvdkit.curation.shard import ShardConfig, fetch_images, merge_selections
from lvdkit.embeddings.stage import PIXELS_PREFIX, decode_batch
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.embed import CALIBRATION_DIR, SHARD, run_embed
from lvdkit.pipeline.faults import Hooks
from lvdkit.pipeline.manifest import fingerprint_of, success
from lvdkit.pipeline.names import CURATE_ORDER, stage_dirname
from lvdkit.pipeline.views import DEDUP_STAGES, alive, dedups_before, ingested

QUARANTINE_DIR = "_quarantined"  # rows a sharded stage left out (on_shard_error=quarantine), one part per shard
LISTING = "_listing"  # the work list (Parquet); no .parquet suffix so `*.parquet` globs see only outputs
PROTECTED = "protected.parquet"  # dedup_relative: the protected images as ingested (ids, uris, status)
WHITENING = "whitening.npz"  # dedup_copy's fitted descriptor post-processing (reused by dedup_relative)


@dataclass(frozen=True)
class Plan:
    """What a stage will do: the fingerprint of its inputs, and for sharded stages how many shards."""

    fingerprint: str
    n_shards: int = 0  # 0: a whole-dataset stage (one task)
    staged_files: tuple[tuple[Path, str], ...] = ()  # (temporary file, name to move it to inside the stage dir)


@dataclass(frozen=True)
class StageSpec:
    """A stage: its config section, how to plan it, and either a per-shard or a whole-dataset function."""

    name: str
    upstream: tuple[str, ...]
    section: Callable[[CurateConfig], Any]
    plan: Callable[[CurateConfig, Path], Plan] | None = None  # default: fingerprint of the upstream outputs
    shard_work: Callable[[CurateConfig, Path], ShardWork] | None = None  # (cfg, stage_dir) -> per-shard work
    shard_runner: Callable[[CurateConfig, Path, list[int], int], None] | None = None  # runs pending shards itself
    whole_fn: Callable[[CurateConfig, Path], tuple[pa.Table, dict[str, Any]]] | None = None  # (cfg, out)
    stats_fn: Callable[[Path], dict[str, Any]] | None = None  # summary stats of a finished sharded stage

    def make_plan(self, cfg: CurateConfig, out: Path) -> Plan:
        """The stage's plan: its own, or (whole-dataset stages) the identity of the upstream outputs it reads."""
        if self.plan is not None:
            return self.plan(cfg, out)
        return Plan(fingerprint=fingerprint_of(*(success(out / stage_dirname(s)) for s in self.upstream)))


# --- ingest -------------------------------------------------------------------------------------------------------


class ShardWork:
    """A sharded stage's work as its shard tasks run it: load a shard's rows, process any subset of them (the whole
    shard; one row at a time when the runner looks for the rows that fail), name them, and stand in for a row that
    cannot be processed (``on_shard_error=quarantine``)."""

    def load(self, index: int) -> pa.Table:
        raise NotImplementedError

    def process(self, rows: pa.Table) -> pa.Table:
        raise NotImplementedError

    def uris(self, rows: pa.Table) -> list[str]:
        return [str(u) for u in rows[schema.URI].to_pylist()]

    def quarantined(self, rows: pa.Table, reason: str, detail: str) -> pa.Table | None:
        """Output rows standing for ``rows`` that failed; ``None``: they are left out (and listed by the runner)."""
        return None


OUTSIDE = "outside"  # ingest listing: real path of a symlink leading out of the inputs (null: read the file)


def _plan_ingest(cfg: CurateConfig, out: Path) -> Plan:
    """List the inputs into a temporary listing file (row group = shard) and fingerprint names, sizes, mtimes."""
    tmp = out / f".{LISTING}.tmp-{os.getpid()}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.blake2b(digest_size=8)
    per_shard = cfg.ingest.files_per_shard
    if per_shard < 1:
        raise ValueError(f"ingest.files_per_shard must be >= 1, got {per_shard}")
    n_files, buf, links = 0, [], []
    sch = pa.schema([(schema.URI, pa.string()), (OUTSIDE, pa.string())])
    with disk_errors(tmp), pq.ParquetWriter(tmp, sch) as writer:
        for uri, outside in list_for_ingest(cfg.ingest.inputs, cfg.ingest):
            h.update(_file_identity(uri).encode("utf-8", "surrogateescape"))
            buf.append(uri)
            links.append(outside)
            if len(buf) == per_shard:
                writer.write_table(pa.table({schema.URI: buf, OUTSIDE: links}, sch), row_group_size=per_shard)
                n_files, buf, links = n_files + len(buf), [], []
        if buf:
            writer.write_table(pa.table({schema.URI: buf, OUTSIDE: links}, sch), row_group_size=per_shard)
            n_files += len(buf)
    n_shards = -(-n_files // per_shard)
    return Plan(fingerprint=f"{h.hexdigest()}-{n_files}", n_shards=n_shards, staged_files=((tmp, LISTING),))


def _file_identity(uri: str) -> str:
    """Name, size and mtime (of a symlink and of its target): enough to notice an added, removed or rewritten file
    without reading it."""
    if "://" in uri:
        return uri + "\n"
    path = local_path(uri)
    try:
        st = os.lstat(path)
    except OSError:
        return f"{uri}|missing\n"
    ident = f"{uri}|{st.st_size}|{st.st_mtime_ns}"
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
            ident += f"|{target.st_size}|{target.st_mtime_ns}"
        except OSError:
            ident += "|dangling"
    return ident + "\n"


@dataclass(frozen=True)
class IngestWork(ShardWork):
    """Ingest shard ``i``: row group ``i`` of the listing."""

    listing: Path
    cfg: IngestConfig

    def load(self, index: int) -> pa.Table:
        return pq.ParquetFile(self.listing).read_row_group(index)

    def process(self, rows: pa.Table) -> pa.Table:
        outside = rows[OUTSIDE].to_pylist() if OUTSIDE in rows.column_names else None
        return ingest_files(self.uris(rows), self.cfg, outside)

    def quarantined(self, rows: pa.Table, reason: str, detail: str) -> pa.Table:
        status = schema.STATUS_QUARANTINED
        records = [
            {schema.IMAGE_ID: image_id(u), schema.URI: u, "status": status, "error": reason, "error_detail": detail}
            for u in self.uris(rows)
        ]
        return pa.Table.from_pylist(records, schema=schema.INGEST)


def _ingest_work(cfg: CurateConfig, stage_dir: Path) -> ShardWork:
    return IngestWork(stage_dir / LISTING, cfg.ingest)


def _ingest_stats(stage_dir: Path) -> dict[str, Any]:
    """Counts per part (the driver never holds the whole table)."""
    total, reasons = 0, Counter[str]()
    for part in part_files(stage_dir):
        table = pq.read_table(part, columns=["status", "error"])
        total += table.num_rows
        quarantined = table.filter(pc.equal(table["status"], schema.STATUS_QUARANTINED))
        reasons.update({str(r["values"]): int(r["counts"]) for r in pc.value_counts(quarantined["error"]).to_pylist()})
    n_quarantined = sum(reasons.values())
    return {
        "ok": total - n_quarantined,
        "quarantined": n_quarantined,
        "quarantined_by_reason": dict(sorted(reasons.items())),
    }


# --- dedup stages -------------------------------------------------------------------------------------------------


def _whole_dedup_exact(cfg: CurateConfig, out: Path) -> tuple[pa.Table, dict[str, Any]]:
    images = alive(out, dedups_before("dedup_exact"), [schema.URI, "content_hash"])
    table = dedup_exact(images, cfg.dedup_exact)
    return table, _dedup_stats(table, {})


def _whole_dedup_phash(cfg: CurateConfig, out: Path) -> tuple[pa.Table, dict[str, Any]]:
    images = alive(out, dedups_before("dedup_phash"), ["phash", "width", "height"])
    table, stats = dedup_phash(images, cfg.dedup_phash)
    return table, _dedup_stats(table, stats)


def _dedup_stats(table: pa.Table, extra: dict[str, Any]) -> dict[str, Any]:
    kept = int(np.count_nonzero(table[schema.KEEP].to_numpy(zero_copy_only=False))) if table.num_rows else 0
    return {"in": table.num_rows, "kept": kept, "duplicates": table.num_rows - kept, **extra}


# --- embed ------------------------------------------------------------------------------------------------------


def _plan_embed(cfg: CurateConfig, out: Path) -> Plan:
    """Shard the images that survived the cheap dedups; the listing (row group = shard) is the work list."""
    upstream = ("ingest", "dedup_exact", "dedup_phash")
    images = alive(out, dedups_before("dedup_copy"), [schema.URI])  # embed sits between phash and copy dedup
    per_shard = cfg.embed.images_per_shard
    if per_shard < 1:
        raise ValueError(f"embed.images_per_shard must be >= 1, got {per_shard}")
    shard = np.arange(images.num_rows, dtype=np.int64) // per_shard
    listing = images.append_column(SHARD, pa.array(shard))
    tmp = out / f".embed{LISTING}.tmp-{os.getpid()}"
    pq.write_table(listing, tmp, row_group_size=per_shard)
    n_shards = int(shard[-1]) + 1 if len(shard) else 0
    return Plan(fingerprint_of(*(success(out / s) for s in upstream)), n_shards, ((tmp, LISTING),))


def _run_embed_shards(cfg: CurateConfig, stage_dir: Path, pending: list[int], n_shards: int) -> None:
    total = pq.ParquetFile(stage_dir / LISTING).metadata.num_rows
    hooks = Hooks.for_stage("embed")
    run_embed(cfg.embed, stage_dir / LISTING, stage_dir, pending, cfg.progress, total, cfg.ray.max_task_retries, hooks)


def _embed_stats(stage_dir: Path) -> dict[str, Any]:
    first = next(iter(sorted(stage_dir.glob("part-*.parquet"))), None)
    dims = {}
    if first is not None:
        for f in pq.read_schema(first):
            if f.name.startswith(schema.EMBEDDING_PREFIX):
                dims[f.name[len(schema.EMBEDDING_PREFIX) :]] = f.type.list_size
    copies = sum(pq.ParquetFile(p).metadata.num_rows for p in (stage_dir / CALIBRATION_DIR).glob("part-*.parquet"))
    return {"dims": dims, "calibration_copies": copies}


# --- dedup_copy ---------------------------------------------------------------------------------------------------


def embeddings_of(
    out: Path, key: str, ids: pa.Array | pa.ChunkedArray, calibration: bool = False, allow_missing: bool = False
) -> np.ndarray:
    """Embeddings of model ``key`` for ``ids`` (in that order), as a [N, D] float32 array (zeros where missing and
    ``allow_missing``)."""
    col = schema.embedding_column(key)
    stage = out / "embed" / (CALIBRATION_DIR if calibration else "")
    parts = part_files(stage)
    if parts and col not in pq.read_schema(parts[0]).names:
        raise ValueError(f"no embeddings for model {key!r} in {out / 'embed'}: set it in embed.models")
    table = read_parts(stage, columns=[schema.IMAGE_ID, col])
    pos = pc.index_in(ids, value_set=table[schema.IMAGE_ID])
    missing = pc.is_null(pos).to_numpy(zero_copy_only=False)
    if missing.any() and not allow_missing:
        raise RuntimeError(f"{out / 'embed'} lacks embeddings for some images: rerun embed")
    flat = table[col].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    out_x = np.zeros((len(ids), flat.shape[1]), np.float32)
    out_x[~missing] = flat[pc.drop_null(pos).to_numpy()]
    return out_x


def _whole_dedup_copy(cfg: CurateConfig, out: Path) -> tuple[pa.Table, dict[str, Any]]:
    images = alive(out, dedups_before("dedup_copy"), ["width", "height"])
    key = cfg.dedup_copy.embedding
    emb = embeddings_of(out, key, images[schema.IMAGE_ID])
    calib = read_parts(out / "embed" / CALIBRATION_DIR, columns=[schema.IMAGE_ID])
    calib_src = pc.index_in(calib[schema.IMAGE_ID], value_set=images[schema.IMAGE_ID]).to_numpy(zero_copy_only=False)
    calib_emb = embeddings_of(out, key, calib[schema.IMAGE_ID], calibration=True) if calib.num_rows else emb[:0]
    table, stats, whitener = dedup_copy(images, emb, calib_src.astype(np.int64), calib_emb, cfg.dedup_copy)
    stage_dir = out / "dedup_copy"
    stage_dir.mkdir(parents=True, exist_ok=True)
    whitener.save(str(stage_dir / WHITENING))
    return table, _dedup_stats(table, stats)


# --- dedup_relative -----------------------------------------------------------------------------------------------

RELATIVE_UPSTREAM = ("ingest", "dedup_exact", "dedup_phash", "embed", "dedup_copy")


def _plan_relative(cfg: CurateConfig, out: Path) -> Plan:
    h = hashlib.blake2b(digest_size=8)
    h.update(fingerprint_of(*(success(out / s) for s in RELATIVE_UPSTREAM)).encode())
    for uri in list_inputs(cfg.dedup_relative.protected) if cfg.dedup_relative.protected else ():
        h.update(_file_identity(uri).encode("utf-8", "surrogateescape"))
    return Plan(fingerprint=h.hexdigest())


def _whole_dedup_relative(cfg: CurateConfig, out: Path) -> tuple[pa.Table, dict[str, Any]]:
    rel = cfg.dedup_relative
    images = alive(out, dedups_before("dedup_relative"), [])
    whitener = Whitener.load(str(out / "dedup_copy" / WHITENING))
    pool_x = whitener(embeddings_of(out, rel.embedding, images[schema.IMAGE_ID]))
    stage_dir = out / "dedup_relative"
    stage_dir.mkdir(parents=True, exist_ok=True)
    ok_ids: list[str] = []
    prot_x = np.empty((0, pool_x.shape[1]), np.float32)
    protected = None
    if rel.protected:
        protected, ok, x = _ingest_and_embed(cfg, rel.embedding, rel.protected)
        write_parquet_atomic(protected, stage_dir / PROTECTED)
        ok_ids = ok[schema.IMAGE_ID].to_pylist()
        prot_x = whitener(x)
    threshold = rel.threshold
    if threshold is None:
        threshold = float((success(out / "dedup_copy") or {})["stats"]["threshold"])
    table = dedup_relative(images[schema.IMAGE_ID], pool_x, ok_ids, prot_x, threshold)
    stats = {
        "protected": len(ok_ids),
        "protected_unusable": (protected.num_rows - len(ok_ids)) if protected is not None else 0,
        "threshold": threshold,
    }
    return table, _dedup_stats(table, stats)


def _ingest_and_embed(cfg: CurateConfig, key: str, inputs: list[str]) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """A small side set (protected images, seeds): its ingest rows (all, then usable) and the usable ones' embeddings
    with the model the pool was embedded with, computed in this process."""
    listed = list(list_for_ingest(inputs, cfg.ingest))
    rows = ingest_files([u for u, _ in listed], cfg.ingest, [o for _, o in listed]).drop_columns(
        ["image_bytes", "phash"]
    )
    ok = rows.filter(pc.equal(rows["status"], schema.STATUS_OK))
    return rows, ok, _embed_files(cfg, key, ok[schema.IMAGE_ID].to_pylist(), ok[schema.URI].to_pylist())


def _embed_files(cfg: CurateConfig, key: str, ids: list[str], uris: list[str], batch: int = 64) -> np.ndarray:
    """Embed a small file set in this process with the model the pool was embedded with."""
    from lvdkit.embeddings import create_embedder

    if key not in cfg.embed.models:
        valid = ", ".join(cfg.embed.models)
        raise ValueError(f"dedup_relative.embedding={key!r} is not a key of embed.models ({valid})")
    model = create_embedder(cfg.embed.models[key], **cfg.embed.options(key))
    out = []
    for start in range(0, len(ids), batch):
        cols = decode_batch(
            ids[start : start + batch], uris[start : start + batch], {key: model.preprocess}, 0.0, cfg.embed
        )
        out.append(model.embed(cols[PIXELS_PREFIX + key]))
    return np.concatenate(out) if out else np.empty((0, model.dim), np.float32)


# --- cluster, retrieve, shard ------------------------------------------------------------------------------------

CLUSTER_UPSTREAM = (*RELATIVE_UPSTREAM, "dedup_relative")
RETRIEVE_UPSTREAM = (*CLUSTER_UPSTREAM, "cluster")
SHARD_UPSTREAM = (*RETRIEVE_UPSTREAM, "retrieve")
SEEDS = "seeds.parquet"  # retrieve: the seed images as ingested and embedded


def _centroids_file(level: int) -> str:
    return f"centroids_level{level}.npy"


def _whole_cluster(cfg: CurateConfig, out: Path) -> tuple[pa.Table, dict[str, Any]]:
    images = alive(out, DEDUP_STAGES, [])
    x = embeddings_of(out, cfg.cluster.embedding, images[schema.IMAGE_ID])
    table, centroids, stats = cluster_images(images[schema.IMAGE_ID], x, cfg.cluster)
    stage_dir = out / "cluster"
    stage_dir.mkdir(parents=True, exist_ok=True)
    for level, c in enumerate(centroids, start=1):
        np.save(stage_dir / _centroids_file(level), c)
    return table, stats


def _aligned(ids: pa.Array | pa.ChunkedArray, table: pa.Table) -> pa.Table:
    """Rows of ``table`` (keyed by image_id) in the order of ``ids``; null rows where absent."""
    return table.take(pc.index_in(ids, value_set=table[schema.IMAGE_ID]))


def _whole_retrieve(cfg: CurateConfig, out: Path) -> tuple[pa.Table, dict[str, Any]]:
    r = cfg.retrieve
    if not r.seed_sets:
        return RETRIEVED.empty_table(), {"seed_sets": {}}
    images = alive(out, DEDUP_STAGES, [])
    ids = images[schema.IMAGE_ID]
    x = embeddings_of(out, r.embedding, ids)
    clusters = _aligned(ids, read_parts(out / "cluster", schema=schema.CLUSTER))
    level1 = np.asarray([c[0] for c in clusters[schema.CLUSTER_IDS].to_pylist()], dtype=np.int64)
    distance = clusters["distance"].to_numpy(zero_copy_only=False)
    centroids = np.load(out / "cluster" / _centroids_file(1))
    hits, seed_tables, stats = [], [], {}
    for name, seed_set in r.seed_sets.items():
        seeds, ok, sx = _ingest_and_embed(cfg, r.embedding, seed_set.inputs)
        seed_tables.append(
            ok.append_column("seed_set", pa.array([name] * ok.num_rows, pa.string())).append_column(
                "embedding", pa.FixedSizeListArray.from_arrays(pa.array(sx.ravel(), pa.float32()), sx.shape[1])
            )
        )
        mode = resolve_mode(seed_set, ok.num_rows, r)
        ids_np = ids.to_numpy(zero_copy_only=False)
        if mode == SAMPLE:
            hits.append(sample_retrieval(ids_np, x, ok[schema.IMAGE_ID].to_pylist(), sx, seed_set.k, name))
        else:
            seed_cluster = np.argmax(sx @ centroids.T, axis=1) if len(sx) else np.zeros(0, np.int64)
            hits.append(cluster_retrieval(ids_np, level1, distance, seed_cluster, name, r))
        stats[name] = {
            "seeds": ok.num_rows,
            "seeds_unusable": seeds.num_rows - ok.num_rows,
            "mode": mode,
            "retrieved": hits[-1].num_rows,
        }
    stage_dir = out / "retrieve"
    stage_dir.mkdir(parents=True, exist_ok=True)
    if seed_tables:
        write_parquet_atomic(pa.concat_tables(seed_tables), stage_dir / SEEDS)
    table = pa.concat_tables(hits) if hits else RETRIEVED.empty_table()
    return table, {"seed_sets": stats}


def _plan_shard(cfg: CurateConfig, out: Path) -> Plan:
    """Merge the selections and attach what each curated row needs but the bytes (fetched per shard)."""
    sel = (
        read_parts(out / "retrieve", schema=RETRIEVED)
        .rename_columns(["image_id", "seed_set", "seed_id", "score", "reason"])
        .select(["image_id", "reason", "seed_set", "score"])
    )
    clusters = read_parts(out / "cluster", schema=schema.CLUSTER)
    balanced = clusters.filter(clusters["balanced"])
    selections = [
        sel,
        pa.table(
            {
                "image_id": balanced[schema.IMAGE_ID],
                "reason": pa.array([schema.REASON_BALANCED] * balanced.num_rows, pa.string()),
                "seed_set": pa.nulls(balanced.num_rows, pa.string()),
                "score": pc.cast(pc.subtract(1.0, pc.cast(balanced["distance"], pa.float64())), pa.float32()),
            }
        ),
    ]
    seeds_path = out / "retrieve" / SEEDS
    seeds = pq.read_table(seeds_path) if seeds_path.exists() else None
    if cfg.shard.include_seeds and seeds is not None:
        selections.append(
            pa.table(
                {
                    "image_id": seeds[schema.IMAGE_ID],
                    "reason": pa.array([schema.REASON_SEED] * seeds.num_rows, pa.string()),
                    "seed_set": seeds["seed_set"],
                    "score": pa.array(np.ones(seeds.num_rows, np.float32)),
                }
            )
        )
    chosen = merge_selections(selections).sort_by(schema.IMAGE_ID)
    ids = chosen[schema.IMAGE_ID]
    meta_cols = [schema.IMAGE_ID, schema.URI, "format", "width", "height", "content_hash"]
    pool_meta = _aligned(ids, ingested(out, meta_cols))
    seed_meta = _aligned(ids, seeds.select(meta_cols)) if seeds is not None else None
    listing = chosen
    for col in meta_cols[1:]:
        values = pool_meta[col] if seed_meta is None else pc.coalesce(pool_meta[col], seed_meta[col])
        listing = listing.append_column(col, values)
    listing = listing.append_column(schema.CLUSTER_IDS, _aligned(ids, clusters)[schema.CLUSTER_IDS])
    key = cfg.shard.embedding
    if key is not None:
        emb = embeddings_of(out, key, ids, allow_missing=True)
        if seeds is not None:
            seed_emb = _aligned(ids, seeds.select([schema.IMAGE_ID, "embedding"]))["embedding"]
            is_seed = pc.is_valid(seed_emb).to_numpy(zero_copy_only=False)
            if is_seed.any():
                emb[is_seed] = np.stack(seed_emb.filter(pc.is_valid(seed_emb)).to_pylist())
        listing = listing.append_column(
            "embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), emb.shape[1])
        )
    per_shard = cfg.shard.rows_per_shard
    tmp = out / f".shard{LISTING}.tmp-{os.getpid()}"
    pq.write_table(listing, tmp, row_group_size=per_shard)
    n_shards = -(-listing.num_rows // per_shard)
    return Plan(fingerprint_of(*(success(out / s) for s in SHARD_UPSTREAM)), n_shards, ((tmp, LISTING),))


CHANGED = "changed_since_ingest"  # shard: the file's bytes are not the ones ingest read


class ChangedSinceIngest(RuntimeError):
    """A selected file no longer holds the bytes ingest read (edited, replaced or removed since)."""

    reason = CHANGED


@dataclass(frozen=True)
class CuratedWork(ShardWork):
    """Curated shard ``i``: fetch the bytes of row group ``i`` of the listing, checking each file is unchanged."""

    listing: Path
    cfg: ShardConfig

    def load(self, index: int) -> pa.Table:
        return pq.ParquetFile(self.listing).read_row_group(index)

    def process(self, rows: pa.Table) -> pa.Table:
        dim = rows.schema.field("embedding").type.list_size if "embedding" in rows.column_names else None
        try:
            table = fetch_images(rows, self.cfg, dim)
        except FileNotFoundError as exc:
            raise ChangedSinceIngest(f"{exc}: it was read at ingest; {_REINGEST}") from exc
        _check_unchanged(rows, table, self.cfg)
        return table


_REINGEST = "rerun `lvdkit curate`: ingest notices changed files (size, mtime) and redoes the stages after it"


def _check_unchanged(rows: pa.Table, table: pa.Table, cfg: ShardConfig) -> None:
    """Raise :class:`ChangedSinceIngest` for the first file whose bytes differ from what ingest hashed."""
    if "content_hash" not in rows.column_names:
        return
    for uri, want, data, w, h in zip(
        rows[schema.URI].to_pylist(),
        rows["content_hash"].to_pylist(),
        table["image"].to_pylist(),
        rows["width"].to_pylist(),
        rows["height"].to_pylist(),
        strict=True,
    ):
        reencoded = cfg.max_side is not None and max(w, h) > cfg.max_side  # ``data`` is not the file: read it again
        got = content_hash(read_bytes(uri, MAX_FILE_BYTES) if reencoded else data)
        if want is not None and got != want:
            raise ChangedSinceIngest(
                f"{uri} changed since ingest (its bytes differ from the ones ingested); {_REINGEST}"
            )


def _curated_work(cfg: CurateConfig, stage_dir: Path) -> ShardWork:
    return CuratedWork(stage_dir / LISTING, cfg.shard)


def _shard_stats(stage_dir: Path) -> dict[str, Any]:
    table = read_parts(stage_dir, columns=["reason", "seed_set"], schema=schema.curated_schema(None))  # may be empty
    by_reason = pc.value_counts(table["reason"]).to_pylist()
    by_set = pc.value_counts(pc.fill_null(table["seed_set"], "")).to_pylist()
    stats: dict[str, Any] = {
        "by_reason": {r["values"]: r["counts"] for r in by_reason},
        "by_seed_set": {r["values"]: r["counts"] for r in by_set if r["values"]},
    }
    left_out = part_files(stage_dir / QUARANTINE_DIR)
    if left_out:
        errors = pa.concat_tables([pq.read_table(p, columns=["error"]) for p in left_out])["error"]
        stats["quarantined"] = {r["values"]: r["counts"] for r in pc.value_counts(errors).to_pylist()}
    return stats


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec(
            name="ingest",
            upstream=(),
            section=lambda c: c.ingest,
            plan=_plan_ingest,
            shard_work=_ingest_work,
            stats_fn=_ingest_stats,
        ),
        StageSpec(
            name="dedup_exact",
            upstream=("ingest",),
            section=lambda c: c.dedup_exact,
            whole_fn=_whole_dedup_exact,
        ),
        StageSpec(
            name="dedup_phash",
            upstream=("ingest", "dedup_exact"),
            section=lambda c: c.dedup_phash,
            whole_fn=_whole_dedup_phash,
        ),
        StageSpec(
            name="embed",
            upstream=("ingest", "dedup_exact", "dedup_phash"),
            section=lambda c: c.embed,
            plan=_plan_embed,
            shard_runner=_run_embed_shards,
            stats_fn=_embed_stats,
        ),
        StageSpec(
            name="dedup_copy",
            upstream=("ingest", "dedup_exact", "dedup_phash", "embed"),
            section=lambda c: c.dedup_copy,
            whole_fn=_whole_dedup_copy,
        ),
        StageSpec(
            name="dedup_relative",
            upstream=RELATIVE_UPSTREAM,
            section=lambda c: c.dedup_relative,
            plan=_plan_relative,
            whole_fn=_whole_dedup_relative,
        ),
        StageSpec(
            name="cluster",
            upstream=CLUSTER_UPSTREAM,
            section=lambda c: c.cluster,
            whole_fn=_whole_cluster,
        ),
        StageSpec(
            name="retrieve",
            upstream=RETRIEVE_UPSTREAM,
            section=lambda c: c.retrieve,
            whole_fn=_whole_retrieve,
        ),
        StageSpec(
            name="shard",
            upstream=SHARD_UPSTREAM,
            section=lambda c: c.shard,
            plan=_plan_shard,
            shard_work=_curated_work,
            stats_fn=_shard_stats,
        ),
    )
}
assert tuple(STAGES) == CURATE_ORDER, "lvdkit.pipeline.names.CURATE_ORDER must list STAGES in order"
