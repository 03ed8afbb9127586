"""Partitioned exact k-NN (``lvdkit.core.partitions``): cells, partition plans, merged top-k lists, border recall."""

from __future__ import annotations

import itertools

import numpy as np

from lvdkit.core.knn import l2_normalize
from lvdkit.core.partitions import assign_cells, fit_cells, merge_top, pairs_within, plan_ranges, top_against


def _pool_with_copies(
    n: int = 3000, d: int = 32, copies: int = 150, seed: int = 0
) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Clustered unit descriptors with planted near copies (the last ``copies`` rows copy random earlier rows)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d))
    x = centres[rng.integers(0, 20, n - copies)] + 0.6 * rng.normal(size=(n - copies, d))
    src = rng.choice(n - copies, copies, replace=False)
    x = l2_normalize(np.concatenate([x, x[src] + 0.05 * rng.normal(size=(copies, d))]))
    return x, {(int(s), n - copies + i) for i, s in enumerate(src)}


def test_partition_plans_hold_the_budget_and_cover_every_cell_once() -> None:
    counts = np.array([5, 1, 7, 3, 12, 0, 4, 4])
    ranges = plan_ranges(counts, budget_rows=8)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(counts)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # consecutive, no gap, no overlap
    for start, stop in ranges:
        held = counts[start:stop].sum()
        assert held <= 8 or stop - start == 1  # only a single oversized cell may exceed the budget
    assert (4, 5) in ranges  # the 12-row cell stands alone


def test_merged_top_lists_equal_the_top_of_everything() -> None:
    rng = np.random.default_rng(1)
    x = l2_normalize(rng.normal(size=(500, 16)))
    queries = l2_normalize(rng.normal(size=(40, 16)))
    keys = np.arange(500, dtype=np.int64) * 7
    whole = top_against(queries, x, keys, 5)
    merged = top_against(queries, x[:123], keys[:123], 5)
    for start, stop in ((123, 300), (300, 301), (301, 500)):
        merged = merge_top(merged, top_against(queries, x[start:stop], keys[start:stop], 5))
    np.testing.assert_allclose(merged[0], whole[0], rtol=1e-6)
    np.testing.assert_array_equal(merged[1], whole[1])


def _found(x: np.ndarray, m: int, n_cells: int, threshold: float) -> set[tuple[int, int]]:
    cells = assign_cells(x, fit_cells(x, n_cells, seed=0), m)
    found: set[tuple[int, int]] = set()
    for cell in range(n_cells):
        members = np.flatnonzero((cells == cell).any(axis=1))
        pairs, _ = pairs_within(x[members], k=len(members), threshold=threshold)
        found |= {(int(members[a]), int(members[b])) for a, b in pairs}
    return found


def test_pairs_within_partitions_are_exact_and_a_second_cell_recovers_the_border_pairs() -> None:
    x, planted = _pool_with_copies()
    exact, _ = pairs_within(x, k=len(x), threshold=0.9)  # every pair above the threshold
    exact_pairs = {(int(a), int(b)) for a, b in exact}
    assert planted <= exact_pairs
    one, two = _found(x, 1, 40, 0.9), _found(x, 2, 40, 0.9)
    assert one <= exact_pairs and two <= exact_pairs  # exact inside a partition: nothing false is found
    recall_one, recall_two = len(one & exact_pairs) / len(exact_pairs), len(two & exact_pairs) / len(exact_pairs)
    assert recall_two >= 0.99
    assert recall_one < recall_two  # one cell per descriptor misses pairs across a border (0.93 here)
