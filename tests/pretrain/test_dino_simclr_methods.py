"""The DINO and SimCLR steps on real (random-init) timm models, and SimCLR's two views."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lvdkit.pretrain.augment import GLOBAL_KEYS, LOCAL_KEY, AugmentBatch, TwoViews
from lvdkit.pretrain.config import CropsConfig, PretrainConfig
from lvdkit.pretrain.dino import DINOMethod
from lvdkit.pretrain.dino_loss import dino_loss
from lvdkit.pretrain.nt_xent_loss import nt_xent_loss
from lvdkit.pretrain.simclr import SimCLRMethod

TINY = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
SCHED = {"teacher_temp": 0.04, "momentum": 0.9}


def _cfg(method: str, model: str = "timm:vit_tiny_patch16_224") -> PretrainConfig:
    cfg = PretrainConfig(method=method, model=model)  # type: ignore[arg-type]
    cfg.model_kwargs = dict(TINY) if "vit" in model else {}
    cfg.crops.global_size, cfg.crops.local_size, cfg.crops.n_local, cfg.crops.blur_kernel = 32, 16, 2, 3
    cfg.dino.head_out_dim, cfg.dino.head_hidden_dim, cfg.dino.head_bottleneck_dim = 64, 32, 16
    cfg.dino.drop_path = 0.0  # deterministic forwards: the test recomputes them by hand
    cfg.simclr.proj_hidden_dim, cfg.simclr.proj_out_dim = 32, 16
    return cfg


def _crops(n: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, 255, (n, *shape), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)


def _png(side: int = 40) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_simclr_views_are_two_different_crops_under_the_global_keys() -> None:
    crops = CropsConfig(global_size=24, blur_kernel=3)
    image = Image.open(io.BytesIO(_png()))
    views = TwoViews(crops)(image)
    assert set(views) == set(GLOBAL_KEYS)
    assert all(v.shape == (3, 24, 24) and v.dtype == np.uint8 for v in views.values())
    assert not np.array_equal(*views.values())  # independent draws of one augmentation
    batch = AugmentBatch("simclr", crops, "image")({"image": np.array([_png(), _png()], dtype=object)})
    assert set(batch) == set(GLOBAL_KEYS) and batch[GLOBAL_KEYS[0]].shape == (2, 3, 24, 24)
    assert LOCAL_KEY in AugmentBatch(
        "dino", CropsConfig(global_size=24, local_size=8, n_local=2, blur_kernel=3), "image"
    )({"image": np.array([_png()], dtype=object)})
    with pytest.raises(ValueError, match="valid: dinov2, dino, simclr, distillation"):
        AugmentBatch("byol", crops, "image")


def test_simclr_loss_is_nt_xent_of_the_two_views_and_trains_backbone_and_head() -> None:
    method = SimCLRMethod(_cfg("simclr"))
    batch = {GLOBAL_KEYS[0]: _crops(4, 3, 32, 32), GLOBAL_KEYS[1]: _crops(5, 3, 32, 32)[:4]}
    loss, terms = method.loss(batch, SCHED, np.random.default_rng(0))
    assert set(terms) == {"nt_xent", "pair_top1"} and 0.0 <= terms["pair_top1"] <= 1.0
    method.eval()  # BatchNorm on its running statistics: the projections are then per-image, comparable by hand
    with torch.no_grad():
        z = method.student(
            torch.cat([(batch[k].float() / 255 - torch.tensor(method.mean).view(3, 1, 1)) for k in GLOBAL_KEYS])
            / torch.tensor(method.std).view(3, 1, 1)
        )["projection"]
    eval_loss, _ = method.loss(batch, SCHED, np.random.default_rng(0))
    assert eval_loss.item() == pytest.approx(float(nt_xent_loss(*z.chunk(2), 0.1)), rel=1e-5)
    method.train()
    loss.backward()
    assert method.student.backbone.cls_token.grad is not None and method.student.proj[0].weight.grad is not None
    with pytest.raises(ValueError, match="no teacher"):
        method.export_module("teacher")


@pytest.mark.parametrize("model", ["timm:vit_tiny_patch16_224", "timm:resnet10t"])
def test_dino_loss_uses_the_centre_of_the_step_and_moves_teacher_and_centre_once(model: str) -> None:
    method = DINOMethod(_cfg("dino", model)).train()
    assert not method.teacher.training and method.student.training
    batch = {
        GLOBAL_KEYS[0]: _crops(3, 3, 32, 32),
        GLOBAL_KEYS[1]: _crops(4, 3, 32, 32)[:3],
        LOCAL_KEY: _crops(3, 2, 3, 16, 16),
    }
    loss, terms = method.loss(batch, SCHED, np.random.default_rng(0))
    assert set(terms) == {"dino", "teacher_entropy", "centre_norm"}
    assert 0 < terms["teacher_entropy"] <= np.log(64) + 1e-4 and terms["centre_norm"] == 0.0  # the centre starts at 0
    assert float(method.center.center.abs().sum()) == 0.0  # not before the optimizer step
    # By hand: the teacher's 2 global crops, softmax at the teacher temperature (centre 0), against every student crop.
    with torch.no_grad():
        t = method.teacher(*_inputs(method, batch))["global"]
        s = method.student(*_inputs(method, batch))
    t_probs = torch.softmax(t / 0.04, dim=-1).view(2, 3, 64)
    student = torch.cat([s["global"].view(2, 3, 64), s["local"].view(2, 3, 64)])
    assert loss.item() == pytest.approx(float(dino_loss(student, t_probs, 0.1)), rel=1e-5)
    loss.backward()
    before = [p.detach().clone() for p in method.teacher.parameters()]
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_step(SCHED)
    torch.testing.assert_close(method.center.center, 0.1 * t.mean(dim=0, keepdim=True))
    for old, new, p in zip(before, method.teacher.parameters(), method.student.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * p.detach())
    assert method.export_module("teacher")[0] is method.teacher.backbone


def _inputs(method: DINOMethod, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    from lvdkit.pretrain.augment import multicrop_inputs

    return multicrop_inputs(batch, torch.device("cpu"), method.mean, method.std)


def test_flip_p_zero_builds_views_without_a_flip() -> None:
    def flips(views: TwoViews) -> int:
        torch.manual_seed(0)
        return sum(int(views.specs[key].plan(40, 30)[1].sum()) for key in GLOBAL_KEYS for _ in range(50))

    assert 30 < flips(TwoViews(CropsConfig())) < 70  # 100 draws at p 0.5
    assert flips(TwoViews(CropsConfig(flip_p=0.0))) == 0


def test_simclr_colour_scales_the_jitter_as_the_paper_strength() -> None:
    def jitter(cfg: CropsConfig) -> tuple[float, ...]:
        return TwoViews(cfg).ops[GLOBAL_KEYS[0]].jitter

    assert jitter(CropsConfig()) == (0.8, 0.8, 0.8, 0.2)  # s = 1, the paper's ImageNet strength
    assert jitter(CropsConfig(simclr_colour=0.5)) == (0.4, 0.4, 0.4, 0.1)  # its CIFAR-10 strength
