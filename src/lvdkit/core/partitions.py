"""Partitioned exact k-NN: a coarse quantizer splits the pool into cells; work runs per partition of cells.

The shape of NeMo Curator's semantic dedup and of LVD's retrieval at scale: k-means on a sample gives ``C`` cells;
every descriptor is assigned to its ``m`` nearest cells (``m >= 2``, so neighbours on either side of a cell border
still meet in some cell); consecutive cells are grouped into partitions whose member count fits a memory budget; the
k-NN inside each partition is exact (Faiss flat), so every pair found is a true pair and recall only depends on
whether two near neighbours share one of their ``m`` cells (measured in ``bench/scale_curation.py``).

Everything here is plain numpy and Faiss on arrays; which process runs it is the pipeline's business.
"""

from __future__ import annotations

import numpy as np

from lvdkit.core.faiss_lib import faiss
from lvdkit.core.knn import gpu_available, knn, pairs_above

ROW_KEY_SHIFT = 32  # a pool row's global key: (input part << 32) | row within the part


def row_keys(part: int, n: int) -> np.ndarray:
    """Global int64 keys of the ``n`` rows of input part ``part`` (unique across the pool, no offsets needed)."""
    return (np.int64(part) << ROW_KEY_SHIFT) + np.arange(n, dtype=np.int64)


def fit_cells(sample: np.ndarray, n_cells: int, seed: int = 0, iterations: int = 20) -> np.ndarray:
    """Spherical k-means centroids [C, D] of unit rows ``sample`` [S, D] (C = min(n_cells, S), at least 1)."""
    n_cells = max(1, min(n_cells, len(sample)))
    if n_cells == 1:
        mean = sample.mean(axis=0, keepdims=True) if len(sample) else np.zeros((1, sample.shape[1]), np.float32)
        return np.ascontiguousarray(mean, dtype=np.float32)
    km = faiss.Kmeans(
        sample.shape[1], n_cells, niter=iterations, seed=seed, spherical=True, gpu=gpu_available(), verbose=False
    )
    km.cp.max_points_per_centroid = 256  # the sample is already a sample: use it
    km.cp.min_points_per_centroid = 1  # small pools: few points per cell is expected, not worth a warning
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def assign_cells(x: np.ndarray, centroids: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` most similar cells of each row. x [N, D], centroids [C, D] -> [N, min(m, C)] int64."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    return knn(index, x, min(m, len(centroids)))[1]


def plan_ranges(counts: np.ndarray, budget_rows: int) -> list[tuple[int, int]]:
    """Consecutive cell ranges ``[start, stop)`` holding at most ``budget_rows`` rows each (a cell larger than the
    budget gets a range of its own). counts: [C] rows assigned per cell."""
    ranges: list[tuple[int, int]] = []
    start, held = 0, 0
    for cell, count in enumerate(np.asarray(counts, dtype=np.int64)):
        if held and held + count > budget_rows:
            ranges.append((start, cell))
            start, held = cell, 0
        held += int(count)
    if held or not ranges:
        ranges.append((start, len(counts)))
    return [(a, b) for a, b in ranges if b > a] or [(0, max(1, len(counts)))]


def pairs_within(x: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN among the rows of ``x`` [M, D] (unit rows): pairs (i < j, local indices) among each row's ``k``
    nearest others with inner product above ``threshold``. Returns pairs [P, 2] int64 and sims [P] float32."""
    if len(x) < 2:
        return np.empty((0, 2), np.int64), np.empty(0, np.float32)
    index: faiss.Index = faiss.IndexFlatIP(x.shape[1])
    if gpu_available():
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    sims, ids = knn(index, x, k + 1)  # +1: itself
    return pairs_above(sims, ids, threshold)


def top_against(queries: np.ndarray, x: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar rows of ``x`` (by global ``keys``) for each query: sims [Q, k] and keys [Q, k], padded
    with -inf and -1 where ``x`` has fewer than ``k`` rows. Merged across pieces with :func:`merge_top`."""
    sims = np.full((len(queries), k), -np.inf, np.float32)
    out = np.full((len(queries), k), -1, np.int64)
    if len(x) and len(queries):
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(np.ascontiguousarray(x, dtype=np.float32))
        s, i = knn(index, queries, min(k, len(x)))
        sims[:, : s.shape[1]] = s
        out[:, : s.shape[1]] = np.where(i >= 0, keys[np.maximum(i, 0)], -1)
    return sims, out


def merge_top(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Two top-k lists of the same queries (sims, keys) [Q, k] -> the top k of both (ties: smaller key first)."""
    sims = np.concatenate([a[0], b[0]], axis=1)
    keys = np.concatenate([a[1], b[1]], axis=1)
    order = np.lexsort((keys, -sims), axis=1)[:, : a[0].shape[1]]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(keys, order, axis=1)
