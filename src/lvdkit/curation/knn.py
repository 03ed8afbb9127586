"""Nearest neighbours and descriptor post-processing with Faiss, in bounded memory.

Queries are searched in chunks, so memory is the index plus ``chunk x k`` results: never an N x N matrix. The index
is exact (flat, inner product) for small N and IVF for large N, on GPU when faiss-gpu and a GPU are present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

IndexKind = Literal["auto", "flat", "ivf", "ivfpq"]


def gpu_available() -> bool:
    """True when this Faiss build has GPU support and sees a GPU (faiss-cpu has ``get_num_gpus() == 0``)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero). x: [N, D] -> [N, D] float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass
class Whitener:
    """Centering or PCA whitening fitted on a sample, then L2 normalisation (as SSCD's authors recommend).

    mean: [D]; matrix: [D, D_out] or None (centering only).
    """

    mean: np.ndarray
    matrix: np.ndarray | None

    def __call__(self, x: np.ndarray, chunk: int = 65536) -> np.ndarray:
        d_out = self.matrix.shape[1] if self.matrix is not None else x.shape[1]
        out = np.empty((len(x), d_out), np.float32)
        for start in range(0, len(x), chunk):  # in chunks: no full-size temporary copy of x
            y = np.asarray(x[start : start + chunk], dtype=np.float32) - self.mean  # [C, D]
            if self.matrix is not None:
                y = y @ self.matrix  # [C, D_out]
            out[start : start + chunk] = l2_normalize(y)
        return out

    def save(self, path: str) -> None:
        np.savez(path, mean=self.mean, matrix=self.matrix if self.matrix is not None else np.empty((0, 0)))

    @classmethod
    def load(cls, path: str) -> Whitener:
        data = np.load(path)
        matrix = data["matrix"]
        return cls(mean=data["mean"], matrix=matrix if matrix.size else None)


def fit_whitener(sample: np.ndarray, mode: Literal["none", "center", "pca"], dims: int) -> Whitener:
    """Fit on ``sample`` [S, D]: 'none' (identity), 'center' (subtract the mean) or 'pca' (whiten to ``dims``)."""
    d = sample.shape[1]
    if mode == "none":
        return Whitener(mean=np.zeros(d, np.float32), matrix=None)
    mean = sample.mean(axis=0).astype(np.float32)
    if mode == "center":
        return Whitener(mean=mean, matrix=None)
    if mode != "pca":
        raise ValueError(f"whitening mode {mode!r}; valid: 'none', 'center', 'pca'")
    dims = min(dims, d, max(1, sample.shape[0] - 1))
    centered = (sample - mean).astype(np.float64)
    cov = centered.T @ centered / max(1, len(centered) - 1)  # [D, D]
    eigval, eigvec = np.linalg.eigh(cov)
    top = np.argsort(eigval)[::-1][:dims]
    scale = 1.0 / np.sqrt(np.maximum(eigval[top], 1e-6 * eigval.max()))  # cap tiny variances: no noise blow-up
    return Whitener(mean=mean, matrix=(eigvec[:, top] * scale).astype(np.float32))


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
