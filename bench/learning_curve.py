"""The learning curves of pretraining runs beside the raw-pixel baseline.

A run started with ``eval.data=FOLDER`` logs ``knn_top1`` (DINO's weighted k-NN, k=20, T=0.07, on the stratified
split of FOLDER that ``lvdkit eval knn --train FOLDER`` makes) and ``embedding_std`` (1: spread, 0: collapsed) every
``eval.every`` steps into its ``metrics.jsonl``. This prints them step by step for each run, with the wall minutes
since the run's first step, next to raw pixels on the same split (grayscale 28x28, flattened, L2-normalised, same
k-NN): where each run is heading and how far it is from the simplest baseline.

``--splits N`` then scores each run's final model (exported from its latest checkpoint) and raw pixels on N
stratified splits (seeds 0..N-1) of the same folder: k-NN and linear probe, mean and range. One 200/200 split
moves by a few points from seed to seed (raw pixels on the demo: 0.805-0.855 over 5 splits), more than some of the
gaps it is asked to show.

Usage: python bench/learning_curve.py RUN [RUN ...] [--splits N]   (e.g. out/pretrain/dinov2 out/pretrain/distill
       after `make pretrain`; runs may be local folders or s3://... URIs)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, print_table
from lvdkit.core.settings import load_config
from lvdkit.core.storage import location
from lvdkit.embeddings.factory import create_embedder
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.evaluate import Labeled, embed_images, knn_accuracy, linear_probe_accuracy, load_labeled, split
from lvdkit.pretrain.export import export
from pretrain_methods import raw_pixels


def curve(run: str) -> tuple[PretrainConfig, list[dict[str, float]]]:
    """The run's resolved config and its logged rows that carry an evaluation (the last row per step)."""
    folder = location(run)
    with tempfile.TemporaryDirectory() as tmp:  # the run may be on object storage; load_config reads a local file
        saved = Path(tmp) / "config.yaml"
        saved.write_text((folder / "config.yaml").read_text())
        cfg = load_config(PretrainConfig, saved)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{run}: metrics.jsonl is empty")
    start = rows[0]["time"]
    evaluated = {int(r["step"]): {**r, "minutes": (r["time"] - start) / 60} for r in rows if "knn_top1" in r}
    if not evaluated:
        raise SystemExit(f"{run}: no k-NN in its metrics.jsonl (start the run with eval.data=FOLDER)")
    return cfg, [evaluated[s] for s in sorted(evaluated)]


def over_splits(data: Labeled, vectors: np.ndarray, fraction: float, n: int) -> list[tuple[float, float]]:
    """(k-NN top-1 (k=20, T=0.07), linear-probe top-1) of ``vectors`` (one row per image of ``data``) on ``n``
    stratified splits."""
    index = {name: i for i, name in enumerate(data.names)}
    scores = []
    for seed in range(n):
        train, test = split(data, fraction, seed)
        a, b = vectors[[index[x] for x in train.names]], vectors[[index[x] for x in test.names]]
        knn = knn_accuracy(a, train.labels, b, test.labels, 20, 0.07)
        scores.append((knn, linear_probe_accuracy(a, train.labels, b, test.labels)))
    return scores


def _mean_range(values: list[float]) -> list[str]:
    return [f"{np.mean(values):.3f}", f"{min(values):.3f}-{max(values):.3f}"]


def final_vectors(run: str, data: Labeled) -> np.ndarray:
    """The run's latest checkpoint, exported to a temporary file, embedding every image of ``data``."""
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "final.safetensors"
        export(run, model)
        e = embed_images(create_embedder(str(model), device="cpu"), data.images, names=data.names)
    if len(e.kept) != len(data.images):
        raise SystemExit(f"{run}: {len(data.images) - len(e.kept)} held-out images could not be embedded")
    return e.vectors


def split_table(curves: dict[str, tuple[PretrainConfig, list[dict[str, float]]]], data: Labeled, n: int) -> None:
    """Final models and raw pixels on ``n`` splits: mean (min-max) k-NN top-1."""
    fraction = next(iter(curves.values()))[0].eval.test_fraction
    scored = {"raw pixels (28x28 grayscale)": over_splits(data, raw_pixels(data), fraction, n)}
    for run, (cfg, points) in curves.items():
        scored[f"{Path(run).name} ({cfg.method}, step {int(points[-1]['step'])})"] = over_splits(
            data, final_vectors(run, data), fraction, n
        )
    print(f"\nfinal models on {n} stratified splits of {len(data.labels)} held-out images:")
    pixels = float(np.mean([knn for knn, _ in scored["raw pixels (28x28 grayscale)"]]))
    rows = []
    for name, pairs in scored.items():
        knn, linear = [p[0] for p in pairs], [p[1] for p in pairs]
        gap = f"{np.mean(knn) - pixels:+.3f}"
        rows.append([name, *_mean_range(knn), gap, *_mean_range(linear)])
    print_table(["model", "k-NN mean", "range", "vs raw pixels", "linear mean", "range"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="pretraining run folders (their out=)")
    parser.add_argument("--splits", type=int, default=0, help="also score the final models on N splits (mean, range)")
    args = parser.parse_args()
    print(machine_line())
    print(" ".join(sys.argv), flush=True)
    curves = {run: curve(run) for run in args.runs}
    first_cfg = next(iter(curves.values()))[0]
    assert first_cfg.eval.data is not None
    data = load_labeled(first_cfg.eval.data)
    train, test = split(data, first_cfg.eval.test_fraction, first_cfg.eval.seed)
    pixels = knn_accuracy(raw_pixels(train), train.labels, raw_pixels(test), test.labels, 20, 0.07)
    print(f"\nheld-out {first_cfg.eval.data}: {len(train.labels)} train / {len(test.labels)} test")
    print(f"raw pixels (28x28 grayscale): k-NN top-1 {pixels:.3f}\n")
    rows: list[list[object]] = []
    for run, (cfg, points) in curves.items():
        if cfg.eval.data != first_cfg.eval.data:
            print(f"note: {run} evaluated on {cfg.eval.data}, not {first_cfg.eval.data}")
        for p in points:
            gap = p["knn_top1"] - pixels
            rows.append(
                [
                    Path(run).name,
                    cfg.method,
                    int(p["step"]),
                    f"{p['minutes']:.1f}",
                    f"{p['knn_top1']:.3f}",
                    f"{gap:+.3f}",
                    f"{p['embedding_std']:.2f}",
                    f"{p['linear_top1']:.3f}" if "linear_top1" in p else "-",
                ]
            )
    print_table(["run", "method", "step", "minutes", "k-NN top-1", "vs raw pixels", "embedding std", "linear"], rows)
    if args.splits:
        split_table(curves, data, args.splits)


if __name__ == "__main__":
    main()
