"""Data-parallel training on CPU: two Ray Train workers with gloo train DINOv2 and distillation for real.

1. lvdkit's training step on 2 DDP workers, each given half of a fixed global batch, ends with the same weights on
   both ranks, equal (to float tolerance) to 1 worker given the whole global batch. The comparison holds what DDP
   promises: the parts of a method that draw or look at per-rank batches by design (iBOT's masks, KoLeo's nearest
   neighbour, as in DINOv2's own code) are switched off for it, and the models have no BatchNorm (per-rank batch
   statistics). What crosses ranks in lvdkit is part of it: Sinkhorn-Knopp's sums and distillation's queue.
2. FSDP (``strategy: fsdp``) on the same 2 workers gives DDP's weights, resumes a sharded checkpoint exactly and
   exports it as DDP's.
3. ``lvdkit pretrain num_workers=2`` with the full DINOv2 recipe (masks, KoLeo) compares the ranks' weights at every
   checkpoint (``replicas_equal`` in ``metrics.jsonl``) and would fail on a drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lvdkit.core.settings import to_dict
from lvdkit.embeddings.model_file import save_lvdkit_model
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.export import export
from lvdkit.pretrain.run import checkpoints
from lvdkit.pretrain.train import build_method, read_checkpoint

from ..conftest import run_cli
from . import parallel_steps
from .test_pretrain_run import EPOCHS, N_IMAGES, TINY_VIT, _rows, _shapes

STEPS, GLOBAL_BATCH = 4, 8
VIT_KWARGS = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _config(method: str, world: int, teacher: str = "", strategy: str = "ddp") -> PretrainConfig:
    cfg = PretrainConfig(method=method, model="timm:vit_tiny_patch16_224", model_kwargs=dict(VIT_KWARGS))  # type: ignore[arg-type]
    cfg.strategy = strategy  # type: ignore[assignment]
    cfg.crops.global_size, cfg.crops.local_size, cfg.crops.n_local = 32, 16, 2
    cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.warmup_epochs = GLOBAL_BATCH // world, 1, 0
    d = cfg.dinov2
    d.head_out_dim, d.head_hidden_dim, d.head_bottleneck_dim = 64, 32, 16
    d.koleo_weight, d.mask_probability, d.drop_path = 0.0, 0.0, 0.0  # per-rank by design: see the module docstring
    cfg.distill.teacher, cfg.distill.mixup = teacher, False  # mixup pairs images within a rank's batch
    return cfg


def _train(world: int, jobs: list[dict[str, Any]], folder: Path) -> list[dict[int, dict[str, torch.Tensor]]]:
    """The jobs (see :func:`parallel_steps.worker_loop`) on ``world`` workers; per job, the student weights of every
    rank that has them whole."""
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(parallel_steps)  # the workers cannot import this test package
    folder.mkdir()
    runs = [{**job, "cfg": to_dict(job["cfg"])} for job in jobs]
    TorchTrainer(
        parallel_steps.worker_loop,
        train_loop_config={"runs": runs, "steps": STEPS, "folder": str(folder)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=world, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=folder.name, storage_path=str(folder)),
    ).fit()
    found = [[folder / f"run{i}-rank{r}.pt" for r in range(world)] for i in range(len(jobs))]
    return [{r: torch.load(f, weights_only=True) for r, f in enumerate(files) if f.exists()} for files in found]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-init ResNet-10t saved as an lvdkit model file: a frozen teacher in eval mode (its BatchNorm uses
    running statistics, the same on every rank)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    return str(save_lvdkit_model(model, "timm:resnet10t", {}, path))


@pytest.fixture(scope="module")
def ddp_two(ray_local: None, teacher_file: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[int, Any]]:
    """DINOv2 and distillation on 2 DDP workers."""
    jobs = [{"cfg": _config("dinov2", 2)}, {"cfg": _config("distillation", 2, teacher_file)}]
    return _train(2, jobs, tmp_path_factory.mktemp("ddp") / "two")


def _moved(method: str, weights: dict[str, torch.Tensor], teacher: str) -> bool:
    """Whether training changed any weight from the seeded start (so that equality is not trivial)."""
    start = _config(method, 1, teacher)
    torch.manual_seed(start.seed)
    initial = build_method(start, 1000).student.state_dict()
    return any(not torch.equal(v, initial[k]) for k, v in weights.items() if v.is_floating_point())


def test_two_workers_keep_equal_replicas_and_match_one_worker(
    ddp_two: list[dict[int, Any]], teacher_file: str, tmp_path: Path
) -> None:
    jobs = [{"cfg": _config("dinov2", 1)}, {"cfg": _config("distillation", 1, teacher_file)}]
    one = _train(1, jobs, tmp_path / "one")
    for method, run2, run1 in zip(("dinov2", "distillation"), ddp_two, one, strict=True):
        for key, value in run2[0].items():
            assert torch.equal(value, run2[1][key]), f"{method}: {key} differs between the ranks"
            torch.testing.assert_close(value, run1[0][key], rtol=1e-4, atol=2e-5, msg=f"{method}: {key}")
        assert _moved(method, run1[0], teacher_file), f"{method}: no weight changed in {STEPS} steps"


def test_fsdp_matches_ddp_resumes_exactly_and_exports(
    ddp_two: list[dict[int, Any]], teacher_file: str, tmp_path: Path
) -> None:
    """FSDP on 2 workers (gloo: this PyTorch's fully_shard runs on CPU): DINOv2 (student and EMA teacher sharded) and
    distillation give DDP's weights; a sharded checkpoint resumes to bit-identical weights; it exports."""
    ckpt = tmp_path / "checkpoint"
    fsdp = [_config("dinov2", 2, strategy="fsdp"), _config("distillation", 2, teacher_file, strategy="fsdp")]
    jobs = [
        {"cfg": fsdp[0], "save": str(ckpt), "save_at": 2},  # straight through, a checkpoint at step 2
        {"cfg": fsdp[0], "load": str(ckpt), "start": 2},  # a new process group resumes from it
        {"cfg": fsdp[1]},
    ]
    straight, resumed, distilled = _train(2, jobs, tmp_path / "fsdp")
    assert list(straight) == [0]  # the whole weights are gathered to rank 0 only
    for key, value in straight[0].items():
        assert torch.equal(value, resumed[0][key]), f"resumed: {key} differs from the uninterrupted run"
        torch.testing.assert_close(value, ddp_two[0][0][key], rtol=1e-4, atol=2e-5, msg=f"dinov2: {key}")
    for key, value in distilled[0].items():
        torch.testing.assert_close(value, ddp_two[1][0][key], rtol=1e-4, atol=2e-5, msg=f"distillation: {key}")
    assert _moved("dinov2", straight[0], teacher_file)

    state, meta = read_checkpoint(ckpt)  # the shards gathered into one state, in a process without a group
    assert meta["step"] == 2 and {"method", "optimizer"} <= state.keys()
    model_file = export(tmp_path, tmp_path / "vit.safetensors", checkpoint=ckpt)
    import timm

    kwargs = json.loads(Path(model_file).with_suffix(".json").read_text())["kwargs"]
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, checkpoint_path=str(model_file), **kwargs)
    assert torch.equal(vit.pos_embed.detach(), state["method"]["teacher.backbone.pos_embed"])


def _two_workers(tmp_path: Path, *extra: str) -> tuple[Path, list[dict[str, Any]], int]:
    """A whole ``lvdkit pretrain num_workers=2`` (4 images a worker) of the tiny DINOv2 on 48 generated images:
    (run folder, its metrics rows, its total steps)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "curated"
    data.mkdir()
    images = [_shapes(i, rng) for i in range(N_IMAGES)]
    pq.write_table(pa.table({"image_id": [f"{i:04d}" for i in range(N_IMAGES)], "image": images}), data / "p.parquet")
    out = tmp_path / "run"
    done = run_cli("pretrain", f"out={out}", f"data={data}", *TINY_VIT, "num_workers=2", "optim.batch_size=4", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(out)
    total = N_IMAGES // (2 * 4) * EPOCHS
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    return out, rows, total


@pytest.mark.slow  # a whole 2-worker `lvdkit pretrain` (2-7 min on 2 cores): `make test-all`
def test_pretrain_two_workers_checks_the_replicas_at_every_checkpoint(tmp_path: Path) -> None:
    _, rows, total = _two_workers(tmp_path)
    assert [int(r["step"]) for r in rows if r.get("replicas_equal") == 2] == list(range(2, total + 1, 2))
    assert rows[-1]["masked"] > 0 and rows[-1]["koleo"] != 0  # the full recipe: iBOT masks and KoLeo on


@pytest.mark.slow  # a whole 2-worker FSDP `lvdkit pretrain` with its learning curve, then export: `make test-all`
def test_pretrain_fsdp_two_workers_writes_sharded_checkpoints_that_export(tmp_path: Path) -> None:
    from .test_monitor import labeled_colours

    curve = (f"eval.data={labeled_colours(tmp_path / 'labeled')}", "eval.every=3")
    out, rows, total = _two_workers(tmp_path, "strategy=fsdp", *curve)
    assert [int(r["step"]) for r in rows if "knn_top1" in r] == list(range(3, total + 1, 3))  # every rank took part
    last = checkpoints(out)[-1]
    assert sorted(p.name for p in (last / "state.dcp").iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # both ranks' shards in one checkpoint folder
    model_file = tmp_path / "vit.safetensors"
    exported = run_cli("export", str(out), "--out", str(model_file))
    assert exported.returncode == 0, exported.stderr
    state, meta = read_checkpoint(last)
    assert meta["step"] == total and meta["strategy"] == "fsdp"
    import timm

    kwargs = json.loads(model_file.with_suffix(".json").read_text())["kwargs"]
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, checkpoint_path=str(model_file), **kwargs)
    assert torch.equal(vit.pos_embed.detach(), state["method"]["teacher.backbone.pos_embed"])
