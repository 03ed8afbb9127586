"""The run's summary: ``OUT/status.parquet`` (one final row per input file) and ``OUT/summary.json`` (the funnel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from lvdkit.core import schema
from lvdkit.core.io import write_json_atomic, write_parquet_atomic
from lvdkit.core.stage import StageInputs
from lvdkit.core.views import DEDUP_STAGES, final_status
from lvdkit.pipeline.manifest import fingerprint_of, success
from lvdkit.pipeline.names import CURATE_ORDER

STATUS_FILE, SUMMARY_FILE = "status.parquet", "summary.json"


def write_summary(out: Path) -> dict[str, Any]:
    """Write ``status.parquet`` and ``summary.json`` from the finished stages; returns the summary."""
    return write_funnel(out, write_status(out))


def _finished(out: Path) -> dict[str, dict[str, Any]]:
    """The ``_SUCCESS`` record of every finished stage, in run order."""
    records = {s: r for s in CURATE_ORDER if (r := success(out / s)) is not None}
    if "ingest" not in records:
        raise RuntimeError(f"no finished ingest in {out}: nothing to summarise")
    return records


def write_status(out: Path) -> pa.Table:
    """Write ``status.parquet``, one final row per input file, and return it."""
    finished = _finished(out)
    dedup = tuple(s for s in DEDUP_STAGES if s in finished)
    status = final_status(StageInputs(str(out), tuple(finished)), dedup)
    write_parquet_atomic(status, out / STATUS_FILE)
    return status


def write_funnel(out: Path, status: pa.Table) -> dict[str, Any]:
    """Write ``summary.json`` (the funnel) from the status table; returns it."""
    records = _finished(out)
    dedup = tuple(s for s in DEDUP_STAGES if s in records)
    st = status[schema.STATUS_COL].to_numpy(zero_copy_only=False)
    reasons = status[schema.REASON].to_numpy(zero_copy_only=False)
    quarantined = reasons[st == schema.STATUS_QUARANTINED]
    removed_by = reasons[st == schema.FINAL_DUPLICATE]
    summary = {
        "images_in": len(st),
        "kept": int((st == schema.FINAL_KEPT).sum()),
        "duplicates": int((st == schema.FINAL_DUPLICATE).sum()),
        "quarantined": len(quarantined),
        "duplicates_by_stage": {s: int((removed_by == s).sum()) for s in dedup},
        "quarantined_by_reason": {r: int((quarantined == r).sum()) for r in sorted(set(quarantined))},
        "curated": records["curated"].get("rows") if "curated" in records else None,
        "stages": {
            s: {"rows": r.get("rows"), "seconds": r.get("seconds"), "stats": r.get("stats", {})}
            for s, r in records.items()
        },
        "outputs": {"status": str(out / STATUS_FILE), **{s: str(out / s) for s in records}},
    }
    summary["fingerprint"] = summary_fingerprint(out)
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary


def summary_fingerprint(out: Path) -> str:
    """Identity of the finished stages a summary was made from."""
    records = [success(out / s) for s in CURATE_ORDER]
    return fingerprint_of(*(r for r in records if r is not None))
