"""Completion markers: ``_SUCCESS`` (a finished stage) and ``_RUNNING`` (a stage in progress, resumable).

A stage is skipped when its ``_SUCCESS`` records the same config hash and input fingerprint as the current run. An
interrupted stage keeps its finished parts only if its ``_RUNNING`` marker matches; otherwise it starts clean.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any

from lvdkit import __version__
from lvdkit.core.io import read_json, write_json_atomic
from lvdkit.core.storage import Location, remove_tree
from lvdkit.pipeline.commits import changed_since_success, committed_sizes

SUCCESS = "_SUCCESS"
RUNNING = "_RUNNING"


@dataclass(frozen=True)
class RunKey:
    """What determines a stage's output: its own config and its inputs."""

    config_hash: str
    fingerprint: str

    def matches(self, record: dict[str, Any] | None) -> bool:
        if not record:
            return False
        return record.get("config_hash") == self.config_hash and record.get("fingerprint") == self.fingerprint


def success(stage_dir: Location) -> dict[str, Any] | None:
    """The stage's ``_SUCCESS`` record, if it finished."""
    return read_json(stage_dir / SUCCESS)


def prepare(stage_dir: Location, key: RunKey, force: bool) -> str:
    """Decide what to do with ``stage_dir``: 'skip' (done), 'resume' (same run interrupted, or finished with a part
    changed since) or 'fresh'."""
    record = success(stage_dir)
    if not force and key.matches(record):
        assert record is not None
        changed = changed_since_success(stage_dir, record)
        if not changed:
            return "skip"
        names = ", ".join(changed[:5])
        print(f"[lvdkit] {record['stage']}: {names} changed since the stage finished", file=sys.stderr, flush=True)
        write_json_atomic(stage_dir / RUNNING, {"config_hash": key.config_hash, "fingerprint": key.fingerprint})
        (stage_dir / SUCCESS).unlink()
        return "resume"
    if not force and key.matches(read_json(stage_dir / RUNNING)) and not (stage_dir / SUCCESS).exists():
        return "resume"
    if stage_dir.exists():
        _check_ours(stage_dir)
        remove_tree(stage_dir)
    stage_dir.mkdir(parents=True)
    write_json_atomic(stage_dir / RUNNING, {"config_hash": key.config_hash, "fingerprint": key.fingerprint})
    return "fresh"


def _check_ours(stage_dir: Location) -> None:
    """A stage folder is removed only when it holds lvdkit's records (or nothing at all)."""
    if any((stage_dir / r).is_file() for r in (SUCCESS, RUNNING)) or not any(stage_dir.iterdir()):
        return
    raise ValueError(
        f"refusing to remove {stage_dir}: it holds files but no lvdkit record ({SUCCESS} or {RUNNING}), so lvdkit "
        "did not write it. Move it out of out= (or choose another out=)"
    )


def finish(
    stage_dir: Location,
    stage: str,
    key: RunKey,
    config: dict[str, Any],
    rows: int,
    seconds: float,
    stats: dict[str, Any],
    nodes: list[str] | None = None,
    views: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``_SUCCESS`` and drop the ``_RUNNING`` marker; returns the record. ``views``: the identity of each
    separately read part of the output (see :func:`fingerprint_of`)."""
    record = {
        "stage": stage,
        "rows": rows,
        "stats": stats,
        "config_hash": key.config_hash,
        "fingerprint": key.fingerprint,
        "config": config,
        "lvdkit_version": __version__,
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": secrets.token_hex(8),  # two runs finished in the same second are two outputs all the same
        "parts": sorted(p.name for p in stage_dir.glob("part-*.parquet")),  # readers trust these (and _commits)
        "part_bytes": committed_sizes(stage_dir),  # checked (a stat each) before a rerun skips the stage
        "nodes": nodes or [],  # the Ray nodes whose tasks did this run's work (resumed runs: the last attempt's)
    }
    if views is not None:
        record["views"] = views
    write_json_atomic(stage_dir / SUCCESS, record)
    (stage_dir / RUNNING).unlink(missing_ok=True)
    return record


def fingerprint_of(*records: dict[str, Any] | None, uses: dict[str, tuple[str, ...]] | None = None) -> str:
    """Fingerprint of a downstream stage's inputs: the identity of the upstream outputs it reads.

    ``uses`` names, per upstream stage, the views of its output the reader uses (embed: the models); such a stage
    counts by those views' identities instead of its whole config, so a model added for one reader leaves the
    others' fingerprints as they were. A record without views (or a view it lacks) counts whole."""
    h = hashlib.blake2b(digest_size=8)
    for rec in records:
        if rec is None:
            raise FileNotFoundError("an upstream stage has not finished")
        h.update(
            f"{rec['stage']}|{_identity(rec, (uses or {}).get(rec['stage']))}|{rec['fingerprint']}|"
            f"{rec['rows']}\n".encode()
        )
    return h.hexdigest()


def _identity(record: dict[str, Any], used: tuple[str, ...] | None) -> str:
    """A stage counted whole: its config and when it finished (a forced or repaired rerun may change its output
    under the same config, and what read the earlier output is then out of date); by views: their identities."""
    views = record.get("views")
    if used is None or not isinstance(views, dict) or not all(k in views for k in used):
        run = f"/{record['run_id']}" if "run_id" in record else ""  # records before 2026-12-05 have none
        return f"{record['config_hash']}@{record.get('finished_at', '')}{run}"
    return ",".join(f"{k}={views[k]}" for k in sorted(set(used)))
