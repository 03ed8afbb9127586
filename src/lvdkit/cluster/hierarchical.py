"""Hierarchical k-means with resampling (Vo et al. 2024, "Automatic Data Curation for Self-Supervised Learning").

Level 1 clusters the points; level l+1 clusters the centroids of level l, so every level is a partition of the
points (a point belongs to the level-(l+1) cluster of its level-l cluster). Inside each level the paper's
resampling step pulls centroids away from the dense regions: ``n_resampling_steps`` times, take the
``sample_size`` members closest to each centroid, re-fit k-means on the union of those (every cluster contributes
the same number of points, whatever its size), starting from the current centroids, and re-assign every member.
Balanced sampling over the resulting tree is in :mod:`lvdkit.cluster.sampling`.

Lists are 0-based: index 0 is the paper's level 1 (clusters of points), the last index the top level.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from lvdkit.cluster.kmeans import assign_to_centroids, kmeans, prepare
from lvdkit.core.settings import setting

POINTS_PER_LEAF = 50  # default level-1 k is N / 50 ...
MAX_LEAF_CLUSTERS = 100_000  # ... capped: flat k-means cost grows as N x k
LEVEL_RATIO = 10  # each higher level has ~10x fewer clusters
MAX_LEVELS = 4  # as in the paper
PAPER_RESAMPLING_STEPS = (1, 10, 10, 10)  # the paper's web-scale config, levels 1..4
PAPER_SAMPLE_SIZES = (1, 10, 5, 3)


def default_levels(n: int, max_leaf: int | None = MAX_LEAF_CLUSTERS) -> list[int]:
    """Clusters per level for ``n`` points, bottom-up: level 1 ``clip(n // 50, 1, 100_000)``, then each level
    ``// 10`` while that stays >= 2, at most 4 levels. E.g. 100k points -> [2000, 200, 20, 2]; 1M -> [20000, 2000,
    200, 20]; 500 -> [10]. ``max_leaf=None`` lifts the cap (the partitioned path fits level 1 per partition, so
    its cost grows with the partition, not with k)."""
    if n < 1:
        raise ValueError(f"hierarchical k-means of {n} points: need at least 1")
    levels = [int(min(max(1, n // POINTS_PER_LEAF), max_leaf or n, n))]
    while len(levels) < MAX_LEVELS and levels[-1] // LEVEL_RATIO >= 2:
        levels.append(levels[-1] // LEVEL_RATIO)
    return levels


@dataclass
class HierarchicalConfig:
    """Hierarchical k-means settings. None fields are sized to the data (see :meth:`resolve`).

    levels: clusters per level, bottom-up, non-increasing (default :func:`default_levels`).
    n_resampling_steps: resampling steps per level (default the paper's [1, 10, 10, 10], 10 for any further level).
    sample_sizes: members kept per cluster in each resampling step (default the paper's [1, 10, 5, 3], then 3).
    n_iter: Lloyd iterations of every k-means (the paper used 50). sample: training points cap of the level-1
    k-means (see :func:`lvdkit.cluster.kmeans.kmeans`).
    """

    levels: list[int] | None = None
    n_resampling_steps: list[int] | None = None
    sample_sizes: list[int] | None = None
    n_iter: int = setting(20, ge=1)
    seed: int = 0
    spherical: bool = True
    sample: int | None = setting(None, ge=1)

    def resolve(self, n: int, max_leaf: int | None = MAX_LEAF_CLUSTERS) -> tuple[list[int], list[int], list[int]]:
        """(levels, n_resampling_steps, sample_sizes) for ``n`` points, checked."""
        levels = list(self.levels) if self.levels is not None else default_levels(n, max_leaf)
        n_levels = len(levels)
        if not levels:
            raise ValueError("HierarchicalConfig.levels is empty; give at least one level")
        steps = (
            list(self.n_resampling_steps)
            if self.n_resampling_steps is not None
            else _paper(PAPER_RESAMPLING_STEPS, n_levels)
        )
        sizes = list(self.sample_sizes) if self.sample_sizes is not None else _paper(PAPER_SAMPLE_SIZES, n_levels)
        for name, values in (("n_resampling_steps", steps), ("sample_sizes", sizes)):
            if len(values) != n_levels:
                raise ValueError(f"HierarchicalConfig.{name} has {len(values)} entries for {n_levels} levels")
        if levels[0] > n or any(k < 1 for k in levels):
            raise ValueError(f"HierarchicalConfig.levels {levels}: each level needs 1 <= k <= {n} (the points)")
        if any(b > a for a, b in itertools.pairwise(levels)):
            raise ValueError(f"HierarchicalConfig.levels {levels}: must be non-increasing (level l+1 clusters level l)")
        if any(s < 0 for s in steps) or any(s < 1 for s in sizes):
            raise ValueError(f"n_resampling_steps {steps} must be >= 0 and sample_sizes {sizes} >= 1")
        return levels, steps, sizes


def _paper(values: tuple[int, ...], n_levels: int) -> list[int]:
    return [values[min(i, len(values) - 1)] for i in range(n_levels)]


@dataclass
class HierarchicalResult:
    """A tree of clusters over N points of dimension D, L levels (index 0 = clusters of points).

    centroids[l]: [k_l, D] float32. assign[l]: [N] int64, the level-l cluster of each point. parents[l]: [k_l]
    int64, the level-(l+1) cluster of each level-l cluster (l < L-1). distance: [N] float32, each point's distance
    to its level-1 centroid (``1 - cosine`` when spherical, else squared L2).
    """

    centroids: list[np.ndarray]
    assign: list[np.ndarray]
    parents: list[np.ndarray]
    distance: np.ndarray
    spherical: bool = True
    levels: list[int] = field(default_factory=list)

    @property
    def n_levels(self) -> int:
        return len(self.centroids)

    @property
    def n_points(self) -> int:
        return len(self.distance)

    def sizes(self, level: int) -> np.ndarray:
        """Points per cluster at ``level``: [k_level] int64 (empty clusters count 0)."""
        return np.bincount(self.assign[level], minlength=len(self.centroids[level])).astype(np.int64)


def hierarchical_kmeans(x: np.ndarray, cfg: HierarchicalConfig | None = None) -> HierarchicalResult:
    """Hierarchical k-means with resampling of ``x`` [N, D] (rows L2-normalised first when ``cfg.spherical``)."""
    cfg = cfg or HierarchicalConfig()
    x = prepare(x, cfg.spherical)
    levels, steps, sizes = cfg.resolve(len(x))
    centroids: list[np.ndarray] = []
    member_assign: list[np.ndarray] = []  # level l: the cluster of each level-l input (points, then centroids)
    distance = np.empty(0, np.float32)
    inputs = x
    for level, (k, n_steps, size) in enumerate(zip(levels, steps, sizes, strict=True)):
        seed = cfg.seed + 1000 * level  # distinct seeds per level: reproducible, not correlated across levels
        sample = cfg.sample if level == 0 else None
        c, a, d = fit_level(
            inputs, k, n_steps, size, n_iter=cfg.n_iter, spherical=cfg.spherical, seed=seed, sample=sample
        )
        centroids.append(c)
        member_assign.append(a)
        if level == 0:
            distance = d
        inputs = c

    return _tree(centroids, member_assign, distance, levels, cfg.spherical)


def fit_upper_levels(
    centroids: np.ndarray, cfg: HierarchicalConfig, levels: list[int], steps: list[int], sizes: list[int]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Levels 2.. of the tree on the level-1 ``centroids`` (as :func:`hierarchical_kmeans` fits them): each
    level's centroids and each lower-level cluster's parent."""
    out, parents, inputs = [], [], centroids
    for level in range(1, len(levels)):
        c, a, _ = fit_level(
            inputs,
            levels[level],
            steps[level],
            sizes[level],
            n_iter=cfg.n_iter,
            spherical=cfg.spherical,
            seed=cfg.seed + 1000 * level,
            sample=None,
        )
        out.append(c)
        parents.append(a)
        inputs = c
    return out, parents


def _tree(
    centroids: list[np.ndarray],
    member_assign: list[np.ndarray],
    distance: np.ndarray,
    levels: list[int],
    spherical: bool,
) -> HierarchicalResult:
    assign = [member_assign[0]]
    for level in range(1, len(levels)):
        assign.append(member_assign[level][assign[-1]])  # a point's cluster is its level-(l-1) cluster's cluster
    return HierarchicalResult(
        centroids=centroids,
        assign=assign,
        parents=member_assign[1:],
        distance=distance,
        spherical=spherical,
        levels=levels,
    )


def fit_level(
    x: np.ndarray, k: int, n_steps: int, size: int, *, n_iter: int, spherical: bool, seed: int, sample: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means of ``x`` [M, D] into ``k``, then ``n_steps`` resampling steps. Returns centroids, assign, distance."""
    centroids, assign, dist = kmeans(x, k, n_iter=n_iter, spherical=spherical, seed=seed, sample=sample)
    for step in range(n_steps):
        keep = closest_per_cluster(assign, dist, k, size)
        union = x[keep]
        # a cluster left empty by the assignment contributes its own centroid, so the union still has >= k points
        # and the cluster can survive the re-fit
        empty = np.flatnonzero(np.bincount(assign, minlength=k) == 0)
        if len(empty):
            union = np.concatenate([union, centroids[empty]])
        centroids, _, _ = kmeans(
            union, k, n_iter=n_iter, spherical=spherical, seed=seed + step + 1, init_centroids=centroids
        )
        assign, dist = assign_to_centroids(x, centroids, spherical=spherical)
    return centroids, assign, dist


def closest_per_cluster(assign: np.ndarray, dist: np.ndarray, k: int, size: int) -> np.ndarray:
    """Indices of the (at most) ``size`` members closest to their centroid in each of ``k`` clusters.

    assign, dist: [M]. Returns sorted int64 indices, ``sum(min(size, |cluster|))`` of them.
    """
    order = np.lexsort((dist, assign))  # by cluster, then by distance
    sorted_assign = assign[order]
    first = np.searchsorted(sorted_assign, np.arange(k))  # [k] start of each cluster in ``order``
    rank = np.arange(len(order)) - first[sorted_assign]  # position of each member within its cluster
    return np.sort(order[rank < size])
