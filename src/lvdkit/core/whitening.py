"""Descriptor post-processing fitted on a sample: none, centering or PCA whitening, then L2 normalisation.

SSCD's authors whiten copy-detection descriptors before comparing them; dedup_copy fits the whitening on the pool
and dedup_relative applies the same one to the protected images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lvdkit.core.knn import l2_normalize


@dataclass
class Whitener:
    """Centering or PCA whitening fitted on a sample, then L2 normalisation (as SSCD's authors recommend).

    mean: [D]; matrix: [D, D_out] or None (centering only).
    """

    mean: np.ndarray
    matrix: np.ndarray | None

    @property
    def dim(self) -> int:
        """Dimension of the output descriptors."""
        return int(self.matrix.shape[1] if self.matrix is not None else self.mean.shape[-1])

    def __call__(self, x: np.ndarray, chunk: int = 65536) -> np.ndarray:
        d_out = self.matrix.shape[1] if self.matrix is not None else x.shape[1]
        out = np.empty((len(x), d_out), np.float32)
        for start in range(0, len(x), chunk):  # in chunks: no full-size temporary copy of x
            y = np.asarray(x[start : start + chunk], dtype=np.float32) - self.mean  # [C, D]
            if self.matrix is not None:
                y = y @ self.matrix  # [C, D_out]
            out[start : start + chunk] = l2_normalize(y)
        return out

    def to_bytes(self) -> bytes:
        """The whitener as ``.npz`` bytes (what :meth:`load` reads)."""
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, matrix=self.matrix if self.matrix is not None else np.empty((0, 0)))
        return buf.getvalue()

    def save(self, path: str) -> None:
        with open(path, "wb") as fh:
            fh.write(self.to_bytes())

    @classmethod
    def load(cls, path: str) -> Whitener:
        with open(path, "rb") as fh:
            return cls.from_bytes(fh.read())

    @classmethod
    def from_bytes(cls, raw: bytes) -> Whitener:
        """The whitener :meth:`to_bytes` wrote."""
        data = np.load(io.BytesIO(raw))
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
