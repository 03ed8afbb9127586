"""Synthetic data shared by the cluster tests: blobs on the unit sphere and a skewed mixture."""

from __future__ import annotations

import numpy as np

from lvdkit.core.knn import l2_normalize


def blobs(n: int, d: int, n_blobs: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n_blobs`` equally likely blobs around random unit centres: unit rows [n, d], labels [n]."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((n_blobs, d)))
    labels = rng.integers(0, n_blobs, n)
    return l2_normalize(centres[labels] + noise * rng.standard_normal((n, d))), labels


def skewed(n: int, d: int, n_small: int, giant_share: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One giant mode (label 0) holding ``giant_share`` of the points, ``n_small`` small equal modes: [n, d], [n]."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((n_small + 1, d)))
    weights = np.r_[giant_share, np.full(n_small, (1 - giant_share) / n_small)]
    labels = rng.choice(n_small + 1, size=n, p=weights)
    noise = 0.3 / np.sqrt(d)  # modes well apart (centre distance ~1.4, spread ~0.3)
    return l2_normalize(centres[labels] + noise * rng.standard_normal((n, d))), labels


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (1 = same partition, ~0 = chance)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)

    def pairs(v: np.ndarray) -> float:
        return float((v * (v - 1) / 2).sum())

    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), len(a) * (len(a) - 1) / 2
    expected = rows * cols / total
    return (both - expected) / ((rows + cols) / 2 - expected)


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of points whose cluster's majority label is their own label."""
    table = np.zeros((clusters.max() + 1, labels.max() + 1))
    np.add.at(table, (clusters, labels), 1)
    return float(table.max(axis=1).sum() / len(labels))
