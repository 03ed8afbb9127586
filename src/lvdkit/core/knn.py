"""Nearest neighbours and descriptor post-processing with Faiss, in bounded memory.

Queries are searched in chunks, so memory is the index plus ``chunk x k`` results: never an N x N matrix. The index
is exact (flat, inner product) for small N and IVF for large N, on GPU when faiss-gpu and a GPU are present.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from lvdkit.core.faiss_lib import faiss

IndexKind = Literal["auto", "flat", "ivf", "ivfpq"]


def gpu_available() -> bool:
    """True when this Faiss build has GPU support and sees a GPU (faiss-cpu has ``get_num_gpus() == 0``)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def set_threads(n: int) -> None:
    """Faiss's OpenMP threads in this process: a task uses the CPUs it reserved, no more (nor fewer)."""
    faiss.omp_set_num_threads(max(1, n))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero rather than NaN). x: [N, ...] -> [N, D] float32."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def build_index(
    x: np.ndarray, kind: IndexKind = "auto", flat_max: int = 50_000, nprobe: int = 16, seed: int = 0
) -> faiss.Index:
    """An inner-product index over unit vectors ``x`` [N, D]: flat up to ``flat_max`` rows, else IVF."""
    n, d = x.shape
    if kind == "auto":
        kind = "flat" if n <= flat_max else "ivf"
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
    elif kind in ("ivf", "ivfpq"):
        nlist = int(min(max(16, 4 * np.sqrt(n)), 65536, max(1, n // 40)))  # >= 40 training points per list
        quantizer = faiss.IndexFlatIP(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = next(m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = x[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
        index.train(train)
        index.nprobe = nprobe
    else:
        raise ValueError(f"index kind {kind!r}; valid: 'auto', 'flat', 'ivf', 'ivfpq'")
    if gpu_available():
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(x)
    return index


def knn(index: faiss.Index, queries: np.ndarray, k: int, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products and ids for each query row. Returns sims [Q, k] float32, ids [Q, k] int64."""
    k = min(k, index.ntotal)
    sims = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        s, i = index.search(np.ascontiguousarray(queries[start : start + chunk], dtype=np.float32), k)
        sims[start : start + chunk], ids[start : start + chunk] = s, i
    return sims, ids


def pairs_above(sims: np.ndarray, ids: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Self-search results -> unique pairs (i < j) with similarity > threshold. Returns [P, 2] int64, [P] float32."""
    q = np.repeat(np.arange(len(ids)), ids.shape[1])
    j, s = ids.ravel(), sims.ravel()
    keep = (s > threshold) & (j >= 0) & (j != q)
    a, b, s = np.minimum(q, j)[keep], np.maximum(q, j)[keep], s[keep]
    pairs = np.stack([a, b], axis=1)
    if not len(pairs):
        return pairs.astype(np.int64), s
    uniq, first = np.unique(pairs, axis=0, return_index=True)
    return uniq.astype(np.int64), s[first]


def best_per_owner(sims: np.ndarray, rows: np.ndarray, owner_count: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search results over an index whose row r belongs to owner ``r % owner_count`` (an image and its views, stacked
    slab by slab) -> each query's top-``k`` owners, each at its best row's similarity. [Q, K'] -> [Q, k] float32 and
    int64; -inf and -1 where fewer than ``k`` owners were found."""
    owners = np.where(rows >= 0, rows % max(owner_count, 1), -1)
    order = np.argsort(owners, axis=1, kind="stable")  # by owner; within one, in search order (best first)
    grouped = np.take_along_axis(owners, order, axis=1)
    first = np.ones(grouped.shape, bool)
    first[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    keep = np.zeros(grouped.shape, bool)
    np.put_along_axis(keep, order, first, axis=1)
    masked = np.where(keep & (owners >= 0), sims, -np.inf).astype(np.float32)
    top = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(masked, top, axis=1)
    return best, np.where(np.isfinite(best), np.take_along_axis(owners, top, axis=1), -1).astype(np.int64)
