"""Flat k-means on real Faiss: blob recovery, spherical geometry, determinism, seeding, chunked assignment."""

from __future__ import annotations

import numpy as np
import pytest

from lvdkit.cluster import assign_to_centroids, kmeans, kmeans_pp_seeds
from lvdkit.core.knn import gpu_available

from ._data import ari, blobs, purity


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_recovers_well_separated_blobs(seed: int) -> None:
    x, labels = blobs(2000, 32, 8, noise=0.03, seed=seed)
    _, assign, _ = kmeans(x, 8, seed=seed)
    assert ari(labels, assign) > 0.95
    assert purity(labels, assign) > 0.95
    assert len(np.unique(assign)) == 8


def test_spherical_centroids_unit_and_distance_is_one_minus_cosine() -> None:
    x, _ = blobs(1500, 16, 6, noise=0.3, seed=4)
    raw = x * np.random.default_rng(0).uniform(0.5, 3.0, (len(x), 1)).astype(np.float32)  # not unit: normalised
    centroids, assign, dist = kmeans(raw, 10, n_iter=10, seed=0)
    assert centroids.shape == (10, 16) and centroids.dtype == np.float32
    assert assign.shape == (1500,) and assign.dtype == np.int64
    assert dist.shape == (1500,) and dist.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    cos = x @ centroids.T  # [N, k] with the unit rows
    np.testing.assert_allclose(dist, 1.0 - cos[np.arange(len(x)), assign], atol=1e-5)
    assert np.all(cos[np.arange(len(x)), assign] >= cos.max(axis=1) - 1e-5)  # the nearest centroid


def test_euclidean_distance_is_squared_l2_to_nearest() -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((800, 8)) * 3).astype(np.float32)
    centroids, assign, dist = kmeans(x, 7, spherical=False, seed=1)
    d2 = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(dist, d2[np.arange(len(x)), assign], rtol=1e-4, atol=1e-3)
    assert np.all(d2[np.arange(len(x)), assign] <= d2.min(axis=1) + 1e-3)
    assert not np.allclose(np.linalg.norm(centroids, axis=1), 1.0)


def test_deterministic_for_a_seed() -> None:
    x, _ = blobs(1200, 16, 5, noise=0.4, seed=6)
    a = kmeans(x, 12, seed=3, sample=600)
    b = kmeans(x, 12, seed=3, sample=600)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


def test_sample_caps_training_and_chunked_assignment_matches() -> None:
    x, labels = blobs(3000, 16, 4, noise=0.05, seed=7)
    centroids, assign, dist = kmeans(x, 4, sample=200, chunk=257)  # trained on 200 points, assigned in 12 chunks
    assert ari(labels, assign) > 0.95  # 50 points per blob are plenty for well-separated blobs
    a2, d2 = assign_to_centroids(x, centroids, chunk=100_000)
    np.testing.assert_array_equal(assign, a2)
    np.testing.assert_array_equal(dist, d2)


def test_kmeans_pp_seeds_are_data_rows_covering_blobs() -> None:
    x, labels = blobs(2000, 32, 10, noise=0.05, seed=8)
    seeds = kmeans_pp_seeds(x, 10, seed=0)
    nearest = np.argmax(seeds @ x.T, axis=1)
    np.testing.assert_allclose(np.max(seeds @ x.T, axis=1), 1.0, atol=1e-5)  # each seed is a point
    assert len(set(labels[nearest].tolist())) == 10  # greedy D² sampling: one seed per blob
    batched = kmeans_pp_seeds(x, 50, seed=0, rounds=5)  # 10 seeds per round
    assert len(np.unique(np.round(batched, 5), axis=0)) == 50
    assert len(set(labels[np.argmax(batched @ x.T, axis=1)].tolist())) == 10


def test_k_means_with_given_init_and_zero_iterations_keeps_it() -> None:
    x, _ = blobs(500, 8, 3, noise=0.2, seed=9)
    init = x[:5]
    centroids, assign, _ = kmeans(x, 5, n_iter=0, init_centroids=init)
    np.testing.assert_allclose(centroids, init, atol=1e-6)
    np.testing.assert_array_equal(assign, np.argmax(x @ init.T, axis=1))


def test_invalid_arguments() -> None:
    x, _ = blobs(100, 8, 2, noise=0.1)
    with pytest.raises(ValueError, match="1 <= k <= 100"):
        kmeans(x, 101)
    with pytest.raises(ValueError, match="valid: 'kmeans\\+\\+', 'random'"):
        kmeans(x, 3, init="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="smaller than k"):
        kmeans(x, 10, sample=5)
    with pytest.raises(ValueError, match="expected \\(3, 8\\)"):
        kmeans(x, 3, init_centroids=x[:4])
    if not gpu_available():
        with pytest.raises(ValueError, match="gpu=True"):
            kmeans(x, 3, gpu=True)
