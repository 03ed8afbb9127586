"""Embedding models by name: ``create_embedder("sscd")``, ``create_embedder("timm:vit_small_patch14_dinov2")``, ...

Every model is an :class:`Embedder`: ``preprocess.prepare(image)`` -> uint8 ``[H, W, 3]`` (in CPU decode tasks),
``embed(uint8 [B, H, W, 3])`` -> float32 ``[B, D]`` with unit rows (on the model's device).

The names below are imported lazily: decode workers import :mod:`lvdkit.embeddings.preprocess` (and so this
package) and should not pay for torch, timm or onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lvdkit.embeddings.backbones import create_torch_model
    from lvdkit.embeddings.base import Embedder
    from lvdkit.embeddings.factory import KINDS, create_embedder
    from lvdkit.embeddings.model_file import load_lvdkit_model, save_lvdkit_model
    from lvdkit.embeddings.onnx_embedder import OnnxEmbedder
    from lvdkit.embeddings.preprocess import Preprocess
    from lvdkit.embeddings.torch_embedder import TorchEmbedder

_WHERE = {
    "KINDS": "factory",
    "create_embedder": "factory",
    "Embedder": "base",
    "Preprocess": "preprocess",
    "save_lvdkit_model": "model_file",
    "load_lvdkit_model": "model_file",
    "create_torch_model": "backbones",
    "TorchEmbedder": "torch_embedder",
    "OnnxEmbedder": "onnx_embedder",
}
__all__ = [
    "KINDS",
    "Embedder",
    "OnnxEmbedder",
    "Preprocess",
    "TorchEmbedder",
    "create_embedder",
    "create_torch_model",
    "load_lvdkit_model",
    "save_lvdkit_model",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
