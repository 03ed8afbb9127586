"""Stage ``dedup_relative``: remove pool images that copy a protected image (an evaluation or test set).

As in LVD-142M (DINOv2 paper, appendix A), so benchmarks stay uncontaminated: every pool image whose copy-detection
similarity to any protected image exceeds a threshold is removed, and the protected image it matched is recorded.
Descriptors go through the same whitening that ``dedup_copy`` fitted on the pool, so one threshold scale applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa

from lvdkit.core import schema
from lvdkit.core.io import read_json
from lvdkit.core.knn import build_index, knn
from lvdkit.core.settings import setting
from lvdkit.core.stage import StageInputs, StageOutput
from lvdkit.core.views import alive, calibration_copies, dedups_before, embeddings_of
from lvdkit.core.whitening import Whitener
from lvdkit.curation.components import dedup_stats
from lvdkit.curation.side_sets import SideSetReader


@dataclass
class DedupRelativeConfig:
    """Protected sets and the similarity above which a pool image counts as their copy."""

    protected: list[str] = field(default_factory=list)  # folders, globs, file lists or URIs; empty: stage is a no-op
    # cosine after whitening; null: set by ``rule``
    threshold: float | None = setting(None, ge=-1, le=1)
    # recall: the highest threshold that keeps target_recall of the synthetic copies (embed's calibration copies,
    # against their sources), raised if needed so that it removes at most max_removed of the pool (a missed leak
    # contaminates an evaluation, an extra removal costs one training image); copy: dedup_copy's calibrated threshold
    rule: Literal["recall", "copy"] = "recall"
    target_recall: float = setting(0.95, gt=0, le=1)
    max_removed: float = setting(0.01, ge=0, le=1)
    embedding: str = "copy"  # which embed model (must match dedup_copy's)
    # where it runs: one task ("single"), or part by part with the protected set broadcast ("partitioned",
    # lvdkit.curation.relative_partitioned); "auto": partitioned from partition_min_rows images on
    path: Literal["auto", "single", "partitioned"] = "auto"
    partition_min_rows: int = setting(1_000_000, ge=0)


def dedup_relative(
    pool_ids: pa.Array | pa.ChunkedArray,
    pool_x: np.ndarray,
    protected_ids: list[str],
    protected_x: np.ndarray,
    threshold: float | None,
) -> pa.Table:
    """Mark pool images (descriptors pool_x [N, D], whitened) whose best match in protected_x [P, D] exceeds
    ``threshold``. dup_of / group_id name the protected image (its id), distance = 1 - similarity."""
    n = len(pool_ids)
    ids = np.asarray(
        pool_ids.to_numpy(zero_copy_only=False) if hasattr(pool_ids, "to_numpy") else pool_ids, dtype=object
    )
    if n == 0 or len(protected_ids) == 0:
        best_sim, best = np.full(n, -1.0, np.float32), np.zeros(n, np.int64)
    else:
        if threshold is None:
            raise ValueError("dedup_relative: a threshold is needed to compare a pool with a protected set")
        sims, nn = knn(build_index(protected_x, "flat"), pool_x, 1)  # [N, 1]
        best_sim, best = sims[:, 0], nn[:, 0]
    hit = best_sim > (threshold if threshold is not None else 1.0)  # nothing to compare: nothing is a copy
    matched = np.asarray(protected_ids, dtype=object)[best] if len(protected_ids) else np.full(n, None)
    return pa.table(
        {
            schema.IMAGE_ID: pa.array(ids, pa.string()),
            schema.GROUP_ID: pa.array(np.where(hit, matched, ids), pa.string()),
            schema.KEEP: pa.array(~hit),
            schema.DUP_OF: pa.array([m if h else None for m, h in zip(matched, hit, strict=True)], pa.string()),
            schema.DISTANCE: pa.array(np.where(hit, 1.0 - best_sim, 0.0).astype(np.float32)),
        },
        schema=schema.DEDUP,
    )


def run_dedup_relative(cfg: DedupRelativeConfig, reader: SideSetReader, inputs: StageInputs) -> StageOutput:
    """The stage: whitened pool descriptors against the protected images, ingested and embedded here; the
    protected images' ingest rows are a side file."""
    images = alive(inputs, dedups_before("dedup_relative"), [])
    whitener = Whitener.from_bytes(inputs.side("dedup_copy", schema.WHITENING_FILE).read_bytes())
    pool_x = whitener(embeddings_of(inputs, cfg.embedding, images[schema.IMAGE_ID]))
    ok_ids: list[str] = []
    prot_x = np.empty((0, pool_x.shape[1]), np.float32)
    sides: dict[str, pa.Table] = {}
    unusable = 0
    if cfg.protected:
        protected = reader.read(cfg.embedding, cfg.protected)
        sides[schema.PROTECTED_FILE] = protected.rows
        ok_ids = protected.ok[schema.IMAGE_ID].to_pylist()
        prot_x = whitener(protected.x)
        unusable = protected.rows.num_rows - len(ok_ids)
    compared = len(images) > 0 and len(ok_ids) > 0  # an empty pool or protected set needs no threshold
    threshold, rule_stats = cfg.threshold, dict[str, object]()
    if threshold is None and compared:
        if cfg.rule == "copy":
            threshold = copy_threshold(inputs)
        else:
            threshold, rule_stats = _recall_threshold(cfg, inputs, whitener, pool_x, prot_x)
    table = dedup_relative(images[schema.IMAGE_ID], pool_x, ok_ids, prot_x, threshold)
    stats = {"protected": len(ok_ids), "protected_unusable": unusable, "threshold": threshold, **rule_stats}
    return StageOutput(table, dedup_stats(table, stats), dict(sides))


def _recall_threshold(
    cfg: DedupRelativeConfig, inputs: StageInputs, whitener: Whitener, pool_x: np.ndarray, prot_x: np.ndarray
) -> tuple[float, dict[str, object]]:
    """The recall rule (see :class:`DedupRelativeConfig`) on this pool: (threshold, what it was made of)."""
    calib, copies_x = calibration_copies(inputs, cfg.embedding)
    best, _ = knn(build_index(prot_x, "flat"), pool_x, 1)  # [N, 1] each pool image's best protected match
    positives = None
    if calib.num_rows:  # else embed.calibration_copies=0: only the budget can set it
        copies = whitener(copies_x)
        sources = whitener(embeddings_of(inputs, cfg.embedding, calib[schema.IMAGE_ID]))
        positives = np.sum(copies * sources, axis=1)  # [C] similarity of each synthetic copy to its source
    return recall_rule(positives, best[:, 0], cfg.target_recall, cfg.max_removed)


def recall_rule(
    positives: np.ndarray | None, best: np.ndarray, target_recall: float, max_removed: float
) -> tuple[float, dict[str, object]]:
    """The highest threshold under which ``target_recall`` of ``positives`` [C] (similarities of known copies to their
    sources) stay above it, raised where needed so that at most ``max_removed`` of ``best`` [N] (each pool image's
    best similarity to the protected set) exceeds it. Returns (threshold, its parts and the estimated recall)."""
    for_budget = float(np.quantile(best, 1.0 - max_removed)) if len(best) else -1.0
    return recall_within_budget(positives, for_budget, target_recall)


def recall_within_budget(
    positives: np.ndarray | None, for_budget: float, target_recall: float
) -> tuple[float, dict[str, object]]:
    """:func:`recall_rule` once the budget's threshold is known (the partitioned path reads it from a histogram)."""
    if positives is None or len(positives) == 0:
        return for_budget, {"rule": "recall", "threshold_for_budget": for_budget, "estimated_recall": None}
    for_recall = float(np.quantile(positives, 1.0 - target_recall))
    threshold = max(for_recall, for_budget)
    return threshold, {
        "rule": "recall",
        "threshold_for_recall": for_recall,
        "threshold_for_budget": for_budget,
        "estimated_recall": float(np.mean(positives > threshold)),
    }


def copy_threshold(inputs: StageInputs) -> float:
    """The threshold dedup_copy applied (its declared side output)."""
    path = inputs.side("dedup_copy", schema.THRESHOLD_FILE)
    value = (read_json(path) or {}).get("threshold")
    if value is None:
        raise ValueError(
            f"dedup_relative.threshold is null and dedup_copy applied no threshold ({path}): set "
            "dedup_relative.threshold, or enable dedup_copy"
        )
    return float(value)
