"""DINO head: structure, cosine-similarity logits with unit-norm prototypes, init, frozen-last-layer rule."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lvdkit.pretrain.heads import DINOHead, WeightNormLinear, cancel_last_layer_gradients


def small_head(**kwargs: int) -> DINOHead:
    torch.manual_seed(0)
    return DINOHead(in_dim=16, out_dim=7, hidden_dim=32, bottleneck_dim=8, **kwargs)


def test_structure_and_shapes() -> None:
    head = small_head()
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in head.mlp if isinstance(m, nn.Linear)] == [
        (16, 32),
        (32, 32),
        (32, 8),
    ]
    assert head(torch.randn(5, 16)).shape == (5, 7)
    assert head(torch.randn(2, 3, 16)).shape == (2, 3, 7)
    one = small_head(n_layers=1)
    assert isinstance(one.mlp[0], nn.Linear) and len(one.mlp) == 1 and one.mlp[0].out_features == 8
    default = DINOHead(in_dim=4, out_dim=64)
    assert default.last_layer.weight.shape == (64, 256) and default.mlp[0].out_features == 2048
    with pytest.raises(ValueError, match="n_layers"):
        DINOHead(16, 7, n_layers=0)


def test_logits_are_cosines_with_unit_norm_prototypes() -> None:
    head = small_head()
    x = torch.randn(6, 16)
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    prototypes = head.last_layer.weight / head.last_layer.weight.norm(dim=1, keepdim=True)
    logits = head(x)
    torch.testing.assert_close(logits, bottleneck @ prototypes.t())
    assert logits.abs().max() <= 1.0 + 1e-6
    # g is fixed at 1: rescaling the stored weights (as weight decay does) leaves the output unchanged.
    with torch.no_grad():
        head.last_layer.weight.mul_(torch.linspace(0.1, 5.0, 7).unsqueeze(1))
    torch.testing.assert_close(head(x), logits)
    # A prototype equal to a bottleneck vector gives logit exactly 1 for that input.
    with torch.no_grad():
        head.last_layer.weight[3] = 4.0 * bottleneck[0]
    assert head(x)[0, 3].item() == pytest.approx(1.0, abs=1e-6)


def test_init_trunc_normal_and_zero_bias() -> None:
    torch.manual_seed(0)
    head = DINOHead(in_dim=256, out_dim=512, hidden_dim=256, bottleneck_dim=256)
    for module in head.mlp:
        if isinstance(module, nn.Linear):
            assert module.bias is not None and not module.bias.any()
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert head.last_layer.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert set(head.state_dict()) >= {"last_layer.weight", "mlp.0.weight", "mlp.0.bias"}
    assert "weight_norm=1" in repr(head.last_layer)


def test_cancel_last_layer_gradients_freezes_prototypes_for_a_step() -> None:
    head = small_head()
    student = nn.ModuleDict({"dino_head": head})  # works on any module holding heads
    teacher = copy.deepcopy(student)  # plain parameters: deepcopy (the usual teacher init) just works
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.1, weight_decay=0.5)
    before = head.last_layer.weight.detach().clone()
    mlp_before = head.mlp[0].weight.detach().clone()
    head(torch.randn(4, 16)).pow(2).sum().backward()
    assert head.last_layer.weight.grad is not None
    cancel_last_layer_gradients(student)
    assert head.last_layer.weight.grad is None
    assert head.mlp[0].weight.grad is not None
    optimizer.step()
    assert torch.equal(head.last_layer.weight, before)  # not even weight decay touched it
    assert not torch.equal(head.mlp[0].weight, mlp_before)
    assert torch.equal(teacher["dino_head"].last_layer.weight, before)


def test_weight_norm_linear_alone() -> None:
    layer = WeightNormLinear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0, 4.0], [0.0, 2.0, 0.0]]))
    torch.testing.assert_close(layer(torch.tensor([[1.0, 1.0, 1.0]])), torch.tensor([[0.6 + 0.8, 1.0]]))
