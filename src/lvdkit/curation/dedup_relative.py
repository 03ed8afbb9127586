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
from lvdkit.core.settings import setting
from lvdkit.core.stage import StageInputs, StageOutput
from lvdkit.core.views import alive, dedups_before, embeddings_of
from lvdkit.core.whitening import Whitener
from lvdkit.curation.components import dedup_stats
from lvdkit.curation.relative_score import (
    background_margins,
    copy_groups,
    in_sample,
    margins,
    nearest_background,
    sample_rates,
)
from lvdkit.curation.side_sets import SideSetReader


@dataclass
class DedupRelativeConfig:
    """Protected sets and the score above which a pool image counts as a copy of one of them."""

    protected: list[str] = field(default_factory=list)  # folders, globs, file lists or URIs; empty: stage is a no-op
    # margin: similarity to the best protected match less that to the best protected image outside its copy group
    # (lvdkit.curation.relative_score); similarity: cosine to the best match (after dedup_copy's whitening)
    score: Literal["margin", "similarity"] = "margin"
    # the margin's reference mixed with the pool's: this share of it is the similarity to the nearest image of the
    # background set that is not a copy (relative_score.background_margins); 0: the margin alone. 0.5, measured
    # (bench/dedup_quality.py --relative): photo leak pools of 1,000 / 5,000, 57 -> 61 and 57 -> 61 of 64 leaks;
    # the demo 39 of 40 either way; 1.0 (the pool alone) misses a leak the pool holds twice
    background_weight: float = setting(0.5, ge=0, le=1)
    background: int = setting(20_000, ge=0)  # pool images drawn as the background set (decoys aside)
    threshold: float | None = setting(None, ge=-1, le=2)  # on the score's scale; null: set by ``rule``
    # recall: the highest threshold that keeps target_recall of synthetic copies of the protected images (scored
    # against the protected set), raised if needed so that it removes at most max_removed of the clean pool: as
    # estimated on decoys, or as bounded by the pool's own scores (at most max_removed of the probes, a sample of the
    # pool, above it against the protected set), whichever allows more (a missed leak contaminates an evaluation, an
    # extra removal costs one training image);
    # copy: dedup_copy's calibrated threshold, on similarity
    rule: Literal["recall", "copy"] = "recall"
    # 0.99, not the 0.95 wanted of real leaks: on photographs the synthetic copies score above real edits (estimated
    # 0.93-0.945 where 0.75-0.875 were caught), so aiming higher spends more of the budget where it is not bound
    # (bench/dedup_quality.py --relative: photo pool of 5,000, 14 -> 15 of 16 leaks, 0.59 -> 0.74% clean removed)
    target_recall: float = setting(0.99, gt=0, le=1)
    max_removed: float = setting(0.01, ge=0, le=1)
    calibration_copies: int = setting(1000, ge=0)  # synthetic copies of protected images the recall is measured on
    probes: int = setting(20_000, ge=0)  # pool images scored against the decoys to estimate clean removals
    embedding: str = "copy"  # which embed model (must match dedup_copy's)
    # where it runs: one task ("single"), or part by part with the protected set broadcast ("partitioned",
    # lvdkit.curation.relative_partitioned); "auto": partitioned from partition_min_rows images on
    path: Literal["auto", "single", "partitioned"] = "auto"
    partition_min_rows: int = setting(1_000_000, ge=0)

    def scored_by(self) -> str:
        """The score the threshold applies to (dedup_copy's threshold is a similarity)."""
        return "similarity" if self.rule == "copy" and self.threshold is None else self.score

    def uses_background(self) -> bool:
        """Whether the score takes part of its reference from a background set drawn from the pool."""
        return self.scored_by() == "margin" and self.background_weight > 0 and self.background > 0


def dedup_relative(
    pool_ids: pa.Array | pa.ChunkedArray,
    pool_x: np.ndarray,
    protected_ids: list[str],
    protected_x: np.ndarray,
    threshold: float | None,
    groups: np.ndarray | None = None,
    score: str = "similarity",
    background: np.ndarray | None = None,
    weight: float = 0.0,
) -> pa.Table:
    """Mark pool images (descriptors pool_x [N, D], whitened) whose ``score`` against protected_x [P, D] (copy
    groups [P]; default: one per image; ``background`` [N] and its ``weight``: see :func:`scores`) exceeds
    ``threshold``. dup_of / group_id name the best protected match (its id), distance = 1 - its similarity."""
    n = len(pool_ids)
    ids = np.asarray(
        pool_ids.to_numpy(zero_copy_only=False) if hasattr(pool_ids, "to_numpy") else pool_ids, dtype=object
    )
    if n and len(protected_ids) and threshold is None:
        raise ValueError("dedup_relative: a threshold is needed to compare a pool with a protected set")
    best_sim, best, value = scores(pool_x, protected_x, groups, score, background, weight)
    hit = value > threshold if threshold is not None and len(protected_ids) else np.zeros(n, bool)
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


def scores(
    x: np.ndarray,
    protected_x: np.ndarray,
    groups: np.ndarray | None,
    score: str,
    background: np.ndarray | None = None,
    weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best similarity [N], best match [N], the score [N]) of queries x [N, D] against the protected set; the
    margin with ``weight`` of its reference from ``background`` [N] (each query's nearest background image, from
    :func:`~lvdkit.curation.relative_score.nearest_background`) where given."""
    groups = np.arange(len(protected_x), dtype=np.int64) if groups is None else groups
    best_sim, best, margin = margins(x, protected_x, groups)
    if score != "margin":
        return best_sim, best, best_sim
    if background is not None and weight > 0:
        margin = background_margins(best_sim, margin, background, weight)
    return best_sim, best, margin


def run_dedup_relative(cfg: DedupRelativeConfig, reader: SideSetReader, inputs: StageInputs) -> StageOutput:
    """The stage: whitened pool descriptors against the protected images, ingested and embedded here; the
    protected images' ingest rows are a side file."""
    images = alive(inputs, dedups_before("dedup_relative"), [schema.CONTENT_HASH])
    whitener = Whitener.from_bytes(inputs.side("dedup_copy", schema.WHITENING_FILE).read_bytes())
    pool_x = whitener(embeddings_of(inputs, cfg.embedding, images[schema.IMAGE_ID]))
    prot = protected_set(cfg, reader, inputs, whitener)
    compared = len(images) > 0 and len(prot.ids) > 0  # an empty pool or protected set needs no threshold
    threshold, rule_stats = cfg.threshold, dict[str, object]()
    background_x = np.empty((0, pool_x.shape[1]), np.float32)
    if compared:  # (no protected set, the common case: no samples to draw, no hashes to read)
        samples = pool_samples(images[schema.CONTENT_HASH].to_pylist(), inputs, len(prot.ids), cfg)
        background_x = pool_x[samples.background]
        if threshold is None and cfg.rule == "copy":
            threshold = copy_threshold(inputs)
        elif threshold is None:
            decoys, probes = pool_x[samples.decoys], pool_x[samples.probes]
            threshold, rule_stats = recall_threshold(cfg, prot, decoys, probes, background_x)
    score = cfg.scored_by()
    table = dedup_relative(
        images[schema.IMAGE_ID],
        pool_x,
        prot.ids,
        prot.x,
        threshold,
        prot.groups,
        score,
        background_of(cfg, prot, pool_x, background_x) if compared else None,
        cfg.background_weight,
    )
    stats = {
        "protected": len(prot.ids),
        "protected_unusable": prot.unusable,
        "score": score,
        "threshold": threshold,
        **background_stats(cfg, len(background_x)),
    }
    sides = {schema.PROTECTED_FILE: prot.rows} if prot.rows is not None else {}
    return StageOutput(table, dedup_stats(table, {**stats, **rule_stats}), dict(sides))


@dataclass
class Protected:
    """The protected images, whitened: ids, descriptors [P, D], copy groups [P], synthetic copies [C, D] with their
    edit families [C], and the ingest rows (the side file)."""

    ids: list[str]
    x: np.ndarray
    groups: np.ndarray
    copies: np.ndarray
    copy_edit: np.ndarray
    rows: pa.Table | None
    unusable: int
    group_threshold: float | None = None  # similarity above which two images are copies of each other


def protected_set(
    cfg: DedupRelativeConfig, reader: SideSetReader, inputs: StageInputs, whitener: Whitener
) -> Protected:
    """Ingest and embed the protected images (and synthetic copies of them, for the recall rule)."""
    dim = whitener.dim
    if not cfg.protected:
        empty = np.empty((0, dim), np.float32)
        return Protected([], empty, np.empty(0, np.int64), empty, np.empty(0, str), None, 0, group_threshold(inputs))
    wanted = cfg.calibration_copies if cfg.rule == "recall" and cfg.threshold is None else 0
    side = reader.read(cfg.embedding, cfg.protected, copies=wanted)
    x = whitener(side.x)
    copies = whitener(side.copies) if side.copies is not None else np.empty((0, dim), np.float32)
    edit = side.copy_edit if side.copy_edit is not None else np.empty(0, str)
    within = group_threshold(inputs)
    ids = side.ok[schema.IMAGE_ID].to_pylist()
    return Protected(ids, x, copy_groups(x, within), copies, edit, side.rows, side.rows.num_rows - len(ids), within)


def group_threshold(inputs: StageInputs) -> float | None:
    """Protected images more similar than dedup_copy's threshold are copies of each other (none applied: none)."""
    value = (read_json(inputs.side("dedup_copy", schema.THRESHOLD_FILE)) or {}).get("threshold")
    return None if value is None else float(value)


@dataclass
class Samples:
    """Pool images drawn for the rule and the score (masks [N]): decoys, probes and the background set (the latter
    two overlap; neither holds a decoy)."""

    decoys: np.ndarray
    probes: np.ndarray
    background: np.ndarray


def pool_samples(keys: list[str], inputs: StageInputs, n_protected: int, cfg: DedupRelativeConfig) -> Samples:
    """The samples of the pool images with content hashes ``keys``: the same images on either path, wherever the
    files lie. No background set where the score takes none."""
    n_background = cfg.background if cfg.uses_background() else 0
    rates = sample_rates(pool_size(inputs), n_protected, cfg.probes, n_background)
    decoys = in_sample(keys, rates[0], "decoy")
    probes = in_sample(keys, rates[1], "probe") & ~decoys
    return Samples(decoys, probes, in_sample(keys, rates[2], "background") & ~decoys)


def background_of(
    cfg: DedupRelativeConfig, prot: Protected, x: np.ndarray, background_x: np.ndarray
) -> np.ndarray | None:
    """Each of x's [N, D] nearest background image that is not a copy of it [N] (None where the score takes none)."""
    return nearest_background(x, background_x, prot.group_threshold) if cfg.uses_background() else None


def background_stats(cfg: DedupRelativeConfig, n_background: int) -> dict[str, object]:
    return {"background": n_background, "background_weight": cfg.background_weight if cfg.uses_background() else 0.0}


def pool_size(inputs: StageInputs) -> int:
    """Images that reach dedup_relative (those dedup_copy kept)."""
    record = inputs.record("dedup_copy")
    return int(record.get("stats", {}).get("kept", record.get("rows") or 0))


def recall_threshold(
    cfg: DedupRelativeConfig, prot: Protected, decoys: np.ndarray, probes: np.ndarray, background: np.ndarray
) -> tuple[float, dict[str, object]]:
    """The recall rule (see :class:`DedupRelativeConfig`): (threshold, what it was made of and its estimates). The
    probes are scored twice: against the decoys (clean images' scores, the decoys' copies in the pool aside) and
    against the protected set (the pool's own scores, its leaks among them). ``background`` [B, D]: the background
    set (holds no decoy, so it stands to the decoys as the pool to the protected set)."""
    w = cfg.background_weight
    copies_bg, probes_bg = (background_of(cfg, prot, q, background) for q in (prot.copies, probes))
    positives = scores(prot.copies, prot.x, prot.groups, cfg.score, copies_bg, w)[2]
    decoy_groups = copy_groups(decoys, prot.group_threshold)
    probe_scores = scores(probes, decoys, decoy_groups, cfg.score, probes_bg, w)[2]
    pool_scores = scores(probes, prot.x, prot.groups, cfg.score, probes_bg, w)[2]
    return recall_rule(positives, prot.copy_edit, probe_scores, cfg.target_recall, cfg.max_removed, pool_scores)


def recall_rule(
    positives: np.ndarray,
    edits: np.ndarray,
    clean: np.ndarray,
    target_recall: float,
    max_removed: float,
    pool: np.ndarray | None = None,
) -> tuple[float, dict[str, object]]:
    """The highest threshold under which ``target_recall`` of ``positives`` [C] (scores of known copies, edit
    families [C]) stay above it, raised where needed so that at most ``max_removed`` of the clean pool is removed:
    of ``clean`` [Q] (scores of images standing in for clean ones, the probes against the decoys), or of the pool
    itself (``pool`` [Q]: a sample of the pool scored against the protected set; whatever it holds, no more clean
    images than that share are removed), whichever allows the lower threshold. Returns (threshold, its parts and
    the estimates)."""
    by_decoys = float(np.quantile(clean, 1.0 - max_removed)) if len(clean) else NO_BUDGET
    by_pool = float(np.quantile(pool, 1.0 - max_removed)) if pool is not None and len(pool) else NO_BUDGET
    for_budget = min(by_decoys, by_pool)
    for_recall = float(np.quantile(positives, 1.0 - target_recall)) if len(positives) else None
    threshold = for_budget if for_recall is None else max(for_recall, for_budget)
    by_edit = {str(e): float(np.mean(positives[edits == e] > threshold)) for e in sorted(set(edits.tolist()))}
    warnings = []
    if for_recall is not None and for_budget > for_recall:
        warnings.append(
            f"dedup_relative: the clean-removal budget set the threshold (max_removed={max_removed}): estimated "
            f"recall {np.mean(positives > threshold):.2f} of synthetic copies of the protected images, below "
            f"target_recall={target_recall} (the estimate is measured on eight harsh edit families and was lower "
            "than the recall of the demo's milder real leaks). Raise max_removed to remove more leaks"
        )
    if by_pool >= by_decoys and 0 < len(clean) * max_removed < MIN_PROBES_ABOVE:
        warnings.append(
            f"dedup_relative: {len(clean)} probes put about {len(clean) * max_removed:.0f} above the budget's "
            "threshold: the estimate of clean removals is noisy on a pool this small"
        )
    return threshold, {
        "rule": "recall",
        "threshold_for_recall": for_recall,
        "threshold_for_budget": for_budget,
        "threshold_for_budget_decoys": by_decoys,
        "threshold_for_budget_pool": by_pool,
        "estimated_recall": float(np.mean(positives > threshold)) if len(positives) else None,
        "estimated_recall_by_edit": by_edit,
        "estimated_clean_removed": _clean_removed(clean, pool, threshold),
        "calibration_copies": len(positives),
        "probes": len(clean),
        "warnings": warnings,
    }


def _clean_removed(clean: np.ndarray, pool: np.ndarray | None, threshold: float) -> float | None:
    """The lower of the two upper estimates of the clean share removed: the probes' share above the threshold
    against the decoys, and against the protected set (leaks are among those, so clean images are no more)."""
    shares = [float(np.mean(sample > threshold)) for sample in (clean, pool) if sample is not None and len(sample)]
    return min(shares) if shares else None


NO_BUDGET = 2.0  # no probes to estimate clean removals from: nothing is removed by the rule
MIN_PROBES_ABOVE = 10  # fewer probes above the budget's threshold than this: its estimate is noise


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
