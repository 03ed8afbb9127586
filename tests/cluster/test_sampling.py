"""Cap search, exact allocation and balanced sampling over a cluster tree (synthetic trees and real k-means)."""

from __future__ import annotations

import numpy as np
import pytest

from lvdkit.cluster import (
    HierarchicalConfig,
    HierarchicalResult,
    allocate,
    balanced_sample,
    find_cap,
    hierarchical_kmeans,
)

from ._data import skewed


def _brute_cap(sizes: np.ndarray, target: int) -> int:
    if target >= sizes.sum():
        return int(sizes.max(initial=0))
    return next(x for x in range(int(sizes.max(initial=0)) + 1) if np.minimum(x, sizes).sum() >= target)


def test_find_cap_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(0, rng.choice([3, 40, 500]), size=rng.integers(1, 25))
        total = int(sizes.sum())
        targets = {0, 1, total // 3, total // 2, max(0, total - 1), total, total + 7, int(rng.integers(0, total + 2))}
        for target in targets:
            assert find_cap(sizes, target) == _brute_cap(sizes, target), (sizes.tolist(), target)
    assert find_cap(np.array([], np.int64), 5) == 0
    assert find_cap(np.array([5, 1, 9]), -3) == 0


def test_allocate_is_exact_capped_and_max_min_fair() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        sizes = rng.integers(0, rng.choice([2, 30, 1000]), size=rng.integers(1, 30))
        target = int(rng.integers(0, sizes.sum() + 5))
        share = allocate(sizes, target)
        assert share.sum() == min(target, sizes.sum())
        assert np.all((share >= 0) & (share <= sizes))
        open_ = share < sizes  # clusters not taken whole
        if open_.any():
            # the open clusters share within one point of each other, and hold at least any whole cluster - 1
            assert share[open_].max() - share[open_].min() <= 1
            assert share[open_].min() >= share.max() - 1
    np.testing.assert_array_equal(allocate(np.array([10, 10, 10]), 4), [2, 1, 1])  # remainder: lowest index first
    np.testing.assert_array_equal(allocate(np.array([3, 10, 8]), 4), [1, 2, 1])  # ... after the largest


def _random_tree(rng: np.random.Generator, n: int, ks: list[int]) -> HierarchicalResult:
    """A random tree over n points with ks clusters per level: skewed sizes, tiny and empty clusters included."""
    weights = rng.pareto(1.0, ks[0]) + 1e-3
    weights[rng.random(ks[0]) < 0.2] = 0  # some empty level-1 clusters
    if weights.sum() == 0:
        weights[0] = 1
    assign = [rng.choice(ks[0], size=n, p=weights / weights.sum()).astype(np.int64)]
    parents: list[np.ndarray] = []
    for k_up in ks[1:]:
        parent = rng.integers(0, k_up, size=ks[len(parents)]).astype(np.int64)  # children of the level below
        parents.append(parent)
        assign.append(parent[assign[-1]])
    return HierarchicalResult(
        centroids=[np.zeros((k, 2), np.float32) for k in ks],
        assign=assign,
        parents=parents,
        distance=rng.random(n).astype(np.float32),
        levels=list(ks),
    )


@pytest.mark.parametrize("strategy", ["random", "closest"])
def test_balanced_sample_hits_the_target_exactly(strategy: str) -> None:
    rng = np.random.default_rng(2)
    for trial in range(60):
        n = int(rng.integers(1, 400))
        k1 = int(rng.integers(1, 40))
        ks = [k1, *sorted(rng.integers(1, k1 + 1, size=int(rng.integers(0, 3))).tolist(), reverse=True)]
        tree = _random_tree(rng, n, ks)
        for target in {0, 1, n // 7, n // 2, n - 1, n, n + 13, int(rng.integers(0, n + 1))}:
            picked = balanced_sample(tree, target, strategy=strategy, seed=trial)  # type: ignore[arg-type]
            assert len(picked) == min(max(target, 0), n)
            assert len(np.unique(picked)) == len(picked) and picked.dtype == np.int64
            assert picked.min(initial=0) >= 0 and picked.max(initial=0) < n
            # the top level gets exactly the capped allocation of the target
            top = tree.n_levels - 1
            got = np.bincount(tree.assign[top][picked], minlength=len(tree.centroids[top]))
            np.testing.assert_array_equal(got, allocate(tree.sizes(top), min(target, n)))


def test_tiny_clusters_are_taken_whole() -> None:
    # level 1: sizes [1, 1, 2, 200]; two top clusters: {0, 1, 2} (4 points) and {3} (200 points)
    assign0 = np.r_[0, 1, 2, 2, np.full(200, 3)].astype(np.int64)
    parents = np.array([0, 0, 0, 1], np.int64)
    tree = HierarchicalResult(
        centroids=[np.zeros((4, 2), np.float32), np.zeros((2, 2), np.float32)],
        assign=[assign0, parents[assign0]],
        parents=[parents],
        distance=np.linspace(0, 1, 204, dtype=np.float32),
    )
    picked = balanced_sample(tree, 20)
    np.testing.assert_array_equal(np.bincount(assign0[picked], minlength=4), [1, 1, 2, 16])
    picked = balanced_sample(tree, 8, strategy="closest")  # top split [4, 4]
    np.testing.assert_array_equal(picked, [0, 1, 2, 3, 4, 5, 6, 7])  # the 4 small + the 4 closest of the big one
    picked = balanced_sample(tree, 6, strategy="closest")  # top split [3, 3]: one per small cluster
    np.testing.assert_array_equal(picked, [0, 1, 2, 4, 5, 6])


def test_balanced_sample_on_a_skewed_mixture_is_more_balanced_than_random() -> None:
    x, labels = skewed(6000, 16, n_small=30, giant_share=0.7, seed=5)  # 31 modes, mode 0 holds 70% of the points
    result = hierarchical_kmeans(x, HierarchicalConfig(levels=[150, 30, 6], n_iter=10))
    flat = hierarchical_kmeans(x, HierarchicalConfig(levels=[150], n_iter=10))
    target = 600
    balanced = balanced_sample(result, target, seed=0)
    balanced_flat = balanced_sample(flat, target, seed=0)
    uniform = np.random.default_rng(0).choice(len(x), target, replace=False)
    assert len(balanced) == len(balanced_flat) == target

    def counts(idx: np.ndarray) -> np.ndarray:
        return np.bincount(labels[idx], minlength=31)

    def entropy(idx: np.ndarray) -> float:
        p = counts(idx) / len(idx)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    assert counts(uniform)[0] / target > 0.6 and counts(balanced)[0] / target < 0.15  # the giant mode shrinks
    assert entropy(balanced) > entropy(uniform) + 1.5  # the max is ln 31 = 3.43
    assert counts(balanced).min() > 0
    ratio = counts(balanced).max() / counts(balanced).min()
    assert ratio < 0.1 * counts(uniform).max() / max(1, counts(uniform).min())
    # flat k-means puts clusters where the points are: its balanced sample stays dominated by the giant mode
    assert counts(balanced_flat)[0] > 3 * counts(balanced)[0]
    assert entropy(balanced) > entropy(balanced_flat) + 0.5

    closest = balanced_sample(result, target, strategy="closest")
    assert result.distance[closest].mean() < 0.8 * result.distance[balanced].mean()
    # same clusters, same shares: only the picks inside the level-1 clusters differ
    np.testing.assert_array_equal(np.bincount(result.assign[0][closest]), np.bincount(result.assign[0][balanced]))


def test_seeds_and_errors() -> None:
    rng = np.random.default_rng(3)
    tree = _random_tree(rng, 300, [12, 3])
    a, b, c = (balanced_sample(tree, 100, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    custom = np.arange(300, dtype=np.float32)[::-1].copy()  # the last points are "closest"
    picked = balanced_sample(tree, 300, strategy="closest", distance=custom)
    assert len(picked) == 300
    with pytest.raises(ValueError, match="valid: 'random', 'closest'"):
        balanced_sample(tree, 10, strategy="farthest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        balanced_sample(tree, -1)
    with pytest.raises(ValueError, match="expected \\(300,\\)"):
        balanced_sample(tree, 10, strategy="closest", distance=custom[:10])


def test_shares_from_counts_alone_pick_what_the_balanced_sample_picks() -> None:
    """The partitioned path knows per-cluster counts, not the points: its shares must match the points' sample."""
    from lvdkit.cluster.sampling import pick_by_share, shares

    x, _ = skewed(n=3000, d=16, n_small=20, giant_share=0.5, seed=3)
    result = hierarchical_kmeans(x, HierarchicalConfig(levels=[60, 8, 2], seed=0))
    keys = np.random.default_rng(5).random(len(x))
    for target in (0, 7, 300, 1500, 3000):
        picked = balanced_sample(result, target, keys=keys)
        share = shares(result.sizes(0), result.parents, [len(c) for c in result.centroids], target)
        np.testing.assert_array_equal(share, np.bincount(result.assign[0][picked], minlength=60))
        np.testing.assert_array_equal(pick_by_share(result.assign[0], keys, share), picked)
