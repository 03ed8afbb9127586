"""Running stages on Ray: skip what is finished, resume what was interrupted, record what was done.

Per-shard stages go through Ray Data (``map_batches`` over the pending shard indices, each task writing one part
file atomically); whole-dataset stages are one Ray task. Outputs live on a path every Ray node can read and write.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from lvdkit import schema
from lvdkit.config import CurateConfig, config_hash, save_config, to_dict
from lvdkit.pipeline import faults
from lvdkit.pipeline.io import part_files, part_name, remove_temporaries, write_parquet_atomic
from lvdkit.pipeline.manifest import RunKey, finish, prepare, success, write_json_atomic
from lvdkit.pipeline.names import CURATE_ORDER, stage_dirname, stage_names
from lvdkit.pipeline.ray_env import LazyRay, ray_session
from lvdkit.pipeline.stages import STAGES, StageSpec
from lvdkit.pipeline.views import DEDUP_STAGES, final_status

WHOLE_STAGE_PART_ROWS = 1_000_000  # whole-dataset outputs are split into parts of this many rows


def log(msg: str) -> None:
    """Progress messages go to stderr so stdout stays clean for the final result."""
    print(f"[lvdkit] {msg}", file=sys.stderr, flush=True)


def run_stage(name: str, cfg: CurateConfig, ray_: LazyRay, force: bool = False) -> dict[str, Any]:
    """Run one stage, starting Ray only if there is work; returns its ``_SUCCESS`` record plus ``skipped``."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; valid stages: {stage_names()}")
    spec = STAGES[name]
    out = Path(cfg.out)
    for up in spec.upstream:
        if success(out / stage_dirname(up)) is None:
            raise RuntimeError(
                f"stage {name!r} needs the output of {up!r}, which has not finished in {out}: "
                f"run `lvdkit run {up}` (or `lvdkit curate`) first"
            )
    stage_dir = out / stage_dirname(name)
    start = time.time()
    plan = spec.make_plan(cfg, out)
    key = RunKey(config_hash(spec.section(cfg)), plan.fingerprint)
    action = prepare(stage_dir, key, force)
    for tmp, target in plan.staged_files:
        if action == "skip":
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, stage_dir / target)
    if action == "skip":
        record = success(stage_dir) or {}
        log(f"{name}: up to date ({record.get('rows')} rows), skipped")
        return {**record, "skipped": True}
    remove_temporaries(stage_dir)
    log(f"{name}: {'resuming' if action == 'resume' else 'running'}")
    ray_.ensure()
    if spec.shard_fn is not None or spec.shard_runner is not None:
        rows, stats = _run_sharded(spec, cfg, stage_dir, plan.n_shards)
    else:
        rows, stats = _run_whole(spec, cfg, out, stage_dir)
    record = finish(stage_dir, name, key, to_dict(spec.section(cfg)), rows, time.time() - start, stats)
    log(f"{name}: {rows} rows in {record['seconds']:.1f}s -> {stage_dir}")
    return {**record, "skipped": False}


def _run_sharded(spec: StageSpec, cfg: CurateConfig, stage_dir: Path, n_shards: int) -> tuple[int, dict[str, Any]]:
    done = {p.name for p in part_files(stage_dir)}
    pending = [i for i in range(n_shards) if part_name(i) not in done]
    if done:
        log(f"{spec.name}: {len(done)} of {n_shards} shards already done, {len(pending)} to go")
    if pending and spec.shard_runner is not None:
        spec.shard_runner(cfg, stage_dir, pending, n_shards)
    elif pending:
        assert spec.shard_fn is not None
        fn = spec.shard_fn(cfg, stage_dir)
        ds = ray.data.from_items([{"shard": i} for i in pending], override_num_blocks=len(pending))
        results = ds.map_batches(
            _write_shards,  # type: ignore[arg-type]
            fn_kwargs={"fn": fn, "stage_dir": str(stage_dir), "delay": faults.shard_delay()},
            batch_size=1,
            num_cpus=1,
        )
        with tqdm(total=len(pending), desc=spec.name, unit="shard", disable=not cfg.progress, file=sys.stderr) as bar:
            for row in results.iter_rows():
                bar.update(1)
                bar.set_postfix(rows=int(row["rows"]), refresh=False)
    missing = [i for i in range(n_shards) if not (stage_dir / part_name(i)).exists()]
    if missing:
        raise RuntimeError(f"{spec.name}: shards {missing[:10]} produced no output")
    rows = sum(_parquet_rows(p) for p in part_files(stage_dir))
    stats = spec.stats_fn(stage_dir) if spec.stats_fn else {}
    return rows, stats


def _write_shards(batch: dict[str, np.ndarray], fn: Any, stage_dir: str, delay: float) -> dict[str, np.ndarray]:
    """Ray Data UDF: process each shard index in the batch and write its part file atomically (idempotent)."""
    rows = []
    for index in batch["shard"]:
        time.sleep(delay)
        table = fn(int(index))
        write_parquet_atomic(table, Path(stage_dir) / part_name(int(index)))
        rows.append(table.num_rows)
    return {"shard": batch["shard"], "rows": np.asarray(rows, dtype=np.int64)}


def _run_whole(spec: StageSpec, cfg: CurateConfig, out: Path, stage_dir: Path) -> tuple[int, dict[str, Any]]:
    task = ray.remote(num_cpus=1, max_retries=cfg.ray.max_task_retries)(_whole_task)
    return ray.get(task.remote(spec.name, cfg, str(out), str(stage_dir)))  # type: ignore[no-any-return]


def _whole_task(name: str, cfg: CurateConfig, out: str, stage_dir: str) -> tuple[int, dict[str, Any]]:
    spec = STAGES[name]
    assert spec.whole_fn is not None
    table, stats = spec.whole_fn(cfg, Path(out))
    for k, start in enumerate(range(0, max(table.num_rows, 1), WHOLE_STAGE_PART_ROWS)):
        write_parquet_atomic(table.slice(start, WHOLE_STAGE_PART_ROWS), Path(stage_dir) / part_name(k))
    return table.num_rows, stats


def _parquet_rows(path: Path) -> int:
    return int(pq.ParquetFile(path).metadata.num_rows)


def run(cfg: CurateConfig, stages: tuple[str, ...] = CURATE_ORDER, force: bool = False) -> dict[str, Any]:
    """Run ``stages`` in order in one Ray session; write ``config.yaml``, ``status.parquet`` and ``summary.json``."""
    check_embedding_keys(cfg, stages)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    with ray_session(out, cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory_mb) as lazy:
        for name in stages:
            run_stage(name, cfg, lazy, force=force)
    return write_summary(out)


def check_embedding_keys(cfg: CurateConfig, stages: tuple[str, ...]) -> None:
    """Fail before any work when a stage reads an embedding that embed.models does not produce."""
    wanted = {
        "dedup_copy": cfg.dedup_copy.embedding,
        "dedup_relative": cfg.dedup_relative.embedding if cfg.dedup_relative.protected else None,
        "cluster": cfg.cluster.embedding,
        "retrieve": cfg.retrieve.embedding if cfg.retrieve.seed_sets else None,
        "shard": cfg.shard.embedding,
    }
    bad = {s: k for s, k in wanted.items() if s in stages and k is not None and k not in cfg.embed.models}
    if bad:
        listing = ", ".join(f"{s}.embedding={k!r}" for s, k in bad.items())
        raise ValueError(
            f"{listing}: not a key of embed.models ({', '.join(cfg.embed.models) or 'none'}); "
            "add the model to embed.models or point these keys at one that is there"
        )


def write_summary(out: Path) -> dict[str, Any]:
    """``OUT/status.parquet`` (one final row per input file) and ``OUT/summary.json`` (the funnel)."""
    finished = [s for s in CURATE_ORDER if success(out / stage_dirname(s)) is not None]
    if "ingest" not in finished:
        raise RuntimeError(f"no finished ingest in {out}: nothing to summarise")
    dedup = tuple(s for s in DEDUP_STAGES if s in finished)
    status = final_status(out, dedup)
    write_parquet_atomic(status, out / "status.parquet")
    st = status["status"].to_numpy(zero_copy_only=False)
    reasons = status["reason"].to_numpy(zero_copy_only=False)
    quarantined = reasons[st == schema.STATUS_QUARANTINED]
    removed_by = reasons[st == schema.FINAL_DUPLICATE]
    stage_records = {s: success(out / stage_dirname(s)) or {} for s in finished}
    summary = {
        "images_in": len(st),
        "kept": int((st == schema.FINAL_KEPT).sum()),
        "duplicates": int((st == schema.FINAL_DUPLICATE).sum()),
        "quarantined": len(quarantined),
        "duplicates_by_stage": {s: int((removed_by == s).sum()) for s in dedup},
        "quarantined_by_reason": {r: int((quarantined == r).sum()) for r in sorted(set(quarantined))},
        "curated": stage_records["shard"].get("rows") if "shard" in stage_records else None,
        "stages": {
            s: {"rows": r.get("rows"), "seconds": r.get("seconds"), "stats": r.get("stats", {})}
            for s, r in stage_records.items()
        },
        "outputs": {"status": str(out / "status.parquet"), **{s: str(out / stage_dirname(s)) for s in finished}},
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
