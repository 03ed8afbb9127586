"""The one interface every embedding model has, whatever runs it (PyTorch, ONNX Runtime)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from lvdkit.embeddings.preprocess import Preprocess

DEVICES = ("auto", "cpu", "cuda", "cuda:N")


@runtime_checkable
class Embedder(Protocol):
    """A loaded model that maps preprocessed pixels to L2-normalised embeddings.

    ``name`` is what it was created from (e.g. ``"sscd"``, ``"timm:vit_small_patch14_dinov2"``), ``dim`` the
    embedding size D and ``preprocess`` what :meth:`embed` expects its pixels to have gone through.
    """

    name: str
    dim: int
    preprocess: Preprocess

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` (from ``preprocess.prepare``) -> float32 ``[B, D]``, each row of unit L2 norm."""
        ...


def check_pixels(pixels: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """Validate a batch for :meth:`Embedder.embed`; returns it C-contiguous. Raises ``ValueError`` otherwise."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3:
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ValueError(f"embed() takes uint8 [B, H, W, 3] pixels (from preprocess.prepare), got {got}")
    if pixels.shape[1:3] != preprocess.size:
        raise ValueError(
            f"embed() got {pixels.shape[1]}x{pixels.shape[2]} pixels, the model expects {preprocess.size[0]}x"
            f"{preprocess.size[1]}: prepare images with this embedder's preprocess"
        )
    return np.ascontiguousarray(pixels)
