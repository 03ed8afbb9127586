"""Backbones for pretraining, built by name through the embeddings factory's :func:`create_torch_model`.

DINOv2 needs what a plain ``forward`` does not give: the CLS token *and* the patch tokens, with some patch tokens
replaced by a learned mask token before the position embedding (iBOT). :func:`vit_tokens` does that for timm's
``VisionTransformer`` family using its own sub-modules, so any timm ViT (DINOv2's included) trains unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lvdkit.embeddings.backbones import create_torch_model
from lvdkit.embeddings.preprocess import Preprocess
from lvdkit.pretrain.init_weights import load_init

TRAIN_ONLY_KWARGS = ("drop_path_rate",)  # shape nothing: left out of exported model files


def is_timm_vit(model: nn.Module) -> bool:
    """True for timm ViTs with a class token (the sub-modules :func:`vit_tokens` uses)."""
    needed = ("patch_embed", "blocks", "_pos_embed", "norm", "num_prefix_tokens")
    return all(hasattr(model, a) for a in needed) and getattr(model, "cls_token", None) is not None


def build_backbone(
    name: str,
    img_size: int,
    kwargs: dict[str, Any],
    train_kwargs: dict[str, Any] | None = None,
    init: str | None = None,
) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    """A headless backbone in train mode, randomly initialised or with the weights ``init`` names (see
    :mod:`lvdkit.pretrain.init_weights`); returns (module, preprocessing, identity kwargs).

    The identity kwargs are what rebuilds the same module for an export (``img_size`` and shape-changing options
    such as ``patch_size`` or LayerScale's ``init_values``); ``train_kwargs`` (drop path) are not part of it.
    ViTs get ``dynamic_img_size`` so that 224 px global and 98 px local crops go through one model.
    """
    identity = dict(kwargs)
    if name.startswith("timm:") and "vit" in name:
        identity.setdefault("dynamic_img_size", True)
    identity["img_size"] = img_size
    extra = {k: v for k, v in (train_kwargs or {}).items() if v is not None}
    build = {k: v for k, v in identity.items() if k != "img_size"}
    model, preprocess = create_torch_model(name, img_size=img_size, pretrained=False, **build, **extra)
    if init:
        load_init(model, name, init, img_size, build)
    return model.train(), preprocess, identity


def feature_dim(model: nn.Module, img_size: int) -> int:
    """Width of the pooled features ``model(x)`` returns (probed with a 2-image batch)."""
    was_training = model.training
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, 3, img_size, img_size))
    model.train(was_training)
    return int(out.shape[-1])


def token_grid(model: Any, img_size: int) -> tuple[int, int]:
    """(h, w) patch tokens of a global crop, probed rather than read off ``patch_size``: a hybrid ViT's
    convolutional stem (timm ``vit_*_r*``, ``HybridEmbed``) strides before its patches, so its tokens are not
    ``img_size // patch``."""
    embed, was_training = model.patch_embed, model.patch_embed.training
    with torch.no_grad():  # in eval mode: a stem's BatchNorm must not learn from the probe
        x = embed.eval()(torch.zeros(1, 3, img_size, img_size))  # (1, h, w, D) or (1, N, D)
    embed.train(was_training)
    if x.ndim == 4:
        return int(x.shape[1]), int(x.shape[2])
    side = math.isqrt(int(x.shape[1]))
    return side, int(x.shape[1]) // side


def vit_tokens(
    model: Any, images: Tensor, masks: Tensor | None = None, mask_token: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(CLS (B, D), patch tokens (B, N, D)) after the final norm; ``masks`` (B, N) bool swap in ``mask_token`` (D,).

    Masked patches are replaced after the patch embedding and before the position embedding, as iBOT/DINOv2 do.
    """
    x = model.patch_embed(images)  # (B, h, w, D) with dynamic_img_size, else (B, N, D)
    if masks is not None:
        if mask_token is None:
            raise ValueError("vit_tokens: masks given without a mask_token")
        m = masks.reshape(x.shape[:-1]).unsqueeze(-1)  # (B, h, w, 1) or (B, N, 1)
        x = torch.where(m, mask_token.to(x.dtype), x)
    x = model._pos_embed(x)  # (B, prefix + N, D)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    x = model.blocks(x)
    x = model.norm(x)
    return x[:, 0], x[:, model.num_prefix_tokens :]


def pooled_and_tokens(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """One forward pass giving both the pooled features (B, F), as ``model(images)``, and dense tokens (B, N, F):
    a ViT's patch tokens or a CNN's last feature map, flattened. timm models only (``forward_head`` splits them)."""
    forward_features = getattr(model, "forward_features", None)
    forward_head = getattr(model, "forward_head", None)
    if not (callable(forward_features) and callable(forward_head)):
        raise ValueError(
            f"{type(model).__name__} gives no spatial features (timm models do); set distill.dense_weight=0"
        )
    fmap = forward_features(images)
    pooled = forward_head(fmap, pre_logits=True)
    if fmap.ndim == 4:  # (B, C, H, W) CNN map
        return pooled, fmap.flatten(2).transpose(1, 2)
    return pooled, fmap[:, getattr(model, "num_prefix_tokens", 0) :]
