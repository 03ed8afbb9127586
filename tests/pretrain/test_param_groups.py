"""Optimiser groups: layer-wise lr decay on a tiny timm ViT, no weight decay on biases/norms/tokens, CNNs flat."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
from torch import nn

from lvdkit.pretrain.heads import DINOHead
from lvdkit.pretrain.param_groups import apply_schedules, param_groups


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, reg_tokens=1)


def by_name(groups: list[dict[str, Any]]) -> dict[str, tuple[float, float, bool]]:
    table: dict[str, tuple[float, float, bool]] = {}
    for group in groups:
        assert len(group["names"]) == len(group["params"])
        for name in group["names"]:
            assert name not in table, f"{name} in two groups"
            table[name] = (group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"])
    return table


def test_timm_vit_layer_decay_and_weight_decay(vit: nn.Module) -> None:
    table = by_name(param_groups(vit, weight_decay=0.04, layer_decay=0.5, patch_embed_lr_mult=0.2))
    assert set(table) == {n for n, _ in vit.named_parameters()}
    # depth 2: layer 0 (embeddings) 0.5**3, blocks.0 layer 1 -> 0.5**2, blocks.1 -> 0.5, the rest layer 3 -> 1.
    expected = {
        "cls_token": (0.125, 0.0),
        "reg_token": (0.125, 0.0),
        "pos_embed": (0.125, 0.0),
        "patch_embed.proj.weight": (0.125 * 0.2, 1.0),
        "patch_embed.proj.bias": (0.125 * 0.2, 0.0),
        "blocks.0.attn.qkv.weight": (0.25, 1.0),
        "blocks.0.attn.qkv.bias": (0.25, 0.0),
        "blocks.0.norm1.weight": (0.25, 0.0),
        "blocks.1.mlp.fc2.weight": (0.5, 1.0),
        "blocks.1.norm2.bias": (0.5, 0.0),
        "norm.weight": (1.0, 0.0),
        "head.weight": (1.0, 1.0),
        "head.bias": (1.0, 0.0),
    }
    for name, (lr_mult, wd_mult) in expected.items():
        assert table[name][:2] == pytest.approx((lr_mult, wd_mult)), name
    assert not any(last for _, _, last in table.values())
    # n_blocks overrides the depth read from the model: blocks.0 is then 0.5 ** 4.
    override = by_name(param_groups(vit, weight_decay=0.04, layer_decay=0.5, n_blocks=4))
    assert override["blocks.0.attn.qkv.weight"][0] == pytest.approx(0.5**4)


def test_merged_and_unmerged_groups_agree(vit: nn.Module) -> None:
    merged = param_groups(vit, weight_decay=0.04)
    single = param_groups(vit, weight_decay=0.04, merge=False)
    assert len(single) == len(list(vit.parameters())) > len(merged)
    assert by_name(merged) == by_name(single)
    assert len({(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in merged}) == len(merged)
    for group in merged:
        assert group["weight_decay"] == pytest.approx(0.04 * group["wd_multiplier"])


def test_backbone_with_heads_and_frozen_parameters(vit: nn.Module) -> None:
    model = nn.ModuleDict({"backbone": vit, "dino_head": DINOHead(192, out_dim=16, hidden_dim=32, bottleneck_dim=8)})
    vit.cls_token.requires_grad_(False)
    try:
        table = by_name(param_groups(model, weight_decay=0.04, layer_decay=0.5))
    finally:
        vit.cls_token.requires_grad_(True)
    assert "backbone.cls_token" not in table  # frozen: left out
    assert table["backbone.blocks.1.attn.proj.weight"][:2] == pytest.approx((0.5, 1.0))
    assert table["backbone.pos_embed"][:2] == pytest.approx((0.125, 0.0))
    assert table["dino_head.last_layer.weight"] == (1.0, 1.0, True)
    assert table["dino_head.mlp.0.weight"] == (1.0, 1.0, False)
    assert table["dino_head.mlp.0.bias"] == (1.0, 0.0, False)


def test_cnns_get_multiplier_one() -> None:
    torch.manual_seed(0)
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    table = by_name(param_groups(resnet, weight_decay=0.05, layer_decay=0.5, patch_embed_lr_mult=0.2))
    assert {lr for lr, _, _ in table.values()} == {1.0}
    assert table["conv1.0.weight"][1] == 1.0 and table["bn1.weight"][1] == 0.0

    class Stage(nn.Module):  # ConvNeXt-like: stages hold `blocks`, but no patch_embed beside them
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))

    convnext_like = nn.Sequential(nn.Conv2d(3, 4, 4), Stage(), Stage())
    assert {lr for lr, _, _ in by_name(param_groups(convnext_like, 0.05, layer_decay=0.5)).values()} == {1.0}


def test_apply_schedules_sets_lr_and_weight_decay(vit: nn.Module) -> None:
    head = DINOHead(192, out_dim=16, hidden_dim=32, bottleneck_dim=8)
    model = nn.ModuleDict({"backbone": vit, "dino_head": head})
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.04, layer_decay=0.5))
    apply_schedules(optimizer, lr=2e-3, wd=0.1, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        base = 0.0 if group["is_last_layer"] else 2e-3
        assert group["lr"] == pytest.approx(base * group["lr_multiplier"])
        assert group["weight_decay"] == pytest.approx(0.1 * group["wd_multiplier"])
    lrs = {name: g["lr"] for g in optimizer.param_groups for name in g["names"]}
    assert lrs["dino_head.last_layer.weight"] == 0.0
    assert lrs["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(2e-3 * 0.25)
    # The extra keys do not bother a real step.
    before = head.last_layer.weight.detach().clone()
    head(vit.forward_features(torch.randn(2, 3, 32, 32))[:, 0]).sum().backward()
    optimizer.step()
    assert torch.equal(head.last_layer.weight, before)  # lr 0 and no decay on it this step
    plain = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    apply_schedules(plain, lr=0.5, wd=0.01, last_layer_lr=0.0)  # groups without multipliers count as 1
    assert plain.param_groups[0]["lr"] == 0.5 and plain.param_groups[0]["weight_decay"] == 0.01
