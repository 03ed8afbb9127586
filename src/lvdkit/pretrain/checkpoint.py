"""A pretraining run's checkpoint folder: ``state.pt`` (model, teacher/EMA, queue or centre, optimizer: tensors only,
loaded with ``torch.load(weights_only=True)``) or, for an FSDP run, ``state.dcp/`` (every rank's shards), and
``meta.json`` (step, data position, model identity)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from lvdkit.core.storage import Location
from lvdkit.pretrain.method import Method
from lvdkit.pretrain.sharding import SHARDED_DIR, is_sharded, read_full_state, save_sharded

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def saved_state(method: Method) -> dict[str, torch.Tensor]:
    """The method's state minus its frozen weights (reloaded from their source instead)."""
    return {k: v for k, v in method.state_dict().items() if not k.startswith(method.frozen_prefixes)}


def load_method_state(method: Method, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = method.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(method.frozen_prefixes)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def write_checkpoint(
    folder: Path, method: Method, optimizer: torch.optim.Optimizer, meta: dict[str, Any] | None
) -> None:
    """``state.pt`` (or, sharded, this rank's part of ``state.dcp/``: every rank calls) and, given ``meta``,
    ``meta.json``."""
    if is_sharded(method):
        save_sharded(folder, method, optimizer)
    else:
        torch.save({"method": saved_state(method), "optimizer": optimizer.state_dict()}, folder / STATE_FILE)
    if meta is not None:
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def _local_folder(folder: Location, tmp: str) -> Path:
    """``folder`` itself when local, else a copy of it under ``tmp`` (a sharded checkpoint is many files)."""
    if isinstance(folder, Path):
        return folder
    for item in folder.rglob("*"):
        if item.is_file():
            target = Path(tmp) / item.path[len(folder.path) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(item.read_bytes())
    return Path(tmp)


def read_checkpoint(folder: Location, device: torch.device | str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a checkpoint folder (local or on object storage); the state is loaded with
    ``weights_only=True`` (no pickled code). A sharded (FSDP) checkpoint is gathered into the same full state."""
    if (folder / SHARDED_DIR / ".metadata").is_file():
        with tempfile.TemporaryDirectory(prefix="lvdkit-ckpt-") as tmp:
            state = read_full_state(_local_folder(folder, tmp))
        return {k: state[k] for k in ("method", "optimizer")}, json.loads((folder / META_FILE).read_text())
    try:
        with (folder / STATE_FILE).open("rb") as f:
            state = torch.load(f, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{folder / STATE_FILE}: refused or unreadable as a weights-only checkpoint: {exc}") from None
    return state, json.loads((folder / META_FILE).read_text())
