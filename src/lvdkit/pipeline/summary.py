"""The run's summary: ``OUT/status.parquet`` (one final row per input file) and ``OUT/summary.json`` (the funnel)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.io import part_name, write_json_atomic, write_parquet_atomic, write_parquet_stream_atomic
from lvdkit.core.stage import StageInputs
from lvdkit.core.storage import Location, remove_tree
from lvdkit.core.views import DEDUP_STAGES, STATUS_INPUT, check_removed_found, removed, removed_per_stage, status_of
from lvdkit.pipeline.manifest import fingerprint_of, success
from lvdkit.pipeline.names import CURATE_ORDER

STATUS_FILE, SUMMARY_FILE = "status.parquet", "summary.json"


STATUS_PARTS = "_status_parts"  # OUT/_status_parts/part-*.parquet: the status table per ingest part, while it is built


def write_summary(out: Location, after_status: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write ``status.parquet`` and ``summary.json`` from the finished stages, here, part after part; returns the
    summary. (The runner does the same steps as Ray tasks: :func:`removed_in`, :func:`write_status_part` per ingest
    part, :func:`join_status_parts`, :func:`write_funnel`.)"""
    dups, named = removed_in(out)
    counts = [write_status_part(out, dups, i) for i in range(n_status_parts(out))]
    join_status_parts(out, len(counts))
    if after_status is not None:
        after_status()  # the test fault hook: a kill between status.parquet and summary.json
    return write_funnel(out, counts, named)


def _finished(out: Location) -> dict[str, dict[str, Any]]:
    """The ``_SUCCESS`` record of every finished stage, in run order."""
    records = {s: r for s in CURATE_ORDER if (r := success(out / s)) is not None}
    if "ingest" not in records:
        raise RuntimeError(f"no finished ingest in {out}: nothing to summarise")
    return records


def _inputs(out: Location) -> tuple[StageInputs, tuple[str, ...]]:
    finished = _finished(out)
    return StageInputs(str(out), tuple(finished)), tuple(s for s in DEDUP_STAGES if s in finished)


def n_status_parts(out: Location) -> int:
    """One status part per ingest part."""
    return len(_inputs(out)[0].parts("ingest"))


def removed_in(out: Location) -> tuple[pa.Table, dict[str, int]]:
    """Every duplicate of the finished dedup stages, chains resolved (grows with the duplicates, not the pool),
    and how many each stage named."""
    dups = removed(*_inputs(out))
    return dups, removed_per_stage(dups)


def write_status_part(out: Location, dups: pa.Table, index: int) -> dict[str, Any]:
    """Write the final status of ingest part ``index``'s files (``OUT/_status_parts/``); its counts."""
    inputs, _ = _inputs(out)
    part = inputs.parts("ingest")[index]
    status = status_of(pq.read_table(part, columns=STATUS_INPUT), dups)
    write_parquet_atomic(status, out / STATUS_PARTS / part.name)
    st = status[schema.STATUS_COL].to_numpy(zero_copy_only=False)
    reasons = status[schema.REASON].to_numpy(zero_copy_only=False)
    return {
        "images_in": len(st),
        "kept": int((st == schema.FINAL_KEPT).sum()),
        "removed_by": Counter(reasons[st == schema.FINAL_DUPLICATE].tolist()),
        "quarantined_by": Counter(reasons[st == schema.STATUS_QUARANTINED].tolist()),
    }


def join_status_parts(out: Location, n_parts: int) -> None:
    """``status.parquet`` from the status parts, one part in memory at a time; then the parts are removed."""
    folder = out / STATUS_PARTS
    parts = [folder / part_name(i) for i in range(n_parts)]
    write_parquet_stream_atomic((pq.read_table(p) for p in parts), schema.STATUS, out / STATUS_FILE)
    remove_tree(folder, strict=False)  # ours: written just above


def write_funnel(out: Location, counts: list[dict[str, Any]], named: dict[str, int]) -> dict[str, Any]:
    """Write ``summary.json`` (the funnel) from the status parts' counts (``named``: the duplicates each dedup
    stage named, all of which the parts must have found); returns it."""
    inputs, dedup = _inputs(out)
    records = _finished(out)
    removed_by: Counter[str] = sum((c["removed_by"] for c in counts), Counter())
    quarantined: Counter[str] = sum((c["quarantined_by"] for c in counts), Counter())
    check_removed_found(inputs, named, dict(removed_by))
    summary = {
        "images_in": sum(c["images_in"] for c in counts),
        "kept": sum(c["kept"] for c in counts),
        "duplicates": sum(removed_by.values()),
        "quarantined": sum(quarantined.values()),
        "duplicates_by_stage": {s: removed_by.get(s, 0) for s in dedup},
        "quarantined_by_reason": dict(sorted(quarantined.items())),
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


def summary_fingerprint(out: Location) -> str:
    """Identity of the finished stages a summary was made from."""
    records = [success(out / s) for s in CURATE_ORDER]
    return fingerprint_of(*(r for r in records if r is not None))
