"""Gradient accumulation: N micro-batches make the update of one batch N times the size (methods without
batch-coupled statistics), teacher/centre/queue move once per optimizer step, and steps count optimizer steps."""

from __future__ import annotations

import copy

import pytest
import torch

from lvdkit.pretrain.augment import GLOBAL_KEYS, LOCAL_KEY, VIEW_KEY
from lvdkit.pretrain.centering import SoftmaxCenter
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.method import Method
from lvdkit.pretrain.run import plan
from lvdkit.pretrain.train import build_method, build_optimizer, build_schedules, micro_batches, train_step

TINY = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
IMAGES = 8  # per optimizer step


def _cfg(method: str, accumulate: int) -> PretrainConfig:
    cfg = PretrainConfig(method=method, model="timm:vit_tiny_patch16_224", model_kwargs=dict(TINY))  # type: ignore[arg-type]
    cfg.crops.global_size, cfg.crops.local_size, cfg.crops.n_local = 16, 8, 2
    cfg.optim.batch_size, cfg.optim.accumulate_steps = IMAGES // accumulate, accumulate
    cfg.optim.warmup_epochs, cfg.optim.lr = 0, 1e-3
    cfg.distill.teacher, cfg.distill.teacher_pretrained = "timm:vit_tiny_patch16_224", False
    cfg.distill.teacher_kwargs = {"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}
    cfg.distill.mixup = False  # mixup pairs images across the batch: a micro-batch cannot pair across micro-batches
    cfg.distill.queue_size = 12  # smaller than two steps' embeddings: the second step's classifier is the first's
    cfg.dino.head_out_dim, cfg.dino.head_hidden_dim, cfg.dino.head_bottleneck_dim = 64, 32, 16
    cfg.dino.drop_path = 0.0
    cfg.dino.freeze_last_layer_epochs = 0
    return cfg


def _batches(method: str, steps: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)

    def crops(*shape: int) -> torch.Tensor:
        return torch.randint(0, 255, (IMAGES, *shape), generator=gen, dtype=torch.uint8)

    if method == "distillation":
        return [{VIEW_KEY: crops(3, 16, 16)} for _ in range(steps)]
    return [
        {GLOBAL_KEYS[0]: crops(3, 16, 16), GLOBAL_KEYS[1]: crops(3, 16, 16), LOCAL_KEY: crops(2, 3, 8, 8)}
        for _ in range(steps)
    ]


def _train(method: Method, cfg: PretrainConfig, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, object]]:
    """Train on ``batches`` (one optimizer step each); the log rows and a copy of the gradients of every step."""
    optimizer = build_optimizer(method, cfg)
    schedules = build_schedules(cfg, total_steps=10, steps_per_epoch=5, world=1)
    method.train()
    out = []
    for step, batch in enumerate(batches):
        row = train_step(method, method.student, optimizer, batch, schedules, cfg, 0, step, bf16=False)
        grads = {n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None}
        out.append({"row": row, "grads": grads})
    return out


@pytest.mark.parametrize("method_name", ["distillation", "dino"])
def test_accumulated_micro_batches_equal_one_large_batch(method_name: str) -> None:
    torch.manual_seed(0)
    small = build_method(_cfg(method_name, 4), n_images=100)  # 4 micro-batches of 2
    large = copy.deepcopy(small)  # the same weights, teacher, queue and centre
    batches = _batches(method_name, steps=2)  # step 2 sees the queue/centre/teacher that step 1 left
    got = _train(small, _cfg(method_name, 4), batches)
    want = _train(large, _cfg(method_name, 1), batches)  # 1 batch of 8
    for g, w in zip(got, want, strict=True):
        assert g["row"]["loss"] == pytest.approx(w["row"]["loss"], rel=1e-5)
        assert g["row"]["lr"] == w["row"]["lr"]  # the lr is scaled by the images of an optimizer step: 8 in both
        assert g["grads"].keys() == w["grads"].keys()
        for name in w["grads"]:
            torch.testing.assert_close(g["grads"][name], w["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    # Everything that moves once per optimizer step moved the same (EMA teacher, centre, queue; the student too).
    small_state, large_state = small.state_dict(), large.state_dict()
    for key, value in large_state.items():
        torch.testing.assert_close(small_state[key], value, rtol=1e-4, atol=2e-5, msg=key)
    if method_name == "distillation":
        assert int(small_state["queue.ptr"]) == (2 * IMAGES) % 12  # two enqueues of 8 rows, one per step
    else:
        assert float(small_state["center.center"].abs().sum()) > 0  # the centre moved


def test_centre_accumulates_micro_batches_and_moves_once() -> None:
    logits = torch.randn(6, 5)
    once, twice = SoftmaxCenter(5, momentum=0.5), SoftmaxCenter(5, momentum=0.5)
    once.update(logits)
    twice.accumulate(logits[:4])
    assert float(twice.center.abs().sum()) == 0.0  # nothing moves before commit
    twice.accumulate(logits[4:])
    twice.commit()
    torch.testing.assert_close(twice.center, once.center)  # the mean over 6 rows, not the mean of the two means
    twice.commit()  # nothing pending: unchanged
    torch.testing.assert_close(twice.center, once.center)
    assert "_pending" not in dict(twice.state_dict())


def test_steps_count_optimizer_steps() -> None:
    cfg = PretrainConfig()
    cfg.optim.batch_size, cfg.optim.accumulate_steps, cfg.optim.epochs = 10, 3, 2
    assert cfg.optim.step_batch == 30
    assert plan(cfg, 95) == (3, 6)  # 95 images: 3 steps of 30 per epoch
    with pytest.raises(ValueError, match="accumulate"):
        plan(cfg, 29)
    batch = {"x": torch.arange(30).view(30, 1)}
    parts = micro_batches(batch, 3)
    assert [p["x"].shape[0] for p in parts] == [10, 10, 10]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])  # in order
    assert micro_batches(batch, 1) == [batch]
    from lvdkit.core.settings import ConfigError, load_config

    with pytest.raises(ConfigError, match="accumulate_steps"):
        load_config(PretrainConfig, None, ["optim.accumulate_steps=0"])
