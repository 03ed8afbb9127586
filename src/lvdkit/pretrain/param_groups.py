"""Optimiser parameter groups for DINOv2-style training: layer-wise lr decay (BEiT, Bao et al. 2022; ELECTRA), a
smaller lr for the patch embedding, no weight decay on biases, norms and learned tokens, and a flag on the head's
last layer (which has its own lr schedule, frozen for the first epoch).

Groups carry multipliers, not values: :func:`apply_schedules` turns the step's scheduled lr and weight decay into
each group's ``lr`` and ``weight_decay``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

# Learned tokens and embeddings of a timm / DINOv2 ViT, at depth 0 and never weight-decayed.
EMBEDDING_NAMES = ("patch_embed", "cls_token", "pos_embed", "mask_token", "reg_token", "register_tokens")
NO_DECAY_TOKENS = ("pos_embed", "cls_token", "mask_token", "reg_token", "register_tokens")
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


def _vit_prefixes(model: nn.Module) -> dict[str, int]:
    """Dotted prefixes (ending in '.', or '' for the model itself) of every ViT inside ``model`` -> its depth.

    A ViT is a module with ``blocks`` (an indexable container) next to ``patch_embed``; the sibling test keeps
    CNNs whose stages happen to hold ``blocks`` (ConvNeXt, for instance) out.
    """
    found: dict[str, int] = {}
    for name, module in model.named_modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList | nn.Sequential) and hasattr(module, "patch_embed"):
            found[f"{name}." if name else ""] = len(blocks)
    return found


def _layer_id(relative_name: str, n_blocks: int) -> int:
    match = _BLOCK_INDEX.match(relative_name)
    if match:
        return int(match.group(1)) + 1
    if relative_name.split(".", 1)[0] in EMBEDDING_NAMES:
        return 0
    return n_blocks + 1


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    parts = name.split(".")
    return param.ndim <= 1 or name.endswith(".bias") or any(p in NO_DECAY_TOKENS for p in parts)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    n_blocks: int | None = None,
    *,
    merge: bool = True,
) -> list[dict[str, Any]]:
    """Optimiser groups with ``params``, ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer``, ``names`` and an
    initial ``weight_decay`` (= ``weight_decay * wd_multiplier``).

    Rules, by parameter name (frozen parameters are left out):

    - wd_multiplier 0 for 1-D parameters (biases, norms, LayerScale), ``*.bias``, and the learned tokens
      ``pos_embed``, ``cls_token``, ``reg_token``/``register_tokens``, ``mask_token``; 1 otherwise.
    - Layer-wise decay, for each ViT found in ``model`` (a module with ``blocks`` beside ``patch_embed``, e.g. a
      timm ViT, possibly nested as ``backbone.``): ``blocks.{i}.`` is layer i + 1, patch_embed and the tokens
      layer 0, everything else (final norm, heads) layer ``n_blocks + 1``; lr_multiplier
      ``layer_decay ** (n_blocks + 1 - layer)``. ``patch_embed`` is further multiplied by ``patch_embed_lr_mult``.
      ``n_blocks`` overrides the depth read from ``len(blocks)``. Without a ViT (CNNs) every lr_multiplier is 1.
    - ``is_last_layer`` for names containing ``last_layer`` (the DINO head's prototypes).

    With ``merge`` (default) parameters sharing all three settings form one group (fewer groups, fused optimiser
    kernels); otherwise one group per parameter. Groups appear in first-parameter order.
    """
    prefixes = _vit_prefixes(model)
    groups: dict[tuple[float, float, bool] | str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_multiplier = 1.0
        for prefix, depth in prefixes.items():
            if name.startswith(prefix):
                depth = depth if n_blocks is None else n_blocks
                relative = name[len(prefix) :]
                lr_multiplier = layer_decay ** (depth + 1 - _layer_id(relative, depth))
                if relative.startswith("patch_embed."):
                    lr_multiplier *= patch_embed_lr_mult
                break
        wd_multiplier = 0.0 if _no_weight_decay(name, param) else 1.0
        is_last_layer = "last_layer" in name
        key: tuple[float, float, bool] | str = (lr_multiplier, wd_multiplier, is_last_layer) if merge else name
        group = groups.setdefault(
            key,
            {
                "params": [],
                "names": [],
                "lr_multiplier": lr_multiplier,
                "wd_multiplier": wd_multiplier,
                "is_last_layer": is_last_layer,
                "weight_decay": weight_decay * wd_multiplier,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set each group's ``lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier`` and ``weight_decay =
    wd * wd_multiplier``. Groups without these keys count as multiplier 1 and not last layer."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group.get("is_last_layer", False) else lr
        group["lr"] = base * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)
