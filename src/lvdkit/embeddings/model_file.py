"""lvdkit's own model files: ``NAME.safetensors`` (the weights) + ``NAME.json`` (how to build the module).

The JSON sidecar holds ``{"format": "lvdkit.model/1", "model": "timm:...", "kwargs": {...}}``: ``model`` and
``kwargs`` are what :func:`~lvdkit.embeddings.backbones.create_torch_model` gets (random init) before the weights
are loaded strictly. Pretraining and export write these files; ``create_embedder(PATH.safetensors)`` reads them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lvdkit.embeddings.backbones import create_torch_model
from lvdkit.embeddings.preprocess import Preprocess
from lvdkit.embeddings.weights import load_into

FORMAT = "lvdkit.model/1"
_RESERVED = ("pretrained", "checkpoint", "device", "num_threads")  # runtime choices, not part of a model's identity


def sidecar_path(path: str | Path) -> Path:
    """``dir/model.safetensors`` -> ``dir/model.json``."""
    return Path(path).with_suffix(".json")


def _check(name: object, kwargs: object, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(name, str) or not name.startswith(("timm:", "torchvision:")):
        raise ValueError(f"{where}: model must be 'timm:NAME' or 'torchvision:NAME', got {name!r}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: kwargs must be a dict, got {type(kwargs).__name__}")
    reserved = sorted(set(kwargs) & set(_RESERVED))
    if reserved:
        raise ValueError(
            f"{where}: kwargs may not hold {reserved} (weights come from the file; device and threads "
            "are chosen when loading)"
        )
    return name, kwargs


def save_lvdkit_model(model: nn.Module, name: str, kwargs: dict[str, Any], path: str | Path) -> Path:
    """Write ``model``'s weights to ``path`` (``.safetensors``) and the sidecar JSON naming how to rebuild it.

    ``name``/``kwargs`` must build a module with exactly ``model``'s parameter names and shapes (checked here, so a
    bad export fails now rather than at load), e.g. ``("timm:vit_small_patch14_dinov2", {"img_size": 224})`` for a
    timm model created with ``num_classes=0``. Both files are written atomically. Returns ``path``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"lvdkit model files end in .safetensors, got {path}")
    name, kwargs = _check(name, kwargs, "save_lvdkit_model")
    try:
        sidecar = json.dumps({"format": FORMAT, "model": name, "kwargs": kwargs}, indent=2, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"save_lvdkit_model: kwargs must be JSON-serialisable: {exc}") from None
    # Contiguous CPU copies: safetensors refuses tensors that share memory (tied weights) or are strided.
    state = {
        k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for k, v in model.state_dict().items()
    }
    reference, _ = create_torch_model(name, pretrained=False, **kwargs)
    load_into(reference, state, f"the model given for {name} {kwargs}")
    del reference

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT, "model": name})
    os.replace(tmp, path)
    side = sidecar_path(path)
    tmp_side = side.with_name(f".{side.name}.tmp")
    tmp_side.write_text(sidecar + "\n")
    os.replace(tmp_side, side)
    return path


def read_sidecar(path: str | Path) -> tuple[str, dict[str, Any]]:
    """The (model name, kwargs) recorded next to the lvdkit model file ``path``."""
    path, side = Path(path), sidecar_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lvdkit model file not found: {path}")
    if not side.is_file():
        raise FileNotFoundError(
            f"{path} has no sidecar {side.name}: lvdkit model files are a .safetensors plus a "
            ".json naming the model, both written by save_lvdkit_model"
        )
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{side}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{side}: expected a JSON object with 'model' and 'kwargs'")
    return _check(meta.get("model"), meta.get("kwargs", {}), str(side))


def load_lvdkit_model(path: str | Path) -> tuple[nn.Module, Preprocess, str, dict[str, Any]]:
    """Rebuild the module saved at ``path``: (module in eval mode, preprocessing, model name, kwargs)."""
    from safetensors.torch import load_file

    name, kwargs = read_sidecar(path)
    module, preprocess = create_torch_model(name, pretrained=False, **kwargs)
    load_into(module, load_file(str(path), device="cpu"), str(path))
    return module.eval(), preprocess, name, kwargs
