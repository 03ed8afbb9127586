"""Reading weight files safely: safetensors, or torch files restricted to tensors (never arbitrary pickles)."""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model")  # {"state_dict": {...}, "epoch": ...} training checkpoints
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict (parameter name -> tensor, on CPU) from ``.safetensors`` or a torch file.

    Torch files are read with ``torch.load(weights_only=True)``: a file holding arbitrary Python objects is refused
    with ``ValueError`` rather than unpickled (unpickling runs code chosen by whoever wrote the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _clean(load_file(str(path), device="cpu"), path)
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise ValueError(f"{path}: unknown weights format {path.suffix!r}; valid suffixes: {STATE_DICT_SUFFIXES}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"refusing to load {path}: it holds Python objects besides tensors, and lvdkit loads torch files with "
            f"weights_only=True (torch says: {first}). Save plain weights instead: safetensors.torch.save_file("
            "model.state_dict(), 'model.safetensors') or torch.save(model.state_dict(), 'model.pt')"
        ) from None
    except RuntimeError as exc:
        raise ValueError(f"cannot read {path} as a torch weights file: {exc}") from None
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict (name -> tensor)")
    return _clean(obj, path)


def _clean(state: Mapping[str, object], path: Path) -> dict[str, torch.Tensor]:
    """Check every value is a tensor and drop wrapper prefixes, so models load what their own state_dict() wrote."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a state dict of tensors")
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, ignore: Iterable[str] = ()) -> None:
    """Load ``state`` into ``model``, every key and shape matching; only the keys in ``ignore`` (a removed
    classifier head) may be in the file without a place in the model. Raises ``ValueError`` naming the mismatch."""
    ignored = set(ignore)
    state = {k: v for k, v in state.items() if k not in ignored}
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"missing: {_listing(missing)}" if missing else "",
            f"unexpected: {_listing(unexpected)}" if unexpected else "",
            f"shape mismatch: {'; '.join(wrong[:8])}" if wrong else "",
        ]
        raise ValueError(f"weights in {source} do not fit the model ({'; '.join(p for p in parts if p)})")
    model.load_state_dict(state, strict=True)
