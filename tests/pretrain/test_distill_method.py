"""The distillation step on real (random-init) timm models: one forward per model, dense term included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvdkit.pretrain.augment import VIEW_KEY
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.distill import DistillMethod
from lvdkit.pretrain.models import pooled_and_tokens


def _method(dense_weight: float) -> DistillMethod:
    cfg = PretrainConfig(method="distillation", model="timm:resnet10t")
    cfg.crops.global_size = 64  # ResNet-10t's last map is 2x2 (the dense term needs >= 2 tokens)
    cfg.distill.teacher = "timm:vit_tiny_patch16_224"
    cfg.distill.teacher_kwargs = {"patch_size": 8, "depth": 1}
    cfg.distill.teacher_pretrained = False
    cfg.distill.dense_weight = dense_weight
    return DistillMethod(cfg, n_images=100)


def test_pooled_and_tokens_pool_like_forward_in_one_pass() -> None:
    method = _method(0.0)
    x = torch.randn(2, 3, 64, 64)
    for model, n_tokens in ((method.teacher, 64), (method.student.backbone.eval(), 4)):
        pooled, tokens = pooled_and_tokens(model, x)
        assert torch.allclose(pooled, model(x), atol=1e-5)
        assert tokens.shape[:2] == (2, n_tokens)  # ViT: 8x8 patches; ResNet: a 2x2 map


def test_dense_term_adds_to_the_loss_and_trains_only_the_student() -> None:
    batch = {VIEW_KEY: torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)}
    sched = {"teacher_temp": 0.04, "momentum": 0.99}
    plain = _method(0.0)
    loss, terms = plain.loss(batch, sched, np.random.default_rng(0))
    assert set(terms) == {"distill"}
    dense = _method(0.5)
    dense.load_state_dict(plain.state_dict())
    loss_dense, terms_dense = dense.loss(batch, sched, np.random.default_rng(0))
    assert terms_dense["distill"] == terms["distill"]  # same view, mixup and weights: the same KL term
    assert float(loss_dense) == pytest.approx(float(loss) + 0.5 * terms_dense["dense"], rel=1e-6)
    loss_dense.backward()
    assert all(p.grad is None for p in dense.teacher.parameters())
    assert dense.student.proj.weight.grad is not None
