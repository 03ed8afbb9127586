"""Data-parallel training on CPU: two Ray Train workers with gloo train DINOv2 and distillation for real.

1. lvdkit's training step on 2 DDP workers, each given half of a fixed global batch, ends with the same weights on
   both ranks, equal (to float tolerance) to 1 worker given the whole global batch. The comparison holds what DDP
   promises: the parts of a method that draw or look at per-rank batches by design (iBOT's masks, KoLeo's nearest
   neighbour, as in DINOv2's own code) are switched off for it, and the models have no BatchNorm (per-rank batch
   statistics). What crosses ranks in lvdkit is part of it: Sinkhorn-Knopp's sums and distillation's queue.
2. ``lvdkit pretrain num_workers=2`` with the full DINOv2 recipe (masks, KoLeo) compares the ranks' weights at every
   checkpoint (``replicas_equal`` in ``metrics.jsonl``) and would fail on a drift.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lvdkit.core.settings import to_dict
from lvdkit.embeddings.model_file import save_lvdkit_model
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.train import build_method

from ..conftest import run_cli
from . import ddp_steps
from .test_pretrain_run import EPOCHS, N_IMAGES, TINY_VIT, _shapes

STEPS, GLOBAL_BATCH = 4, 8
VIT_KWARGS = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _config(method: str, batch: int, teacher: str = "") -> PretrainConfig:
    cfg = PretrainConfig(method=method, model="timm:vit_tiny_patch16_224", model_kwargs=dict(VIT_KWARGS))  # type: ignore[arg-type]
    cfg.crops.global_size, cfg.crops.local_size, cfg.crops.n_local = 32, 16, 2
    cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.warmup_epochs = batch, 1, 0
    d = cfg.dinov2
    d.head_out_dim, d.head_hidden_dim, d.head_bottleneck_dim = 64, 32, 16
    d.koleo_weight, d.mask_probability, d.drop_path = 0.0, 0.0, 0.0  # per-rank by design: see the module docstring
    cfg.distill.teacher, cfg.distill.mixup = teacher, False  # mixup pairs images within a rank's batch
    return cfg


def _train(world: int, teacher: str, folder: Path) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Both methods on ``world`` workers; per run, the weights of every rank."""
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(ddp_steps)  # the workers cannot import this test package
    runs = [_config("dinov2", GLOBAL_BATCH // world), _config("distillation", GLOBAL_BATCH // world, teacher)]
    folder.mkdir()
    TorchTrainer(
        ddp_steps.worker_loop,
        train_loop_config={"runs": [to_dict(c) for c in runs], "steps": STEPS, "folder": str(folder)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=world, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=f"world{world}", storage_path=str(folder)),
    ).fit()
    return [
        {f"rank{r}": torch.load(folder / f"run{i}-rank{r}.pt", weights_only=True) for r in range(world)}
        for i in range(len(runs))
    ]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init ResNet-10t saved as an lvdkit model file: a frozen teacher in eval mode (its BatchNorm uses
    running statistics, the same on every rank)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    return str(save_lvdkit_model(model, "timm:resnet10t", {}, path))


def test_two_workers_keep_equal_replicas_and_match_one_worker(
    ray_local: None, teacher_file: str, tmp_path: Path
) -> None:
    two = _train(2, teacher_file, tmp_path / "two")
    one = _train(1, teacher_file, tmp_path / "one")
    for method, run2, run1 in zip(("dinov2", "distillation"), two, one, strict=True):
        start = _config(method, GLOBAL_BATCH, teacher_file)
        for key, value in run2["rank0"].items():
            assert torch.equal(value, run2["rank1"][key]), f"{method}: {key} differs between the ranks"
            torch.testing.assert_close(value, run1["rank0"][key], rtol=1e-4, atol=2e-5, msg=f"{method}: {key}")
        # The runs trained (the weights moved from their seeded start), so equality above is not trivial.
        torch.manual_seed(start.seed)
        initial = build_method(start, 1000).student.state_dict()
        moved = any(not torch.equal(v, initial[k]) for k, v in run1["rank0"].items() if v.is_floating_point())
        assert moved, f"{method}: no weight changed in {STEPS} steps"


@pytest.mark.slow  # a whole 2-worker `lvdkit pretrain` (2-7 min on 2 cores): `make test-all`
def test_pretrain_two_workers_checks_the_replicas_at_every_checkpoint(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "curated"
    data.mkdir()
    images = [_shapes(i, rng) for i in range(N_IMAGES)]
    pq.write_table(pa.table({"image_id": [f"{i:04d}" for i in range(N_IMAGES)], "image": images}), data / "p.parquet")
    out = tmp_path / "run"
    args = (f"out={out}", f"data={data}", *TINY_VIT, "num_workers=2", "optim.batch_size=4")
    done = run_cli("pretrain", *args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    total = N_IMAGES // (2 * 4) * EPOCHS  # 2 workers at 4 images each
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    assert [int(r["step"]) for r in rows if r.get("replicas_equal") == 2] == list(range(2, total + 1, 2))
    assert rows[-1]["masked"] > 0 and rows[-1]["koleo"] != 0  # the full recipe: iBOT masks and KoLeo on
