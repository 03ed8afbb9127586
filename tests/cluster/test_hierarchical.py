"""Hierarchical k-means with resampling on real Faiss: default sizing, shapes, tree consistency, resampling."""

from __future__ import annotations

import numpy as np
import pytest

from lvdkit.cluster import HierarchicalConfig, default_levels, hierarchical_kmeans
from lvdkit.cluster.sampling import balanced_sample

from ._data import skewed


def test_default_levels_rule() -> None:
    assert default_levels(100_000) == [2000, 200, 20, 2]
    assert default_levels(1_000_000) == [20_000, 2000, 200, 20]
    assert default_levels(100_000_000) == [100_000, 10_000, 1000, 100]  # level 1 capped
    assert default_levels(1000) == [20, 2]
    assert default_levels(500) == [10]
    assert default_levels(30) == [1]
    assert HierarchicalConfig().resolve(100_000) == ([2000, 200, 20, 2], [1, 10, 10, 10], [1, 10, 5, 3])
    assert HierarchicalConfig().resolve(1000)[1:] == ([1, 10], [1, 10])


def test_shapes_consistency_and_level_sizes() -> None:
    x, _ = skewed(3000, 16, n_small=20, giant_share=0.5, seed=1)
    cfg = HierarchicalConfig(levels=[60, 12, 3], n_resampling_steps=[1, 2, 2], sample_sizes=[1, 4, 3], n_iter=10)
    r = hierarchical_kmeans(x, cfg)
    assert r.n_levels == 3 and r.n_points == 3000 and r.levels == [60, 12, 3]
    for level, k in enumerate(cfg.levels or []):
        assert r.centroids[level].shape == (k, 16)
        np.testing.assert_allclose(np.linalg.norm(r.centroids[level], axis=1), 1.0, atol=1e-5)
        assert r.assign[level].shape == (3000,) and r.assign[level].dtype == np.int64
        assert r.assign[level].min() >= 0 and r.assign[level].max() < k
        assert r.sizes(level).sum() == 3000 and len(r.sizes(level)) == k
    assert [p.shape for p in r.parents] == [(60,), (12,)]
    for level in (1, 2):
        # points of one level-(l-1) cluster all share one level-l cluster, the one its parents entry names
        np.testing.assert_array_equal(r.assign[level], r.parents[level - 1][r.assign[level - 1]])
        pairs = np.unique(np.stack([r.assign[level - 1], r.assign[level]], axis=1), axis=0)
        assert len(pairs) == len(np.unique(r.assign[level - 1]))
    # distance: 1 - cosine to the level-1 centroid, which is the nearest one
    cos = x @ r.centroids[0].T
    np.testing.assert_allclose(r.distance, 1 - cos[np.arange(3000), r.assign[0]], atol=1e-5)
    assert np.all(cos[np.arange(3000), r.assign[0]] >= cos.max(axis=1) - 1e-5)
    # level l+1 clusters the level-l centroids: each centroid goes to its nearest level-(l+1) centroid
    up = r.centroids[0] @ r.centroids[1].T
    assert np.all(up[np.arange(60), r.parents[0]] >= up.max(axis=1) - 1e-5)


def test_deterministic_and_default_config() -> None:
    x, _ = skewed(1000, 8, n_small=10, giant_share=0.5, seed=2)
    a = hierarchical_kmeans(x, HierarchicalConfig(n_iter=5))
    b = hierarchical_kmeans(x, HierarchicalConfig(n_iter=5))
    assert a.levels == [20, 2]  # default_levels(1000)
    for u, v in zip(a.assign, b.assign, strict=True):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a.distance, b.distance)


def test_resampling_with_one_member_snaps_centroids_to_points() -> None:
    # the paper's level-1 setting (1 step, sample size 1): the re-fit sees only the member closest to each centroid,
    # so each centroid becomes that member, a real point, instead of a mean
    x, _ = skewed(3000, 16, n_small=20, giant_share=0.7, seed=3)
    plain = hierarchical_kmeans(x, HierarchicalConfig(levels=[50], n_resampling_steps=[0], sample_sizes=[1]))
    snapped = hierarchical_kmeans(x, HierarchicalConfig(levels=[50], n_resampling_steps=[1], sample_sizes=[1]))

    def share_on_points(c: np.ndarray) -> float:
        return float(np.mean((c @ x.T).max(axis=1) > 1 - 1e-5))

    assert share_on_points(plain.centroids[0]) < 0.1
    assert share_on_points(snapped.centroids[0]) > 0.9
    assert np.mean(plain.assign[0] != snapped.assign[0]) > 0.01  # points were re-assigned
    # mean distances grow (a point is not the cluster's best centre) but stay close to the plain fit
    assert plain.distance.mean() < snapped.distance.mean() < 2 * plain.distance.mean()


def test_a_balanced_sample_over_the_hierarchy_evens_out_a_skewed_pool() -> None:
    """What the method is for (Vo et al. 2024): one concept holds 70% of the pool, yet a balanced sample drawn over
    the hierarchy takes every concept at about the same rate; over a flat clustering with as many level-1 clusters,
    the giant concept keeps most of its share (it holds most of the clusters)."""
    x, labels = skewed(3000, 16, n_small=20, giant_share=0.7, seed=4)
    base = dict(sample_sizes=[10, 5], n_iter=10)
    tree = hierarchical_kmeans(x, HierarchicalConfig(levels=[80, 21], n_resampling_steps=[5, 5], **base))  # type: ignore[arg-type]
    flat = hierarchical_kmeans(x, HierarchicalConfig(levels=[80], n_resampling_steps=[0], sample_sizes=[1]))

    def giant_share(picked: np.ndarray) -> float:
        return float(np.mean(labels[picked] == 0))

    from_tree, from_flat = balanced_sample(tree, 210), balanced_sample(flat, 210)
    assert np.mean(labels == 0) > 0.65 and giant_share(from_flat) > 0.4
    assert giant_share(from_tree) < 0.2 < giant_share(from_flat) / 2
    assert np.all(np.bincount(labels[from_tree], minlength=21)[1:] >= 3)  # every small concept is in the sample


def test_resampling_changes_the_fit_on_a_skewed_set() -> None:
    x, _ = skewed(3000, 16, n_small=20, giant_share=0.7, seed=4)
    base = dict(levels=[80, 10], sample_sizes=[10, 5], n_iter=10)
    plain = hierarchical_kmeans(x, HierarchicalConfig(n_resampling_steps=[0, 0], **base))  # type: ignore[arg-type]
    resampled = hierarchical_kmeans(x, HierarchicalConfig(n_resampling_steps=[5, 5], **base))  # type: ignore[arg-type]
    assert not np.allclose(plain.centroids[0], resampled.centroids[0], atol=1e-3)
    assert not np.array_equal(plain.assign[1], resampled.assign[1])


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (HierarchicalConfig(levels=[10, 20]), "non-increasing"),
        (HierarchicalConfig(levels=[10, 2], n_resampling_steps=[1]), "n_resampling_steps has 1 entries for 2"),
        (HierarchicalConfig(levels=[10, 2], sample_sizes=[1, 2, 3]), "sample_sizes has 3 entries for 2"),
        (HierarchicalConfig(levels=[500]), "1 <= k <= 100"),
        (HierarchicalConfig(levels=[]), "empty"),
        (HierarchicalConfig(levels=[10], sample_sizes=[0]), "sample_sizes"),
    ],
)
def test_invalid_config(cfg: HierarchicalConfig, match: str) -> None:
    x, _ = skewed(100, 8, n_small=3, giant_share=0.5)
    with pytest.raises(ValueError, match=match):
        hierarchical_kmeans(x, cfg)
