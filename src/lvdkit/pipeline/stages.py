"""The curation stages, and where each one runs.

Stage code (``lvdkit.curation``) is plain functions on Arrow tables; this module binds each to an execution shape:
ingest is per-file work, split into shards that Ray Data maps in parallel (one resumable part file per shard); the
dedup stages are whole-dataset fits, one Ray task each.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit import schema
from lvdkit.config import CurateConfig
from lvdkit.curation.dedup_exact import dedup_exact
from lvdkit.curation.dedup_phash import dedup_phash
from lvdkit.curation.ingest import ingest_files, list_inputs
from lvdkit.pipeline.io import read_parts
from lvdkit.pipeline.manifest import fingerprint_of, success
from lvdkit.pipeline.names import CURATE_ORDER
from lvdkit.pipeline.views import alive

LISTING = "_listing.parquet"


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
    plan: Callable[[CurateConfig, Path], Plan]
    shard_fn: Callable[[CurateConfig, Path], Callable[[int], pa.Table]] | None = None  # (cfg, stage_dir) -> fn(i)
    whole_fn: Callable[[CurateConfig, Path], tuple[pa.Table, dict[str, Any]]] | None = None  # (cfg, out)
    stats_fn: Callable[[Path], dict[str, Any]] | None = None  # summary stats of a finished sharded stage


# --- ingest -------------------------------------------------------------------------------------------------------


def _plan_ingest(cfg: CurateConfig, out: Path) -> Plan:
    """List the inputs into a temporary listing file (row group = shard) and fingerprint names, sizes, mtimes."""
    tmp = out / f".{LISTING}.tmp-{os.getpid()}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.blake2b(digest_size=8)
    per_shard = cfg.ingest.files_per_shard
    if per_shard < 1:
        raise ValueError(f"ingest.files_per_shard must be >= 1, got {per_shard}")
    n_files, buf = 0, []
    with pq.ParquetWriter(tmp, pa.schema([(schema.URI, pa.string())])) as writer:
        for uri in list_inputs(cfg.ingest.inputs, cfg.ingest.extensions):
            h.update(_file_identity(uri).encode("utf-8", "surrogateescape"))
            buf.append(uri)
            if len(buf) == per_shard:
                writer.write_table(pa.table({schema.URI: buf}), row_group_size=per_shard)
                n_files, buf = n_files + len(buf), []
        if buf:
            writer.write_table(pa.table({schema.URI: buf}), row_group_size=per_shard)
            n_files += len(buf)
    n_shards = -(-n_files // per_shard)
    return Plan(fingerprint=f"{h.hexdigest()}-{n_files}", n_shards=n_shards, staged_files=((tmp, LISTING),))


def _file_identity(uri: str) -> str:
    """Name, size and mtime: enough to notice an added, removed or rewritten file without reading it."""
    if "://" in uri:
        return uri + "\n"
    try:
        st = os.lstat(uri)
    except OSError:
        return f"{uri}|missing\n"
    return f"{uri}|{st.st_size}|{st.st_mtime_ns}\n"


def _ingest_shard(cfg: CurateConfig, stage_dir: Path) -> Callable[[int], pa.Table]:
    return partial(_ingest_one_shard, stage_dir / LISTING, cfg)


def _ingest_one_shard(listing: Path, cfg: CurateConfig, index: int) -> pa.Table:
    uris = pq.ParquetFile(listing).read_row_group(index)[schema.URI].to_pylist()
    return ingest_files(uris, cfg.ingest)


def _ingest_stats(stage_dir: Path) -> dict[str, Any]:
    table = read_parts(stage_dir, columns=["status", "error"], schema=schema.INGEST)
    quarantined = table.filter(pc.equal(table["status"], schema.STATUS_QUARANTINED))
    reasons = pc.value_counts(quarantined["error"]).to_pylist()
    return {
        "ok": table.num_rows - quarantined.num_rows,
        "quarantined": quarantined.num_rows,
        "quarantined_by_reason": {r["values"]: r["counts"] for r in sorted(reasons, key=lambda r: str(r["values"]))},
    }


# --- dedup stages -------------------------------------------------------------------------------------------------


def _plan_after(*upstream: str) -> Callable[[CurateConfig, Path], Plan]:
    def plan(cfg: CurateConfig, out: Path) -> Plan:
        return Plan(fingerprint=fingerprint_of(*(success(out / s) for s in upstream)))

    return plan


def _whole_dedup_exact(cfg: CurateConfig, out: Path) -> tuple[pa.Table, dict[str, Any]]:
    images = alive(out, (), [schema.URI, "content_hash"])
    table = dedup_exact(images, cfg.dedup_exact)
    return table, _dedup_stats(table, {})


def _whole_dedup_phash(cfg: CurateConfig, out: Path) -> tuple[pa.Table, dict[str, Any]]:
    images = alive(out, ("dedup_exact",), ["phash", "width", "height"])
    table, stats = dedup_phash(images, cfg.dedup_phash)
    return table, _dedup_stats(table, stats)


def _dedup_stats(table: pa.Table, extra: dict[str, Any]) -> dict[str, Any]:
    kept = int(np.count_nonzero(table[schema.KEEP].to_numpy(zero_copy_only=False))) if table.num_rows else 0
    return {"in": table.num_rows, "kept": kept, "duplicates": table.num_rows - kept, **extra}


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec(
            name="ingest",
            upstream=(),
            section=lambda c: c.ingest,
            plan=_plan_ingest,
            shard_fn=_ingest_shard,
            stats_fn=_ingest_stats,
        ),
        StageSpec(
            name="dedup_exact",
            upstream=("ingest",),
            section=lambda c: c.dedup_exact,
            plan=_plan_after("ingest"),
            whole_fn=_whole_dedup_exact,
        ),
        StageSpec(
            name="dedup_phash",
            upstream=("ingest", "dedup_exact"),
            section=lambda c: c.dedup_phash,
            plan=_plan_after("ingest", "dedup_exact"),
            whole_fn=_whole_dedup_phash,
        ),
    )
}
assert tuple(STAGES) == CURATE_ORDER, "lvdkit.pipeline.names.CURATE_ORDER must list STAGES in order"
