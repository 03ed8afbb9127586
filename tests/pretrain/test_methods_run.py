"""Real DINO and SimCLR runs (Ray Train + Ray Data, CPU), a few steps each: DINO with gradient accumulation, SimCLR
started from DINO's export (``init=``); both export and are scored by the weighted k-NN of ``lvdkit eval knn``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lvdkit.core.settings import load_config
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.evaluate import evaluate, load_labeled, split
from lvdkit.pretrain.export import export
from lvdkit.pretrain.run import checkpoints, pretrain
from lvdkit.pretrain.train import build_schedules, read_checkpoint

from .test_pretrain_run import N_IMAGES, TINY_MODEL, _rows, parts  # noqa: F401  (parts: the shared 48-image fixture)

COMMON = (
    *TINY_MODEL,
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "progress=false",
    "ray.num_cpus=2",
    "torch_threads=1",
)
DINO = ("method=dino", "dino.head_out_dim=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16")
MICRO, ACCUMULATE = 4, 2  # 8 images an optimizer step, as 2 micro-batches of 4


@pytest.fixture(scope="module")
def labeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 16 images: a bright square top-left vs bottom-right on noise."""
    folder = tmp_path_factory.mktemp("labeled")
    rng = np.random.default_rng(0)
    for cls, (y, x) in (("a", (4, 4)), ("b", (20, 20))):
        (folder / cls).mkdir()
        for i in range(16):
            pixels = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
            pixels[y : y + 8, x : x + 8] = 255
            Image.fromarray(pixels).save(folder / cls / f"{i}.png")
    return folder


def _train_and_export(out: Path, data: Path, *overrides: str) -> tuple[Path, list[dict[str, float]]]:
    """``lvdkit pretrain`` then ``lvdkit export`` in this process, on the session's Ray (no Ray start per run)."""
    cfg = load_config(PretrainConfig, None, [f"out={out}", f"data={data}", *COMMON, *overrides])
    pretrain(cfg)
    return export(out, out.with_suffix(".safetensors")), _rows(out)


def _knn(model_file: Path, labeled: Path) -> float:
    train, test = split(load_labeled(labeled), 0.5)
    result = evaluate(str(model_file), train, test, device="cpu")  # what `lvdkit eval knn` computes and prints
    assert result["n_train"] == 16 and result["n_test"] == 16 and result["dim"] == 32
    return float(result["knn_top1"])


@pytest.mark.slow  # two trainings and two exports, about 80 s: `make test-all` (keeps `make test` under 20 minutes)
@pytest.mark.usefixtures("ray_local")
def test_dino_with_accumulation_and_simclr_from_its_export(parts: Path, labeled: Path, tmp_path: Path) -> None:  # noqa: F811
    dino_file, rows = _train_and_export(
        tmp_path / "dino", parts, *DINO, f"optim.batch_size={MICRO}", f"optim.accumulate_steps={ACCUMULATE}"
    )
    steps = N_IMAGES // (MICRO * ACCUMULATE)  # optimizer steps: the data goes 8 images a step
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert all(np.isfinite(r["dino"]) and r["images_per_s"] > 0 for r in rows)
    cfg = load_config(PretrainConfig, tmp_path / "dino" / "config.yaml")
    schedules = build_schedules(cfg, steps, steps, 1)  # the lr scaled by 8 images a step, one entry per step
    assert [r["lr"] for r in rows] == pytest.approx([schedules.at(s)["lr"] for s in range(steps)])
    state, meta = read_checkpoint(checkpoints(tmp_path / "dino")[-1])
    assert meta["step"] == steps and meta["method"] == "dino"
    assert torch.equal(load_file(str(dino_file))["pos_embed"], state["method"]["teacher.backbone.pos_embed"])
    knn_dino = _knn(dino_file, labeled)

    simclr_file, rows = _train_and_export(
        tmp_path / "simclr",
        parts,
        "method=simclr",
        "simclr.proj_hidden_dim=32",
        "optim.batch_size=8",
        f"init={dino_file}",
    )
    assert [int(r["step"]) for r in rows] == list(range(1, N_IMAGES // 8 + 1))
    assert all(np.isfinite(r["nt_xent"]) for r in rows)
    record = json.loads((tmp_path / "simclr" / "final.json").read_text())
    assert record["method"] == "simclr" and record["step"] == N_IMAGES // 8
    knn_simclr = _knn(simclr_file, labeled)
    assert 0.0 <= knn_dino <= 1.0 and 0.0 <= knn_simclr <= 1.0
    with pytest.raises(ValueError, match="exports its student"):
        export(tmp_path / "simclr", tmp_path / "t.safetensors", which="teacher")
