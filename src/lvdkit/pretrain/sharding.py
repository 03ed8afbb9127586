"""FSDP (``strategy: fsdp``): PyTorch's ``fully_shard`` (FSDP2) over the ranks, for models whose weights, gradients
and AdamW state do not fit one device per rank (ViT-L/g), and its sharded checkpoints.

Units: each block of the backbone (``blocks`` of a timm ViT, ``stages`` of a timm CNN) and then the whole network, so
that one block's weights are gathered at a time and the rest (patch embedding, norms, heads, iBOT's mask token) with
the root. The student is sharded, and so is an EMA teacher (DINOv2, DINO): the EMA then moves each rank's shard of the
teacher with the same shard of the student, as DINOv2's FSDP code does. A frozen teacher (distillation) stays whole on
every rank.

Checkpoints: every rank writes its shard with ``torch.distributed.checkpoint`` (DCP) into ``state.dcp/`` of the
checkpoint folder (model and AdamW state under full parameter names, so a run resumes on another number of ranks);
:func:`read_full_state` turns one back into the full ``{"method", "optimizer"}`` state of a DDP checkpoint, which is how
``lvdkit export`` writes the same timm-loadable safetensors from either strategy.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lvdkit.pretrain.method import Method

SHARDED_DIR = "state.dcp"  # the DCP folder inside a checkpoint folder of an FSDP run


def _units(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's repeated blocks, sharded one unit each."""
    for name in ("blocks", "stages"):
        seq = getattr(backbone, name, None)
        if isinstance(seq, nn.Sequential | nn.ModuleList) and len(seq) > 1:
            return list(seq)
    return []


def _shard_network(network: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for unit in _units(getattr(network, "backbone", network)):
        fully_shard(unit)
    fully_shard(network)


def shard(method: Method) -> None:
    """Shard the student (and an EMA teacher) over the default process group, in place. Call before the optimizer is
    built: its parameters become the shards."""
    _shard_network(method.student)
    teacher = getattr(method, "teacher", None)
    if isinstance(teacher, nn.Module) and "teacher." not in method.frozen_prefixes:
        _shard_network(teacher)
        # FSDP keeps a root's weights gathered after its forward, for the backward that follows; the teacher has
        # none, so it gives them back at once (the EMA update then meets shards, as the student's are).
        teacher.register_forward_hook(lambda module, args, output: module.reshard())


def is_sharded(method: Method) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(method.student, FSDPModule)


@contextlib.contextmanager
def gathered(network: nn.Module) -> Iterator[None]:
    """Hold the root unit's weights whole (every rank together), for calls that bypass the root's forward, e.g. the
    learning curve's k-NN on ``teacher.backbone``; the blocks gather themselves as they run."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(network, FSDPModule):
        yield
        return
    network.unshard()
    try:
        yield
    finally:
        network.reshard()


@torch.no_grad()
def init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's own initial state (step 0, zero moments) for every parameter now rather than at its first gradient:
    a sharded checkpoint then holds every parameter's state from step 1 on (DINOv2's last layer has no gradient for
    its first epoch), which is what a fresh optimizer asks DCP for when it resumes. AdamW only initialises empty
    states, so its steps are unchanged."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _states(method: Method, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = {k: v for k, v in method.state_dict().items() if not k.startswith(method.frozen_prefixes)}
    return {"method": model, "optimizer": get_optimizer_state_dict(method.student, optimizer)}


def save_sharded(folder: Path, method: Method, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards into ``folder/state.dcp`` (rank 0 also the metadata); every rank must call this."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(method, optimizer), checkpoint_id=str(folder / SHARDED_DIR))


def load_sharded(folder: Path, method: Method, optimizer: torch.optim.Optimizer) -> None:
    """Load ``folder/state.dcp`` into the sharded method and its optimizer (resharded to this run's ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    states = _states(method, optimizer)
    dcp.load(states, checkpoint_id=str(folder / SHARDED_DIR))
    missing, unexpected = method.load_state_dict(states["method"], strict=False)
    missing = [k for k in missing if not k.startswith(method.frozen_prefixes)]
    if missing or unexpected:
        raise ValueError(
            f"{folder}: checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected}"
        )
    set_optimizer_state_dict(method.student, optimizer, optim_state_dict=states["optimizer"])


def read_full_state(folder: Path) -> dict[str, Any]:
    """The whole state of a sharded checkpoint folder in one process (no process group): full tensors, the layout
    of a DDP checkpoint's ``state.pt``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="lvdkit-dcp-") as tmp:
        whole = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(folder / SHARDED_DIR), str(whole))
        state: dict[str, Any] = torch.load(whole, map_location="cpu", weights_only=True)
    return state
