"""DINOv2 on a hybrid ViT (a convolutional stem before the patches): the iBOT mask grid is the tokens it makes."""

from __future__ import annotations

import numpy as np
import torch

from lvdkit.pretrain.augment import GLOBAL_KEYS, LOCAL_KEY
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.dinov2 import DINOv2Method
from lvdkit.pretrain.models import token_grid

HYBRID = "timm:vit_tiny_r_s16_p8_224"  # ResNet stem (stride 4) + patches; patch_size 1 on its map at 32 px: 8x8
SCHED = {"teacher_temp": 0.04, "momentum": 0.9}


def _cfg(model: str, kwargs: dict[str, int]) -> PretrainConfig:
    cfg = PretrainConfig(method="dinov2", model=model, model_kwargs=dict(kwargs))
    cfg.crops.global_size, cfg.crops.local_size, cfg.crops.n_local = 32, 16, 2
    d = cfg.dinov2
    d.head_out_dim, d.head_hidden_dim, d.head_bottleneck_dim, d.drop_path = 64, 32, 16, 0.0
    d.mask_probability = 1.0  # every global crop masked: the iBOT term must see masked tokens
    return cfg


def _batch(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {k: torch.randint(0, 255, (n, 3, 32, 32), generator=g, dtype=torch.uint8) for k in GLOBAL_KEYS}
    out[LOCAL_KEY] = torch.randint(0, 255, (n, 2, 3, 16, 16), generator=g, dtype=torch.uint8)
    return out


def test_token_grid_is_probed_not_read_off_patch_size() -> None:
    plain = _cfg("timm:vit_tiny_patch16_224", {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2})
    hybrid = _cfg(HYBRID, {"patch_size": 1, "depth": 1})
    assert DINOv2Method(plain).grid == (4, 4)
    method = DINOv2Method(hybrid)
    embed = method.student.backbone.patch_embed
    assert tuple(int(p) for p in embed.patch_size) == (1, 1)  # what the old rule read: a 32x32 grid
    assert method.grid == (8, 8) == token_grid(method.student.backbone, 32)
    assert embed.training  # the probe leaves the stem in train mode


def test_dinov2_step_on_a_hybrid_vit_masks_and_trains_the_stem() -> None:
    method = DINOv2Method(_cfg(HYBRID, {"patch_size": 1, "depth": 1}))
    total, terms = method.loss(_batch(4), SCHED, np.random.default_rng(0))
    assert torch.isfinite(total) and terms["masked"] > 0 and terms["ibot"] > 0
    total.backward()
    stem = method.student.backbone.patch_embed.backbone.conv.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert method.student.mask_token.grad is not None and method.student.mask_token.grad.abs().sum() > 0
