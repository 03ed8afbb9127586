"""Balanced sampling over a hierarchical k-means tree (Vo et al. 2024, "Automatic Data Curation for SSL").

Top-down: the target is split over the top-level clusters with a cap (every cluster gets ``min(cap, size)``, the
cap found by binary search so the total reaches the target), each cluster's share is split the same way over its
child clusters, down to the level-1 clusters, where members are picked at random or closest to the centroid. Small
clusters are taken whole and the large ones share what is left equally, so the sample is balanced over the
concepts the clusters stand for rather than proportional to their frequency.

All clusters of a level are handled at once (a binary search per cluster run in lockstep with ``np.bincount``),
so the cost is a few passes over the N points, not a Python loop over clusters.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from lvdkit.cluster.hierarchical import HierarchicalResult

Strategy = Literal["random", "closest"]


def find_cap(sizes: np.ndarray, target: int) -> int:
    """The smallest integer cap x with ``sum(min(x, sizes)) >= target``, by binary search.

    sizes: [M] non-negative ints. ``target >= sum(sizes)`` gives ``max(sizes)`` (0 for no clusters); ``target <= 0``
    gives 0.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) == 0:
        return 0
    caps = _group_caps(sizes, np.zeros(len(sizes), np.int64), np.asarray([target], np.int64))
    return int(caps[0])


def allocate(sizes: np.ndarray, target: int) -> np.ndarray:
    """Split ``min(target, sum(sizes))`` over clusters of ``sizes`` [M]: [M] int64 shares, each <= its size.

    Each cluster gets ``min(cap - 1, size)`` with cap from :func:`find_cap`, and the remainder goes one each to the
    clusters that can take it, largest first (ties: lower index first), so the total is exact and deterministic.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    target = min(max(0, int(target)), int(sizes.sum()))
    return _group_allocate(sizes, np.zeros(len(sizes), np.int64), np.asarray([target], np.int64))


def balanced_sample(
    result: HierarchicalResult,
    target: int,
    *,
    strategy: Strategy = "random",
    seed: int = 0,
    distance: np.ndarray | None = None,
    keys: np.ndarray | None = None,
) -> np.ndarray:
    """Exactly ``min(target, N)`` distinct point indices (sorted, int64) balanced over the tree of ``result``.

    strategy: 'random' (seeded, or the smallest of the given random ``keys`` [N] first) or 'closest' (smallest
    ``distance`` to the level-1 centroid first; ``distance`` [N] defaults to ``result.distance``) picks the members
    inside each level-1 cluster.
    """
    if strategy not in ("random", "closest"):
        raise ValueError(f"balanced_sample strategy {strategy!r}; valid: 'random', 'closest'")
    if target < 0:
        raise ValueError(f"balanced_sample target={target}; must be >= 0")
    n = result.n_points
    target = min(int(target), n)

    # top level: one group holding every top cluster
    top = result.n_levels - 1
    share = allocate(result.sizes(top), target)  # [k_top]
    for level in range(top - 1, -1, -1):
        # each cluster of level+1 splits its share over its children at this level
        share = _group_allocate(result.sizes(level), result.parents[level], share)

    if strategy == "random":
        key = np.random.default_rng(seed).random(n) if keys is None else np.asarray(keys, dtype=np.float64)
    else:
        key = np.asarray(result.distance if distance is None else distance, dtype=np.float64)
        if key.shape != (n,):
            raise ValueError(f"distance has shape {key.shape}; expected ({n},)")
    assign = result.assign[0]
    order = np.lexsort((key, assign))  # by level-1 cluster, then by key
    sorted_assign = assign[order]
    first = np.searchsorted(sorted_assign, np.arange(len(share)))
    rank = np.arange(n) - first[sorted_assign]  # position of each point within its level-1 cluster
    picked = np.sort(order[rank < share[sorted_assign]])
    assert len(picked) == target, (len(picked), target)  # shares sum to the target and never exceed a cluster
    return picked.astype(np.int64)


def shares(sizes: np.ndarray, parents: list[np.ndarray], n_clusters: list[int], target: int) -> np.ndarray:
    """Top-down balanced shares of ``target`` over level-1 clusters of ``sizes`` [k_1] (members each), whose
    level-(l+1) cluster is ``parents[l]`` [k_l] (``n_clusters``: k per level): what :func:`balanced_sample` takes
    from each level-1 cluster. Needs only per-cluster counts, so a partitioned run computes it without the points."""
    per_level = [np.asarray(sizes, dtype=np.int64)]
    for parent, k in zip(parents, n_clusters[1:], strict=True):
        per_level.append(np.bincount(parent, weights=per_level[-1], minlength=k).astype(np.int64))
    share = allocate(per_level[-1], min(int(target), int(per_level[0].sum())))
    for level in range(len(parents) - 1, -1, -1):
        share = _group_allocate(per_level[level], parents[level], share)
    return share


def pick_by_share(cluster: np.ndarray, key: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Indices (sorted) of the ``share[c]`` members of each cluster ``c`` with the smallest ``key``.
    cluster, key: [M] (the members at hand: a whole partition's clusters); share: indexed by cluster."""
    order = np.lexsort((key, cluster))
    sorted_cluster = cluster[order]
    first = np.searchsorted(sorted_cluster, sorted_cluster)  # start of each member's cluster in ``order``
    rank = np.arange(len(order)) - first
    return np.sort(order[rank < share[sorted_cluster]])


def _group_caps(sizes: np.ndarray, group: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per group g, the smallest cap x_g with ``sum_{i in g} min(x_g, sizes_i) >= targets_g`` (the group's largest
    size when the target reaches its total). sizes, group: [M]; targets: [G]. Returns [G] int64."""
    n_groups = len(targets)
    hi = np.zeros(n_groups, np.int64)
    np.maximum.at(hi, group, sizes)  # the largest size of each group: its sum reaches the group total
    lo = np.zeros(n_groups, np.int64)
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        total = np.bincount(group, weights=np.minimum(mid[group], sizes), minlength=n_groups)  # exact below 2**53
        ok = total >= targets
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid + 1)
    return hi


def _group_allocate(sizes: np.ndarray, group: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Split ``targets[g]`` over the members of each group g (``targets[g] <= sum of its sizes``). Returns [M]."""
    sizes = np.asarray(sizes, dtype=np.int64)
    group = np.asarray(group, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    cap = _group_caps(sizes, group, targets)[group]  # [M]
    # with cap - 1 the total is still short of the target (cap is the smallest that reaches it), and every member
    # whose size reaches cap can take one more: hand out the remainder one each, largest members first
    base = np.minimum(np.maximum(cap - 1, 0), sizes)
    remainder = targets - np.bincount(group, weights=base, minlength=len(targets)).astype(np.int64)  # [G]
    eligible = np.flatnonzero((cap >= 1) & (sizes >= cap))
    order = eligible[np.lexsort((eligible, -sizes[eligible], group[eligible]))]  # by group, size desc, index
    g = group[order]
    first = np.searchsorted(g, np.arange(len(targets)))
    rank = np.arange(len(order)) - first[g]
    share = base.copy()
    share[order[rank < remainder[g]]] += 1
    return share
