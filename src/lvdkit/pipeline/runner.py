"""Running stages on Ray: skip what is finished, resume what was interrupted, record what was done.

Per-shard stages go through Ray Data (``map_batches`` over the pending shard indices, each task writing one part
file atomically); whole-dataset stages are one Ray task. Outputs live on a path every Ray node can read and write.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from lvdkit.core import schema
from lvdkit.core.files import image_id
from lvdkit.core.io import (
    DiskFullError,
    disk_errors,
    is_disk_full,
    own_name,
    part_files,
    part_name,
    read_json,
    remove_temporaries,
    write_json_atomic,
    write_parquet_atomic,
)
from lvdkit.core.ray_env import LazyRay, ray_session
from lvdkit.core.settings import config_hash, save_config, to_dict
from lvdkit.pipeline import faults
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.embed import EmbedInputError
from lvdkit.pipeline.manifest import RunKey, fingerprint_of, finish, prepare, success
from lvdkit.pipeline.names import CURATE_ORDER, stage_dirname, stage_names
from lvdkit.pipeline.stages import QUARANTINE_DIR, STAGES, ChangedSinceIngest, ShardWork, StageSpec
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
            os.replace(tmp, stage_dir / own_name(target))
    if action == "skip":
        record = success(stage_dir) or {}
        log(f"{name}: up to date ({record.get('rows')} rows), skipped")
        return {**record, "skipped": True}
    remove_temporaries(stage_dir)
    log(f"{name}: {'resuming' if action == 'resume' else 'running'}")
    ray_.ensure()
    if spec.shard_work is not None or spec.shard_runner is not None:
        rows, stats = _run_sharded(spec, cfg, stage_dir, plan.n_shards)
    else:
        rows, stats = _run_whole(spec, cfg, out, stage_dir)
    record = finish(stage_dir, name, key, to_dict(spec.section(cfg)), rows, time.time() - start, stats)
    log(f"{name}: {rows} rows in {record['seconds']:.1f}s -> {stage_dir}")
    return {**record, "skipped": False}


class StageError(RuntimeError):
    """A stage could not finish; the message names the shards and files and says what to do."""


def _run_sharded(spec: StageSpec, cfg: CurateConfig, stage_dir: Path, n_shards: int) -> tuple[int, dict[str, Any]]:
    done = {p.name for p in part_files(stage_dir)}
    pending = [i for i in range(n_shards) if part_name(i) not in done]
    if done:
        log(f"{spec.name}: {len(done)} of {n_shards} shards already done, {len(pending)} to go")
    hooks = faults.Hooks.for_stage(spec.name)
    retries = max(0, cfg.ray.max_task_retries)
    if pending and spec.shard_runner is not None:
        try:
            spec.shard_runner(cfg, stage_dir, pending, n_shards)
        except Exception as exc:
            _raise_own(exc)
            raise
    elif pending:
        assert spec.shard_work is not None
        _map_shards(spec, cfg, stage_dir, pending, hooks, retries)
    missing = [i for i in range(n_shards) if not (stage_dir / part_name(i)).exists()]
    if missing:
        raise StageError(f"{spec.name}: shards {missing[:10]} produced no output")
    rows = sum(_parquet_rows(p) for p in part_files(stage_dir))
    stats = spec.stats_fn(stage_dir) if spec.stats_fn else {}
    return rows, stats


def _map_shards(
    spec: StageSpec, cfg: CurateConfig, stage_dir: Path, pending: list[int], hooks: faults.Hooks, retries: int
) -> None:
    """One Ray Data task per pending shard. A worker that dies is retried by Ray (``ray.max_task_retries``); a shard
    that raises is retried inside its task, then handled per ``on_shard_error``. Failed shards are reported after
    the others have finished (and are kept)."""
    assert spec.shard_work is not None
    work = spec.shard_work(cfg, stage_dir)
    ds = ray.data.from_items([{"shard": i} for i in pending], override_num_blocks=len(pending))
    results = ds.map_batches(
        _write_shards,  # type: ignore[arg-type]
        fn_kwargs={
            "work": work,
            "stage_dir": str(stage_dir),
            "hooks": hooks,
            "retries": retries,
            "on_error": cfg.on_shard_error,
        },
        batch_size=1,
        num_cpus=1,
        max_retries=retries,  # Ray Data's default retries a dying worker forever
    )
    failures: list[str] = []
    try:
        with tqdm(total=len(pending), desc=spec.name, unit="shard", disable=not cfg.progress, file=sys.stderr) as bar:
            for row in results.iter_rows():
                if row["disk_full"]:
                    raise DiskFullError(str(row["disk_full"]))
                if row["error"]:
                    failures.append(str(row["error"]))
                bar.update(1)
                bar.set_postfix(rows=int(row["rows"]), refresh=False)
    except (DiskFullError, StageError):
        raise
    except Exception as exc:
        _raise_own(exc)
        raise StageError(_crash_message(spec.name, stage_dir, work, retries, exc)) from exc
    if failures:
        raise StageError(
            f"{spec.name}: {len(failures)} of {len(pending)} shards failed on all {retries + 1} attempts "
            f"(on_shard_error={cfg.on_shard_error}):\n  "
            + "\n  ".join(failures[:20])
            + ("\n  ..." if len(failures) > 20 else "")
            + "\nThe other shards finished and are kept. Fix or remove these files (or set on_shard_error=quarantine) "
            "and rerun: only the failed shards are redone."
        )


_OWN_ERRORS = (DiskFullError, StageError, ChangedSinceIngest, EmbedInputError)


def _raise_own(exc: BaseException) -> None:
    """Re-raise the lvdkit error (disk full, a stage's own message) that Ray wrapped into ``exc``, if any, without
    Ray's wrapping (its remote traceback is noise next to a message written for the user)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ray.exceptions.RayTaskError):  # also an instance of its cause's class: look at the cause
            todo.append(e.cause)
            continue
        if isinstance(e, _OWN_ERRORS) and e is not exc:
            raise next(c for c in _OWN_ERRORS if isinstance(e, c))(str(e)) from None
        if isinstance(e, OSError) and is_disk_full(e):
            raise DiskFullError.writing(getattr(e, "filename", None) or "an output", e) from None
        todo.extend([e.__cause__, e.__context__])
    # Ray Data passes a UDF's exception on as text only: find the last line of its traceback.
    found = _OWN_ERROR_LINE.findall(str(exc))
    if found:
        name, message = found[-1]
        raise next(c for c in _OWN_ERRORS if c.__name__ == name)(message) from None


_OWN_ERROR_LINE = re.compile(
    r"^lvdkit\.[\w.]+\.(" + "|".join(c.__name__ for c in _OWN_ERRORS) + r"): (.+)$", re.MULTILINE
)


def _crash_message(stage: str, stage_dir: Path, work: ShardWork, retries: int, exc: BaseException) -> str:
    """A shard task that Ray gave up on (its worker died on every attempt, or an error escaped it): name the shards
    that were running, from their in-flight markers."""
    running = sorted(int(p.name.split("-")[1].split(".")[0]) for p in stage_dir.glob(f".part-*{_INFLIGHT}"))
    lines = [f"{stage}: a shard task failed on all {retries + 1} attempts (its worker died, or: {_last_line(exc)})"]
    for index in running[:10]:
        try:
            uris = work.uris(work.load(index))
        except Exception:  # naming the files is a courtesy; the error above is the news
            uris = []
        lines.append(f"  shard {index} was running: {_some(uris)}")
    lines.append("Finished shards are kept; rerun to retry the rest.")
    return "\n".join(lines)


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:500] if text else type(exc).__name__


def _some(uris: list[str], limit: int = 3) -> str:
    return ", ".join(uris[:limit]) + (f" and {len(uris) - limit} more" if len(uris) > limit else "")


_INFLIGHT = ".tmp-inflight"  # .part-NNNNNN.parquet.tmp-inflight: the shard is being worked on (removed after)


def _write_shards(
    batch: dict[str, np.ndarray], work: ShardWork, stage_dir: str, hooks: faults.Hooks, retries: int, on_error: str
) -> dict[str, np.ndarray]:
    """Ray Data UDF: process each shard index in the batch and write its part file atomically (idempotent).

    Returns per shard its rows, and an error message instead when it failed (``on_error=fail``) or the disk is full.
    """
    rows, errors, disk = [], [], []
    for index in map(int, batch["shard"]):
        target = Path(stage_dir) / part_name(index)
        marker = target.parent / f".{target.name}{_INFLIGHT}"
        n, error, full = 0, "", ""
        try:
            marker.touch()
            hooks.before_shard()
            table, left_out, error = _process_shard(work, index, hooks, retries, on_error)
            if table is not None:
                if left_out is not None:  # before the part: the part's existence marks the shard done
                    faults.write_part(left_out, target.parent / QUARANTINE_DIR / target.name, hooks)
                faults.write_part(table, target, hooks)
                n = table.num_rows
        except DiskFullError as exc:
            full = str(exc)
        finally:
            marker.unlink(missing_ok=True)
        rows.append(n)
        errors.append(error)
        disk.append(full)
    return {
        "shard": batch["shard"],
        "rows": np.asarray(rows, dtype=np.int64),
        "error": np.asarray(errors, dtype=object),
        "disk_full": np.asarray(disk, dtype=object),
    }


def _process_shard(
    work: ShardWork, index: int, hooks: faults.Hooks, retries: int, on_error: str
) -> tuple[pa.Table | None, pa.Table | None, str]:
    """(part table, rows left out, error): the whole shard, retried; then, if it keeps failing, row by row to find
    the rows that fail on their own, which fail the shard or are quarantined."""
    last: BaseException | None = None
    rows = None
    for _ in range(retries + 1):
        try:
            rows = work.load(index) if rows is None else rows
            hooks.check(index, work.uris(rows))
            return work.process(rows), None, ""
        except Exception as exc:
            if is_disk_full(exc):
                raise DiskFullError.writing(getattr(exc, "filename", None) or f"shard {index}", exc) from exc
            last = exc
    if rows is None:
        return None, None, f"shard {index}: cannot read its work list: {_describe(last)}"
    pieces, bad, left_out = [], [], []
    for k in range(rows.num_rows):
        item = rows.slice(k, 1)
        try:
            hooks.check(index, work.uris(item))
            pieces.append(work.process(item))
        except Exception as exc:
            if is_disk_full(exc):
                raise DiskFullError.writing(getattr(exc, "filename", None) or f"shard {index}", exc) from exc
            bad.append((work.uris(item)[0], exc))
            if on_error == "quarantine":
                reason = str(getattr(exc, "reason", schema.REASON_PROCESSING))
                stand_in = work.quarantined(item, reason, _describe(exc))
                if stand_in is not None:
                    pieces.append(stand_in)
                else:
                    left_out.append((bad[-1][0], reason, _describe(exc)))
    if bad and on_error != "quarantine":
        named = "; ".join(f"{uri}: {_describe(exc)}" for uri, exc in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        return None, None, f"shard {index}: {named}{more}"
    if not bad and not pieces:  # an empty shard that fails: nothing to blame on a row
        return None, None, f"shard {index}: {_describe(last)}"
    table = pa.concat_tables(pieces) if pieces else work.process(rows.slice(0, 0))
    if not left_out:
        return table, None, ""
    uris, reasons, details = (list(col) for col in zip(*left_out, strict=True))
    ids = [image_id(u) for u in uris]
    return table, pa.table({schema.IMAGE_ID: ids, schema.URI: uris, "error": reasons, "error_detail": details}), ""


def _describe(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"


def _run_whole(spec: StageSpec, cfg: CurateConfig, out: Path, stage_dir: Path) -> tuple[int, dict[str, Any]]:
    task = ray.remote(num_cpus=1, max_retries=cfg.ray.max_task_retries)(_whole_task)
    hooks = faults.Hooks.for_stage(spec.name)
    try:
        return ray.get(task.remote(spec.name, cfg, str(out), str(stage_dir), hooks))  # type: ignore[no-any-return]
    except Exception as exc:
        _raise_own(exc)
        raise


def _whole_task(name: str, cfg: CurateConfig, out: str, stage_dir: str, hooks: faults.Hooks) -> tuple[int, dict]:
    spec = STAGES[name]
    assert spec.whole_fn is not None
    table, stats = spec.whole_fn(cfg, Path(out))
    for k, start in enumerate(range(0, max(table.num_rows, 1), WHOLE_STAGE_PART_ROWS)):
        faults.write_part(table.slice(start, WHOLE_STAGE_PART_ROWS), Path(stage_dir) / part_name(k), hooks)
    hooks.pause()  # a test kills the run here: parts written, no _SUCCESS yet
    return table.num_rows, stats


def _parquet_rows(path: Path) -> int:
    return int(pq.ParquetFile(path).metadata.num_rows)


def run(cfg: CurateConfig, stages: tuple[str, ...] = CURATE_ORDER, force: bool = False) -> dict[str, Any]:
    """Run ``stages`` in order in one Ray session; write ``config.yaml``, ``status.parquet`` and ``summary.json``."""
    check_embedding_keys(cfg, stages)
    out = Path(cfg.out)
    with disk_errors(out / "config.yaml"):
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    with ray_session(out, cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory_mb) as lazy:
        ran = [not run_stage(name, cfg, lazy, force=force)["skipped"] for name in stages]
        previous = read_json(out / "summary.json")
        current = previous is not None and previous.get("fingerprint") == _summary_fingerprint(out)
        if previous is not None and current and not any(ran) and (out / "status.parquet").exists():
            return previous  # nothing changed: the status table and summary on disk are current
        if lazy.started_here:  # the status table holds every image: build it in a worker, not in the driver
            task = ray.remote(num_cpus=1, max_retries=cfg.ray.max_task_retries)(write_summary)
            try:
                return ray.get(task.remote(out))  # type: ignore[no-any-return]
            except Exception as exc:
                _raise_own(exc)
                raise
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
    summary["fingerprint"] = _summary_fingerprint(out)
    write_json_atomic(out / "summary.json", summary)
    return summary


def _summary_fingerprint(out: Path) -> str:
    """Identity of the finished stages a summary was made from."""
    records = [success(out / stage_dirname(s)) for s in CURATE_ORDER]
    return fingerprint_of(*(r for r in records if r is not None))
