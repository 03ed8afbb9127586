"""``dedup_relative``'s recall rule: the threshold that keeps a target share of known copies of the protected images
above it, raised where needed so that at most a budget of the clean pool is removed, as estimated on decoy draws or
as bounded by the pool's own scores (see :class:`lvdkit.curation.dedup_relative.DedupRelativeConfig`)."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

NO_BUDGET = 2.0  # no probes to estimate clean removals from: nothing is removed by the rule
MIN_PROBES_ABOVE = 10  # fewer probes above the budget's threshold than this: its estimate is noise


def recall_rule(
    positives: np.ndarray,
    edits: np.ndarray,
    clean: np.ndarray | list[np.ndarray],
    target_recall: float,
    max_removed: float,
    pool: np.ndarray | None = None,
    confidence: float = 0.9,
) -> tuple[float, dict[str, object]]:
    """The highest threshold under which ``target_recall`` of ``positives`` [C] (scores of known copies, edit
    families [C]) stay above it, raised where needed so that at most ``max_removed`` of the clean pool is removed:
    as estimated on ``clean`` (scores of images standing in for clean ones, the probes against the decoys: [Q], or
    one array per decoy draw, bounded at ``confidence`` by :func:`budget_threshold`), or of the pool itself
    (``pool`` [Q]: a sample of the pool scored against the protected set; whatever it holds, no more clean images
    than that share are removed), whichever allows the lower threshold. Returns (threshold, its parts and the
    estimates)."""
    draws = [clean] if isinstance(clean, np.ndarray) else list(clean)
    draws = [c for c in draws if len(c)]
    by_decoys = budget_threshold(draws, max_removed, confidence)
    by_pool = float(np.quantile(pool, 1.0 - max_removed)) if pool is not None and len(pool) else NO_BUDGET
    for_budget = min(by_decoys, by_pool)
    for_recall = float(np.quantile(positives, 1.0 - target_recall)) if len(positives) else None
    threshold = for_budget if for_recall is None else max(for_recall, for_budget)
    by_edit = {str(e): float(np.mean(positives[edits == e] > threshold)) for e in sorted(set(edits.tolist()))}
    n_probes = len(draws[0]) if draws else 0
    warnings = []
    if for_recall is not None and for_budget > for_recall:
        warnings.append(
            f"dedup_relative: the clean-removal budget set the threshold (max_removed={max_removed}): estimated "
            f"recall {np.mean(positives > threshold):.2f} of synthetic copies of the protected images, below "
            f"target_recall={target_recall} (the estimate is measured on eight harsh edit families and was lower "
            "than the recall of the demo's milder real leaks). Raise max_removed to remove more leaks"
        )
    if by_pool >= by_decoys and 0 < n_probes * max_removed < MIN_PROBES_ABOVE:
        warnings.append(
            f"dedup_relative: {n_probes} probes put about {n_probes * max_removed:.0f} above the budget's "
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
        "estimated_clean_removed": _clean_removed(draws, pool, threshold),
        "estimated_clean_removed_by_draw": [float(np.mean(c > threshold)) for c in draws],
        "calibration_copies": len(positives),
        "probes": n_probes,
        "decoy_draws": len(draws),
        "warnings": warnings,
    }


def budget_threshold(draws: list[np.ndarray], max_removed: float, confidence: float) -> float:
    """The lowest threshold at which the clean share removed stays within ``max_removed``, from the scores of one
    or more decoy draws (each [Q_k]). One draw: its (1 - max_removed) quantile. Several: the lowest threshold (at or
    above which every threshold also holds) where the draws' mean share above it plus ``confidence``'s one-sided
    normal bound on one more draw, mean + z * sd * sqrt(1 + 1/K), is at most ``max_removed``: the pool against the
    protected set is that one more draw. No draws: :data:`NO_BUDGET`."""
    if not draws:
        return NO_BUDGET
    if len(draws) == 1:
        return float(np.quantile(draws[0], 1.0 - max_removed))
    ordered = [np.sort(d) for d in draws]
    candidates = np.unique(np.concatenate(ordered))  # ascending
    # shares above each candidate, counted then divided (1 - i/n rounds a share of exactly max_removed above it)
    shares = np.stack([(len(d) - np.searchsorted(d, candidates, side="right")) / len(d) for d in ordered])  # [K, T]
    z = NormalDist().inv_cdf(confidence) * (1.0 + 1.0 / len(draws)) ** 0.5
    bad = np.nonzero(shares.mean(axis=0) + z * shares.std(axis=0, ddof=1) > max_removed)[0]
    if not len(bad):
        return float(candidates[0])
    return float(candidates[min(bad[-1] + 1, len(candidates) - 1)])


def _clean_removed(draws: list[np.ndarray], pool: np.ndarray | None, threshold: float) -> float | None:
    """The lower of the two upper estimates of the clean share removed: the probes' share above the threshold
    against the decoys (the draws' mean), and against the protected set (leaks are among those, so clean images
    are no more)."""
    shares = [float(np.mean([np.mean(c > threshold) for c in draws]))] if draws else []
    if pool is not None and len(pool):
        shares.append(float(np.mean(pool > threshold)))
    return min(shares) if shares else None
