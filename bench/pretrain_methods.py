"""k-NN of each pretraining method on the demo at the same wall budget, beside raw pixels and a random-init ViT.

Each method trains from its demo preset (``configs/pretrain_demo.yaml``, ``dino_demo.yaml``, ``simclr_demo.yaml``;
distillation: ``distill_demo.yaml``, the dinov2 run's export distilled into a ResNet-10t) for as many epochs as
``--budget-s`` allows: a short probe times the worker's own ``train_step`` on pre-made tensors (seconds per step),
and the run gets ``(budget - startup) / (seconds per epoch / efficiency)`` epochs, at least 1 (``--startup-s``:
Ray start, data start, checkpoint; ``--efficiency``: the Ray Data augmentation shares the cores). The wall time
column says how close each run came. Every exported backbone is scored as ``lvdkit eval knn --train HELDOUT`` scores
it (stratified 50/50 split, weighted k-NN k=20 T=0.07, linear probe); raw pixels are the held-out images at 28x28
grayscale, flattened and L2-normalised, under the same k-NN.

Usage: python bench/pretrain_methods.py [--data out/demo/curated] [--heldout out/demo-data/heldout]
       [--budget-s 180] [--methods dinov2,dino,simclr,distillation] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, print_table
from lvdkit.core.settings import load_config
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.evaluate import Labeled, evaluate, knn_accuracy, load_image, load_labeled, split
from lvdkit.pretrain.export import export
from lvdkit.pretrain.run import parquet_files, plan
from pretrain_throughput import bare_loop

PRESETS = {
    "dinov2": "configs/pretrain_demo.yaml",
    "dino": "configs/dino_demo.yaml",
    "simclr": "configs/simclr_demo.yaml",
    "distillation": "configs/distill_demo.yaml",
}
PIXEL_SIDE = 28


def raw_pixels(data: Labeled) -> np.ndarray:
    """(N, 28 * 28) float32: grayscale, resized, flattened, L2-normalised (the k-NN's cosine similarity)."""
    rows = [np.asarray(load_image(x).convert("L").resize((PIXEL_SIDE, PIXEL_SIDE)), np.float32) for x in data.images]
    flat = np.stack(rows).reshape(len(rows), -1)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True).clip(1e-6)


def budget_epochs(cfg: PretrainConfig, n_images: int, args: argparse.Namespace) -> tuple[int, float]:
    """(epochs that fit the budget, probed seconds per step)."""
    probe = bare_loop(cfg, steps=args.probe_steps, warmup=3, device=torch.device("cpu"))
    steps_per_epoch, _ = plan(cfg, n_images)
    seconds_per_epoch = probe["s_per_step"] * steps_per_epoch / args.efficiency
    return max(1, int((args.budget_s - args.startup_s) / seconds_per_epoch)), probe["s_per_step"]


def train(method: str, folder: Path, args: argparse.Namespace, teacher: Path | None) -> dict[str, object]:
    """Train ``method`` from its preset within the budget, export it; the run's figures."""
    out = folder / method
    overrides = [f"out={out}", f"data={args.data}", "progress=false"]
    if teacher is not None:
        overrides.append(f"distill.teacher={teacher}")
    cfg = load_config(PretrainConfig, PRESETS[method], overrides)
    n_images = sum(pq.read_metadata(f).num_rows for f in parquet_files(args.data, cfg.image_column))
    epochs, s_per_step = budget_epochs(cfg, n_images, args)
    load = os.getloadavg()[0]  # another job on the machine skews the probe and the run alike: say so
    print(f"{method}: {s_per_step:.3f} s/step probed -> {epochs} epochs in {args.budget_s:.0f} s (load {load:.1f})")
    cmd = [sys.executable, "-m", "lvdkit.cli", "pretrain", "--config", PRESETS[method], *overrides]
    start = time.perf_counter()
    done = subprocess.run([*cmd, f"optim.epochs={epochs}"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    record = json.loads((out / "final.json").read_text())
    model_file = export(out, folder / f"{method}.safetensors")
    return {"model_file": model_file, "model": cfg.model, "epochs": epochs, "steps": record["step"], "wall_s": wall}


def _scores(result: dict[str, object]) -> list[str]:
    return [f"{result['knn_top1']:.3f}", f"{result['linear_top1']:.3f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("out/demo/curated"))
    parser.add_argument("--heldout", type=Path, default=Path("out/demo-data/heldout"))
    parser.add_argument("--budget-s", type=float, default=180.0, help="wall seconds per method (training + start-up)")
    parser.add_argument("--methods", default="dinov2,dino,simclr,distillation")
    parser.add_argument("--startup-s", type=float, default=30.0, help="Ray and data start-up, final checkpoint")
    parser.add_argument("--efficiency", type=float, default=0.85, help="pipeline img/s over the bare loop's")
    parser.add_argument("--probe-steps", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="keep the runs and exports here (default: a temporary folder)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(PRESETS))
    if unknown:
        parser.error(f"unknown methods {unknown}; valid: {', '.join(PRESETS)}")
    if "distillation" in methods and "dinov2" not in methods:
        parser.error("distillation distils the dinov2 run's export: list dinov2 too")
    print(machine_line())
    print(" ".join(sys.argv), flush=True)
    train_set, test_set = split(load_labeled(args.heldout), 0.5)
    pixels = knn_accuracy(raw_pixels(train_set), train_set.labels, raw_pixels(test_set), test_set.labels, 20, 0.07)
    rows: list[list[object]] = [["raw pixels (28x28 grayscale)", "-", "-", "-", "-", f"{pixels:.3f}", "-"]]
    preset = load_config(PretrainConfig, PRESETS["dinov2"])
    scores = evaluate(preset.model, train_set, test_set, img_size=32, kwargs=preset.model_kwargs, device="cpu")
    rows.append(["random-init ViT (the presets' model)", preset.model, "-", "-", "-", *_scores(scores)])
    with tempfile.TemporaryDirectory(prefix="lvdkit-methods-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        exports: dict[str, Path] = {}
        for method in methods:
            run = train(method, folder, args, exports.get("dinov2") if method == "distillation" else None)
            exports[method] = Path(str(run["model_file"]))
            scores = evaluate(str(run["model_file"]), train_set, test_set, device="cpu")
            label = method if method != "distillation" else "distillation (dinov2 export -> CNN)"
            rows.append([label, run["model"], run["epochs"], run["steps"], f"{run['wall_s']:.0f}", *_scores(scores)])
            print(f"{method}: k-NN top-1 {scores['knn_top1']:.3f}", flush=True)
    print(f"\nheld-out: {len(train_set.labels)} train / {len(test_set.labels)} test; budget {args.budget_s:.0f} s each")
    print_table(["method", "model", "epochs", "steps", "wall s", "k-NN top-1", "linear top-1"], rows)


if __name__ == "__main__":
    main()
