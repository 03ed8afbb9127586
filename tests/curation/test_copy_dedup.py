"""Copy-detection dedup maths on real Faiss: k-NN vs brute force, whitening, calibration, grouping, relative dedup."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lvdkit.core import schema
from lvdkit.core.knn import best_per_owner, build_index, knn, l2_normalize, pairs_above
from lvdkit.core.whitening import fit_whitener
from lvdkit.curation.dedup_copy import (
    Calibration,
    DedupCopyConfig,
    calibrate,
    calibration_warnings,
    dedup_copy,
    nearest_other,
    tail_gate,
)
from lvdkit.curation.dedup_relative import dedup_relative
from lvdkit.curation.extreme_tail import distinct_tail, gev_sf


def _clustered(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Anisotropic clustered descriptors (like real ones: a few directions dominate), unit rows."""
    centers = rng.standard_normal((20, d)) * 3
    scales = np.linspace(3, 0.1, d)
    return l2_normalize(centers[rng.integers(0, 20, n)] + rng.standard_normal((n, d)) * scales)


def _noisy(x: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    return l2_normalize(x + amount * rng.standard_normal(x.shape) / np.sqrt(x.shape[1]))


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_knn_matches_brute_force(kind: str) -> None:
    rng = np.random.default_rng(0)
    x = _clustered(3000, 32, rng)
    sims, ids = knn(build_index(x, kind, nprobe=64 if kind == "ivf" else 16), x, 5, chunk=700)  # several chunks
    brute = x @ x.T
    want = np.argsort(-brute, axis=1)[:, :5]
    agree = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, want, strict=True)])
    assert agree == 1.0 if kind == "flat" else agree > 0.95
    np.testing.assert_allclose(sims[:, 0], np.take_along_axis(brute, ids[:, :1], 1)[:, 0], atol=1e-5)


def test_pairs_above_is_unique_ordered_and_thresholded() -> None:
    rng = np.random.default_rng(1)
    x = _clustered(500, 16, rng)
    sims, ids = knn(build_index(x, "flat"), x, 20)
    pairs, ps = pairs_above(sims, ids, 0.9)
    brute = x @ x.T
    assert np.all(pairs[:, 0] < pairs[:, 1]) and len(np.unique(pairs, axis=0)) == len(pairs)
    np.testing.assert_allclose(ps, brute[pairs[:, 0], pairs[:, 1]], atol=1e-5)
    assert np.all(ps > 0.9)
    # every pair above the threshold among each row's 20 neighbours is present
    want = {(min(i, j), max(i, j)) for i in range(500) for j in ids[i] if j != i and brute[i, j] > 0.9}
    assert want == set(map(tuple, pairs.tolist()))


def test_pca_whitening_decorrelates_and_normalises() -> None:
    rng = np.random.default_rng(2)
    x = _clustered(5000, 24, rng)
    w = fit_whitener(x, "pca", 16)
    y = w(x)
    assert y.shape == (5000, 16)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    raw = (x - w.mean) @ w.matrix  # before the final L2 normalisation: identity covariance
    np.testing.assert_allclose(np.cov(raw.T), np.eye(16), atol=0.05)
    centered = fit_whitener(x, "center", 16)(x)
    assert centered.shape == x.shape and abs(float(centered.mean(axis=0).sum())) < abs(float(x.mean(axis=0).sum()))
    with pytest.raises(ValueError, match="'none', 'center', 'pca'"):
        fit_whitener(x, "zca", 4)  # type: ignore[arg-type]


def test_whitener_save_load_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x = _clustered(500, 8, np.random.default_rng(3))
    w = fit_whitener(x, "pca", 4)
    w.save(str(tmp_path / "w.npz"))
    from lvdkit.core.whitening import Whitener

    np.testing.assert_array_equal(Whitener.load(str(tmp_path / "w.npz"))(x), w(x))


def test_nearest_other_skips_self_and_ranks() -> None:
    ids = np.array([[0, 2, 1], [1, 0, 2], [0, 2, -1]])
    sims = np.array([[1.0, 0.8, 0.5], [1.0, 0.7, 0.2], [0.9, 1.0, 0.0]])
    np.testing.assert_allclose(nearest_other(sims, ids, 1), [0.8, 0.7, 0.9])
    np.testing.assert_allclose(nearest_other(sims, ids, 2), [0.5, 0.2, -np.inf])


def test_calibrate_estimates_prevalence_and_meets_precision_on_a_known_mixture() -> None:
    rng = np.random.default_rng(4)
    n, n_copy = 20000, 1000  # 5% of images have a copy
    distinct = rng.normal(0.3, 0.05, n)  # best distinct match
    best = distinct.copy()
    best[:n_copy] = np.maximum(best[:n_copy], rng.normal(0.8, 0.05, n_copy))  # images with a copy
    pos = rng.normal(0.8, 0.05, 2000)
    neg = rng.normal(0.28, 0.05, n)  # second neighbours: a bit lower than the best distinct match
    cal = calibrate(pos, neg, best, 0.95)
    assert 0.03 < cal.prevalence < 0.07
    matched = best > cal.threshold
    true_precision = matched[:n_copy].sum() / matched.sum()
    assert true_precision >= 0.9 and cal.precision >= 0.95
    assert abs(cal.recall - float(np.mean(pos > cal.threshold))) < 1e-9
    stricter = calibrate(pos, neg, best, 0.999)
    assert stricter.threshold >= cal.threshold and stricter.recall <= cal.recall


def test_a_raised_threshold_reports_the_estimates_it_gives_and_recall_per_edit_family() -> None:
    rng = np.random.default_rng(4)
    best = np.concatenate([rng.normal(0.8, 0.05, 500), rng.gumbel(0.3, 0.02, 9500)])  # distinct: a maximum's law
    pos = np.concatenate([rng.normal(0.85, 0.03, 1000), rng.normal(0.55, 0.03, 1000)])  # an easy and a hard family
    edits = np.array(["jpeg"] * 1000 + ["rotate"] * 1000, dtype=object)
    neg = rng.gumbel(0.27, 0.02, 10000)
    free = calibrate(pos, neg, best, 0.95, edits=edits)
    raised = calibrate(pos, neg, best, 0.95, min_threshold=0.7, edits=edits)
    assert free.threshold < 0.55 and free.calibrated == free.threshold
    assert raised.threshold == 0.7 and raised.calibrated == free.threshold  # the floor applies, both recorded
    assert abs(raised.recall - float(np.mean(pos > 0.7))) < 1e-9  # the estimate at the threshold actually used
    assert raised.recall < 0.55 < free.recall
    assert raised.recall_by_edit == {"jpeg": float(np.mean(pos[:1000] > 0.7)), "rotate": 0.0}
    assert free.recall_by_edit["rotate"] > 0.9


def _paired_look_alikes(seed: int, n: int = 20000, n_copy: int = 1000) -> tuple[np.ndarray, ...]:
    """A pool whose distinct look-alikes come in pairs, as the demo's handwritten 1s: each image's best distinct match
    is Gumbel(0.30, 0.05) and its second far below (a second neighbour never shows the pair); 5% of images have a
    copy, milder than the synthetic copies (so pi R(t) / M(t) is optimistic too, as on the demo)."""
    rng = np.random.default_rng(seed)
    distinct = rng.gumbel(0.30, 0.05, n)
    copy = np.full(n, -np.inf)
    copy[:n_copy] = rng.normal(0.72, 0.08, n_copy)
    best = np.maximum(distinct, copy)
    neg = np.minimum(np.maximum(np.minimum(distinct, copy), rng.gumbel(0.15, 0.03, n)), best)
    return rng.normal(0.62, 0.12, 4000), neg, best, copy > distinct


@pytest.mark.parametrize("seed", [0, 1])
def test_the_fitted_tail_sees_false_matches_that_come_in_pairs(seed: int) -> None:
    pos, neg, best, true = _paired_look_alikes(seed)
    for tail_fit, honest in ((False, False), (True, True)):
        cal = calibrate(pos, neg, best, 0.95, -1.0, None, *tail_gate(DedupCopyConfig(tail_fit=tail_fit)))
        flagged = best > cal.threshold
        actual = float(true[flagged].mean())
        assert (abs(actual - cal.precision) <= 0.05) == honest, (tail_fit, cal.precision, actual)
        assert cal.precision >= 0.95
    assert cal.false_match_tail > cal.false_match_second and cal.false_match_rate == cal.false_match_tail
    assert cal.tail_location == pytest.approx(0.30, abs=0.01) and cal.tail_scale == pytest.approx(0.05, abs=0.004)


def test_the_tail_is_fitted_only_where_the_bulk_of_best_matches_is_distinct_images() -> None:
    pos, neg, best, _ = _paired_look_alikes(0)
    gate = tail_gate(DedupCopyConfig())
    assert calibrate(pos, neg, best, 0.95, -1.0, None, *gate).false_match_tail is not None
    small = calibrate(pos, neg[:999], best[:999], 0.95, -1.0, None, *gate)  # fewer than reliable_min_images
    assert small.false_match_tail is None and small.false_match_rate == small.false_match_second
    rng = np.random.default_rng(0)
    crowded = np.maximum(best, rng.normal(0.70, 0.10, len(best)) * (rng.random(len(best)) < 0.5))  # half have copies
    many = calibrate(pos, neg, crowded, 0.95, -1.0, None, *gate)
    assert many.prevalence > 0.35 and many.false_match_tail is None
    off = calibrate(pos, neg, best, 0.95, -1.0, None, *tail_gate(DedupCopyConfig(tail_fit=False)))
    assert off.false_match_tail is None and off.tail_location is None


def test_distinct_tail_recovers_an_extreme_value_law_below_the_copies() -> None:
    rng = np.random.default_rng(3)
    best = rng.gumbel(0.4, 0.03, 10000)
    best[:1000] = 0.9  # copies on top: left out of the fitted quantiles, which shift by their share
    location, scale, shape = distinct_tail(best, above=0.1)
    assert location == pytest.approx(0.4, abs=0.002) and scale == pytest.approx(0.03, abs=0.001)
    assert shape == pytest.approx(0.0, abs=0.05)
    assert distinct_tail(best)[1] > 0.03 * 1.05  # not told the copies' share, the fit spreads the law
    t = np.array([0.4, 0.5])
    np.testing.assert_allclose(gev_sf(t, location, scale, 0.0), 1 - np.exp(-np.exp(-(t - location) / scale)))
    from scipy.stats import genextreme  # scipy's shape parameter is the negative of ours

    grid = np.linspace(-0.5, 1.5, 9)
    for shape in (-0.45, -0.2, 0.2):
        np.testing.assert_allclose(gev_sf(grid, 0.3, 0.1, shape), genextreme.sf(grid, -shape, 0.3, 0.1), atol=1e-12)
    # a bounded law (the best of a few cosines in tight clusters): the fit finds its shape, and nothing above its end
    bounded = 0.9 - 0.1 * rng.weibull(3.0, 10000)  # reversed Weibull: shape -1/3, upper end 0.9
    location, scale, shape = distinct_tail(bounded)
    assert shape == pytest.approx(-1 / 3, abs=0.05)
    above_end = np.array([0.95])
    assert gev_sf(above_end, location, scale, shape)[0] < 1e-3 < gev_sf(above_end, location, scale, 0.0)[0]


def test_calibration_warns_when_its_estimates_cannot_be_trusted_and_says_why() -> None:
    cfg = DedupCopyConfig()
    sound = Calibration(0.5, 0.95, 0.8, 0.1, 0.01, 1000, 5000, calibrated=0.5)
    assert calibration_warnings(sound, 5000, "pca", cfg) == []
    said = calibration_warnings(sound, 200, "center", cfg)
    assert len(said) == 2 and "only 200 images" in said[0] and "'center' instead of 'pca'" in said[1]
    crowded = Calibration(0.5, 0.95, 0.8, 0.45, 0.01, 1000, 5000, calibrated=0.5)
    assert "45% of images" in calibration_warnings(crowded, 5000, "pca", cfg)[0]
    floored = Calibration(0.4, 0.95, 0.8, 0.1, 0.01, 1000, 5000, calibrated=-0.6)
    assert "below min_threshold" in calibration_warnings(floored, 5000, "pca", cfg)[0]
    unreached = Calibration(0.62, 0.81, 0.3, 0.05, 0.006, 1000, 5000, calibrated=0.62)
    (said,) = calibration_warnings(unreached, 5000, "pca", cfg)
    assert "no threshold reached target_precision=0.95" in said and "estimated precision is 0.81" in said
    saturated = Calibration(0.9, 1.0, 0.1, 1.0, 0.0, 1000, 5000, calibrated=0.9)
    assert "do not describe this pool's copies" in calibration_warnings(saturated, 5000, "pca", cfg)[0]
    even = {"flip": 0.96, "jpeg": 0.9, "crop": 0.88}
    agreeing = Calibration(0.5, 0.95, 0.91, 0.1, 0.01, 1000, 5000, calibrated=0.5, recall_by_edit=even)
    assert calibration_warnings(agreeing, 5000, "pca", cfg) == []  # the families agree within 0.1
    spread = Calibration(0.5, 0.95, 0.26, 0.1, 0.01, 1000, 5000, calibrated=0.5, recall_by_edit={**even, "crop": 0.0})
    (said,) = calibration_warnings(spread, 5000, "pca", cfg)
    assert "from 0.00 (crop) to 0.96 (flip)" in said and "overall 0.26" in said


def _table(n: int, pixels: np.ndarray | None = None) -> pa.Table:
    side = pixels if pixels is not None else np.full(n, 10)
    return pa.table({schema.IMAGE_ID: [f"{i:05d}" for i in range(n)], "width": side, "height": side})


def test_dedup_copy_gives_up_rather_than_guess_when_copies_look_like_distinct_images() -> None:
    rng = np.random.default_rng(5)
    emb = _clustered(2000, 64, rng)
    src = rng.choice(2000, 200, replace=False)
    far = l2_normalize(rng.standard_normal((200, 64)))  # "copies" unrelated to their sources: no signal
    table, stats, _ = dedup_copy(_table(2000), emb, src, far, DedupCopyConfig(whiten_dims=32))
    assert stats["calibration"]["recall"] < 0.05 and table[schema.KEEP].to_pylist().count(False) <= 20


def test_dedup_copy_finds_planted_copies_and_keeps_the_largest() -> None:
    rng = np.random.default_rng(5)
    n, d, n_copies = 3000, 64, 60
    emb = _clustered(n, d, rng)
    emb[-n_copies:] = _noisy(emb[:n_copies], rng, 0.3)  # rows n-60.. copy rows 0..59
    pixels = np.full(n, 10)
    pixels[-n_copies:] = 20  # the copies are bigger: they must be the ones kept
    src = rng.choice(np.arange(100, n - n_copies), 300, replace=False)
    table, stats, _ = dedup_copy(
        _table(n, pixels), emb, src, _noisy(emb[src], rng, 0.3), DedupCopyConfig(whiten_dims=32)
    )
    rows = table.to_pylist()
    removed = {r[schema.IMAGE_ID]: r[schema.DUP_OF] for r in rows if not r[schema.KEEP]}
    planted = {f"{i:05d}": f"{n - n_copies + i:05d}" for i in range(n_copies)}
    found = sum(removed.get(k) == v for k, v in planted.items())
    assert found >= 0.9 * n_copies, stats
    assert sum(k in planted for k in removed) >= 0.8 * len(removed), stats  # precision
    assert table.schema.equals(schema.DEDUP) and stats["largest_group"] <= stats["largest_union_find_component"]
    assert {"threshold", "precision", "recall", "prevalence"} <= set(stats["calibration"])


def test_dedup_copy_fixed_threshold_and_star_grouping_prevent_chains() -> None:
    d = 8
    # A chain a-b-c-d: neighbours are similar, the ends are not.
    chain = l2_normalize(np.stack([np.cos(t) * np.eye(d)[0] + np.sin(t) * np.eye(d)[1] for t in (0, 0.4, 0.8, 1.2)]))
    other = l2_normalize(np.random.default_rng(6).standard_normal((20, d)))
    emb = np.concatenate([chain, other])
    cfg = DedupCopyConfig(threshold=float(np.cos(0.45)), whiten="none", grouping="star", k=5)
    table, stats, _ = dedup_copy(_table(len(emb)), emb, np.zeros(0, np.int64), emb[:0], cfg)
    rep = dict(zip(table[schema.IMAGE_ID].to_pylist(), table[schema.GROUP_ID].to_pylist(), strict=True))
    chain_ids = [f"{i:05d}" for i in range(4)]
    groups = {rep[c] for c in chain_ids}
    assert len(groups) >= 2  # star grouping: the ends of the chain are not merged
    for c in chain_ids:  # every member is within the threshold of its kept image
        i, j = int(c), int(rep[c])
        assert emb[i] @ emb[j] > cfg.threshold - 1e-6
    assert stats["largest_union_find_component"] >= 4  # plain union-find would have chained all four
    components = dedup_copy(
        _table(len(emb)),
        emb,
        np.zeros(0, np.int64),
        emb[:0],
        DedupCopyConfig(threshold=cfg.threshold, whiten="none", grouping="components", k=5),
    )[0]
    assert (
        len(
            {
                g
                for i, g in zip(
                    components[schema.IMAGE_ID].to_pylist(), components[schema.GROUP_ID].to_pylist(), strict=True
                )
                if i in chain_ids
            }
        )
        == 1
    )


def test_dedup_relative_removes_only_copies_of_protected_images() -> None:
    rng = np.random.default_rng(7)
    pool = _clustered(1000, 32, rng)
    protected = _clustered(50, 32, rng)
    pool[:10] = _noisy(protected[:10], rng, 0.5)  # 10 leaked evaluation images
    table = dedup_relative(
        pa.array([f"p{i}" for i in range(1000)]), pool, [f"e{i}" for i in range(50)], protected, 0.75
    )  # leaked copies are at 0.80-0.93, the best distinct pool image at 0.65
    removed = {r[schema.IMAGE_ID]: r[schema.DUP_OF] for r in table.to_pylist() if not r[schema.KEEP]}
    assert removed == {f"p{i}": f"e{i}" for i in range(10)}
    empty = dedup_relative(pa.array(["a", "b"]), pool[:2], [], protected[:0], 0.5)
    assert empty[schema.KEEP].to_pylist() == [True, True]


def test_pca_whitening_falls_back_to_centering_on_a_sample_too_small_to_fit_it_and_says_why() -> None:
    """The small-pool failure: PCA to 256 dims fitted on 200 descriptors whitens noise. Below
    ``whiten_min_per_dim`` descriptors per output dimension the stage only centres them and records why; with enough
    descriptors it whitens as configured."""
    rng = np.random.default_rng(7)
    n, d, n_copies = 300, 64, 30
    emb = _clustered(n, d, rng)
    emb[-n_copies:] = _noisy(emb[:n_copies], rng, 0.3)
    src = rng.choice(np.arange(n_copies, n - n_copies), 100, replace=False)
    copies = _noisy(emb[src], rng, 0.3)
    cfg = DedupCopyConfig(whiten_dims=48, whiten_min_per_dim=8)  # needs 384 descriptors, the pool has 300
    table, stats, whitener = dedup_copy(_table(n), emb, src, copies, cfg)
    assert stats["whitening"] == "center" and "needs 384 descriptors" in stats["whitening_why"]
    assert whitener.matrix is None and whitener.mean.any()  # centring only
    removed = {r[schema.IMAGE_ID]: r[schema.DUP_OF] for r in table.to_pylist() if not r[schema.KEEP]}
    assert (
        sum(
            removed.get(f"{i:05d}") == f"{n - n_copies + i:05d}" or removed.get(f"{n - n_copies + i:05d}") == f"{i:05d}"
            for i in range(n_copies)
        )
        >= 0.8 * n_copies
    )
    _, stats, whitener = dedup_copy(_table(n), emb, src, copies, DedupCopyConfig(whiten_dims=32, whiten_min_per_dim=8))
    assert stats["whitening"] == "pca" and whitener.matrix is not None  # 300 >= 8 x 32


def test_the_recall_rule_keeps_the_target_share_of_copies_unless_that_would_remove_too_much_of_the_pool() -> None:
    from lvdkit.curation.relative_rule import NO_BUDGET, recall_rule

    rng = np.random.default_rng(3)
    positives = rng.uniform(0.5, 1.0, 1000)  # known copies' scores against the protected set
    edits = np.where(np.arange(1000) % 2, "crop", "rotate")
    quiet = rng.uniform(-0.2, 0.3, 5000)  # clean images look like no protected one
    threshold, parts = recall_rule(positives, edits, quiet, target_recall=0.95, max_removed=0.01)
    assert np.mean(positives > threshold) == pytest.approx(0.95, abs=0.002)  # set by the copies
    assert parts["threshold_for_recall"] == threshold and parts["estimated_clean_removed"] == 0.0
    assert parts["warnings"] == []
    assert set(parts["estimated_recall_by_edit"]) == {"crop", "rotate"}
    busy = rng.uniform(0.0, 1.0, 5000)  # clean images much like the protected ones: the budget binds
    threshold, parts = recall_rule(positives, edits, busy, target_recall=0.95, max_removed=0.01)
    assert parts["estimated_clean_removed"] <= 0.01 + 1e-3 and threshold == parts["threshold_for_budget"] > 0.9
    assert parts["estimated_recall"] == pytest.approx(np.mean(positives > threshold))
    assert parts["estimated_recall"] < 0.3
    assert len(parts["warnings"]) == 1 and "budget set the threshold" in parts["warnings"][0]
    _, parts = recall_rule(positives, edits, busy[:500], target_recall=0.95, max_removed=0.01)
    assert any("noisy" in w for w in parts["warnings"])  # 500 probes: about 5 above the threshold
    threshold, parts = recall_rule(np.empty(0), np.empty(0, str), busy, 0.95, 0.05)  # no calibration copies
    assert np.mean(busy > threshold) == pytest.approx(0.05, abs=1e-3) and parts["estimated_recall"] is None
    threshold, _ = recall_rule(positives, edits, np.empty(0), 0.95, 0.01)  # nothing to estimate removals from
    assert threshold == NO_BUDGET  # removes nothing rather than guess


def test_the_pools_own_scores_bound_the_budget_when_the_decoys_overestimate_it() -> None:
    """Decoys whose copies self-dedup left in the pool make the probes' estimate run high; the probes' scores against
    the protected set (the pool's own) bound the clean removals whatever the pool holds, and the rule takes the
    lower threshold."""
    from lvdkit.curation.relative_rule import recall_rule

    rng = np.random.default_rng(5)
    positives = rng.uniform(0.1, 1.0, 1000)
    edits = np.full(1000, "crop")
    probes = np.concatenate([rng.uniform(-0.2, 0.2, 4800), rng.uniform(0.4, 0.9, 200)])  # 4% are decoys' copies
    pool = np.concatenate([rng.uniform(-0.2, 0.2, 9950), rng.uniform(0.6, 1.0, 50)])  # 50 leaks, 0.5%
    alone, parts_alone = recall_rule(positives, edits, probes, target_recall=0.99, max_removed=0.01)
    both, parts = recall_rule(positives, edits, probes, target_recall=0.99, max_removed=0.01, pool=pool)
    assert alone == parts_alone["threshold_for_budget_decoys"] > 0.7  # the decoys' copies set it
    assert parts_alone["threshold_for_budget_pool"] == 2.0  # no pool scores: no bound
    assert both == parts["threshold_for_budget_pool"] < 0.25 < alone  # the pool's bound allows all its leaks
    assert np.all(pool[-50:] > both) and np.mean(pool > both) <= 0.01 + 1e-4
    assert parts["estimated_clean_removed"] <= 0.01 + 1e-4 < float(np.mean(probes > both))  # the lower of the two
    assert np.mean(positives > both) > np.mean(positives > alone)
    busy = rng.uniform(0.0, 1.0, 10_000)  # a pool much like the protected set: the decoys set it
    _, parts = recall_rule(positives, edits, rng.uniform(-0.2, 0.2, 5000), 0.99, 0.01, pool=busy)
    assert parts["threshold_for_budget"] == parts["threshold_for_budget_decoys"] < parts["threshold_for_budget_pool"]


def test_several_decoy_draws_bound_the_clean_share_that_one_more_draw_removes() -> None:
    """Each decoy draw's probes estimate the clean share removed up to the draw's luck; the pool against the
    protected set is one more draw. One draw's quantile is exceeded by the next draw about half the time; the
    bound over four draws at confidence 0.9 rarely."""
    from lvdkit.curation.relative_rule import budget_threshold, recall_rule

    rng = np.random.default_rng(11)

    def draw() -> np.ndarray:  # a draw's clean scores: its decoys put the whole distribution a little up or down
        return rng.normal(rng.normal(0.0, 0.1), 1.0, 4000)

    over_one = over_four = 0
    trials = 200
    for _ in range(trials):
        draws = [draw() for _ in range(4)]
        new = draw()
        over_one += np.mean(new > budget_threshold(draws[:1], 0.01, 0.9)) > 0.01
        over_four += np.mean(new > budget_threshold(draws, 0.01, 0.9)) > 0.01
    assert over_one / trials > 0.35 and over_four / trials < 0.2
    same = draw()  # draws that agree: no spread, the bound is their quantile
    bound = budget_threshold([same, same.copy(), same.copy()], 0.01, 0.9)
    assert np.mean(same > bound) <= 0.01 < np.mean(same >= np.max(same[same < bound]))
    assert bound == pytest.approx(np.quantile(same, 0.99), abs=0.01)
    steps = np.arange(100.0)  # a share of exactly max_removed is within it (1 of 100 above 98)
    assert budget_threshold([steps, steps.copy()], 0.01, 0.9) == 98.0
    positives, edits = rng.uniform(0.0, 0.5, 1000), np.full(1000, "crop")
    draws = [0.1 * draw() for _ in range(4)]  # margins' scale (the rule's "no budget" is 2)
    threshold, parts = recall_rule(positives, edits, draws, 0.99, 0.01, confidence=0.9)
    assert parts["decoy_draws"] == 4 and len(parts["estimated_clean_removed_by_draw"]) == 4
    assert threshold == parts["threshold_for_budget_decoys"] == budget_threshold(draws, 0.01, 0.9)
    assert parts["estimated_clean_removed"] == pytest.approx(np.mean(parts["estimated_clean_removed_by_draw"]))
    assert parts["estimated_clean_removed"] < 0.009  # the draws' mean, held below the budget by their spread


def test_the_margin_score_tells_a_copy_from_an_image_that_merely_looks_like_many_protected_ones() -> None:
    """A common look (many protected images alike) gives a high similarity but no margin; a copy stands out from
    its source's neighbours. Protected images that copy each other form one group, so a leak of an image the
    protected set holds twice still has its margin."""
    from lvdkit.curation.relative_score import copy_groups, margins

    rng = np.random.default_rng(5)
    d = 32
    look = _unit(rng.normal(size=d))
    protected = _unit(look + 0.6 * rng.normal(size=(40, d)) / np.sqrt(d))  # 40 images of one common look
    protected = np.concatenate([protected, _unit(rng.normal(size=(10, d)))])
    protected[41] = _unit(protected[40] + 0.05 * rng.normal(size=d) / np.sqrt(d))  # held twice: 40 and 41
    common = _unit(look + 0.6 * rng.normal(size=(20, d)) / np.sqrt(d))  # clean pool images of the common look
    copy_of_0 = _unit(protected[0] + 0.45 * rng.normal(size=d) / np.sqrt(d))
    copy_of_40 = _unit(protected[40] + 0.45 * rng.normal(size=d) / np.sqrt(d))
    queries = np.concatenate([common, copy_of_0[None], copy_of_40[None]])
    groups = copy_groups(protected, 0.95)
    assert groups[40] == groups[41] and len(set(groups.tolist())) == 49
    sim, best, margin = margins(queries, protected, groups)
    assert sim[:20].max() > sim[20:].min()  # by similarity, some common look passes a copy
    assert best[20] == 0 and best[21] in (40, 41)
    assert margin[20:].min() > margin[:20].max()  # by margin, every copy stands above every common look
    ungrouped = margins(queries, protected, np.arange(len(protected)))[2]
    assert ungrouped[21] < margin[:20].max()  # without the groups, the twin hides the copy


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_a_protected_set_that_is_one_copy_group_leaves_a_copy_its_whole_similarity_as_margin() -> None:
    from lvdkit.curation.relative_score import NO_MATCH, margins

    rng = np.random.default_rng(9)
    source = _unit(rng.normal(size=16))
    protected = _unit(source + 0.05 * rng.normal(size=(3, 16)) / 4)  # three near copies of one image: one group
    sim, _, margin = margins(_unit(source + 0.3 * rng.normal(size=16) / 4)[None], protected, np.zeros(3, np.int64))
    assert margin[0] == pytest.approx(sim[0] - NO_MATCH)  # no protected image outside its group at all


def test_the_nearest_background_image_is_neither_the_query_nor_a_copy_of_it() -> None:
    from lvdkit.curation.relative_score import nearest_background

    e = np.eye(8, dtype=np.float32)
    background = _unit(np.stack([e[0], e[0] + 0.2 * e[1], e[0] + e[2], e[3]]))  # itself, a copy, a look-alike
    near = nearest_background(background[:1], background, copy_threshold=0.9)
    assert near[0] == pytest.approx(float(background[0] @ background[2]))  # 0.71: the look-alike
    assert nearest_background(background[:1], background, copy_threshold=None)[0] == pytest.approx(
        float(background[0] @ background[1])  # no copy threshold: only itself left out
    )
    assert np.isnan(nearest_background(background[:1], background[:2], 0.9)).all()  # nothing but copies
    assert np.isnan(nearest_background(background[:2], background[:0], 0.9)).all()  # no background set
    # several background sets in one search (a decoy draw's set leaves its decoys out): one row per set
    leave = np.array([[False, False, False, False], [False, False, True, False], [True, True, True, True]])
    per_set = nearest_background(background[:1], background, 0.9, excluded=leave)
    assert per_set.shape == (3, 1)
    assert per_set[0, 0] == pytest.approx(float(background[0] @ background[2]))  # as without sets
    assert per_set[1, 0] == pytest.approx(float(background[0] @ background[3]))  # the look-alike left out
    assert np.isnan(per_set[2, 0])  # every image left out
    assert nearest_background(background[:2], background[:0], 0.9, excluded=leave[:, :0]).shape == (3, 2)
    assert np.isnan(nearest_background(background[:2], background[:0], 0.9, excluded=leave[:, :0])).all()


def test_the_pools_own_crowd_tells_an_isolated_leak_from_a_clean_image_with_company_in_the_pool() -> None:
    """A photograph among other shots of its scene looks like a protected image as much as a heavily edited leak
    looks like its source, and the margin ranks it above the leak; its nearest pool image (another shot) takes
    that back, the leak has no such company. Weight 0 is the margin; no background image: the margin."""
    from lvdkit.curation.relative_score import background_margins, margins, nearest_background

    e = np.eye(12, dtype=np.float32)
    protected = e[[0, 1, 8, 9, 10, 11]]  # unrelated images; 0 and 1 matter
    leak = 0.68 * e[0] + np.sqrt(1 - 0.68**2) * e[2]  # an edited copy of protected image 0: similarity 0.68
    shot = 0.75 * e[1] + np.sqrt(1 - 0.75**2) * e[3]  # a clean photograph like protected image 1 (0.75)
    other_shot = _unit(shot + 1.2 * e[4])  # another shot of its scene: similar (0.57), not a copy
    pool = _unit(np.stack([leak, shot, other_shot, e[5], e[6]]))
    sim, _, margin = margins(pool, protected, np.arange(len(protected)))
    near = nearest_background(pool, pool, copy_threshold=0.9)
    assert margin[0] < margin[1]  # the margin alone ranks the clean shot above the leak
    mixed = background_margins(sim, margin, near, 0.5)
    assert mixed[0] > mixed[1] and mixed[0] > mixed[2:].max()  # with the pool's reference the leak stands out
    assert np.allclose(background_margins(sim, margin, near, 0.0), margin)
    assert np.allclose(background_margins(sim, margin, np.full(len(pool), np.nan, np.float32), 0.5), margin)


def test_best_per_owner_keeps_each_images_best_view_in_order() -> None:
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]], np.float32)
    rows = np.array([[0, 3, 1, 4, 5, -1]])  # 3 images, 2 slabs: rows 3, 4, 5 are views of images 0, 1, 2
    best, owners = best_per_owner(sims, rows, 3, 4)
    np.testing.assert_allclose(best, [[0.9, 0.7, 0.5, -np.inf]])
    assert owners.tolist() == [[0, 1, 2, -1]]
    rng = np.random.default_rng(3)
    x = _clustered(400, 16, rng)
    slabs = [x, _noisy(x, rng, 0.5)]
    got, got_ids = knn(build_index(np.concatenate(slabs), "flat"), x, 20)
    best, owners = best_per_owner(got, got_ids, 400, 8)
    want = np.maximum(x @ slabs[0].T, x @ slabs[1].T)  # an image's similarity: its best view's
    assert np.all(np.diff(best, axis=1) <= 0) and all(len(set(r)) == 8 for r in owners.tolist())
    np.testing.assert_allclose(best, np.take_along_axis(want, owners, axis=1), atol=1e-5)
    np.testing.assert_allclose(best[:, :3], -np.sort(-want, axis=1)[:, :3], atol=1e-5)  # the top owners


def _turned_copies(seed: int, seen: float) -> tuple[np.ndarray, ...]:
    """A pool whose last 60 images are copies of the first 60 that the plain descriptor barely sees (noise ``seen``;
    as a rotation does) and that a view of theirs, turned back, matches; synthetic copies half mild, half turned."""
    rng = np.random.default_rng(seed)
    n, d, n_copies = 3000, 64, 60
    emb = _clustered(n, d, rng)
    views = np.stack([_noisy(emb, rng, 1.5), _noisy(emb, rng, 1.5)])  # views of distinct images stay distinct
    emb[-n_copies:] = _noisy(emb[:n_copies], rng, seen)
    views[0, -n_copies:] = _noisy(emb[:n_copies], rng, 0.3)
    src = rng.choice(np.arange(100, n - n_copies), 400, replace=False)
    calib = np.concatenate([_noisy(emb[src[:200]], rng, 0.3), _noisy(views[1, src[200:]], rng, 0.3)])
    return emb, views, src, calib


def test_views_find_copies_the_plain_descriptor_misses_and_keep_the_plain_prevalence() -> None:
    emb, views, src, calib = _turned_copies(7, seen=1.0)
    n, planted = len(emb), {f"{i:05d}": f"{len(emb) - 60 + i:05d}" for i in range(60)}

    def found(table: pa.Table) -> int:  # copies grouped with their source
        group = dict(zip(table[schema.IMAGE_ID].to_pylist(), table[schema.GROUP_ID].to_pylist(), strict=True))
        return sum(group[k] == group[v] for k, v in planted.items())

    fixed = DedupCopyConfig(whiten="none", threshold=0.8)
    assert found(dedup_copy(_table(n), emb, src, calib, fixed)[0]) <= 5
    table, stats, _ = dedup_copy(_table(n), emb, src, calib, fixed, views=views)
    assert found(table) >= 50 and stats["views"] == 2
    # calibrated: the share of images with a copy is read on the plain descriptors; here they barely see the copies,
    # so it is low, and the threshold errs high: fewer copies found, none wrongly
    cfg = DedupCopyConfig(whiten_dims=32)
    _, plain, _ = dedup_copy(_table(n), emb, src, calib, cfg)
    table, stats, _ = dedup_copy(_table(n), emb, src, calib, cfg, views=views)
    assert stats["calibration"]["prevalence"] == plain["calibration"]["prevalence"]
    removed = [r for r in table.to_pylist() if not r[schema.KEEP]]
    assert removed and all(r[schema.IMAGE_ID] in planted or r[schema.DUP_OF] in planted for r in removed), removed
