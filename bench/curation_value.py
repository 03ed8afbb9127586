"""Does curation help pretraining? The same preset, the same steps, on the curated set and on a random raw sample.

LVD-142M's point (DINOv2, Table 2) is that curated data beats uncurated data at the same compute. This trains one
preset twice from a finished curation run ``--out``: (a) on its curated shards (``OUT/curated``) and (b) on a random
sample, of the same size, of every image ingest accepted (``OUT/ingest`` rows with status ``ok``: duplicates,
near copies and leaked evaluation images included, nothing balanced or retrieved), read from the same files and
written as one Parquet file with the same ``image`` column. Same config, seed, image count, epochs and therefore
steps; each export is scored on the held-out labeled set as ``lvdkit eval knn`` scores it (stratified 50/50 split,
weighted k-NN k=20 T=0.07, linear probe), beside raw pixels on the same split. ``--repeats`` draws other samples and
seeds (the spread of single runs is a few points on 200 test images).

Usage: python bench/curation_value.py [--out out/demo] [--heldout out/demo-data/heldout]
       [--config configs/pretrain_demo.yaml] [--epochs N] [--repeats 1] [--keep DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, print_table
from lvdkit.core import schema
from lvdkit.core.files import MAX_FILE_BYTES, read_bytes
from lvdkit.core.io import read_parts
from lvdkit.pretrain.evaluate import evaluate, knn_accuracy, load_labeled, split
from lvdkit.pretrain.export import export
from lvdkit.pretrain.run import parquet_files
from lvdkit.pretrain.stream import RowGroups
from pretrain_methods import raw_pixels


def curated_count(out: Path) -> int:
    """Rows of the curated parts pretraining reads (those its ``_SUCCESS`` lists)."""
    return RowGroups.of([str(f) for f in parquet_files(out / "curated", schema.IMAGE)], None).rows


def raw_sample(out: Path, n: int, seed: int, target: Path) -> Path:
    """``n`` images drawn uniformly from ingest's accepted rows, bytes as on disk, in one Parquet file."""
    rows = read_parts(out / "ingest", columns=[schema.URI, schema.STATUS_COL])
    ok = np.flatnonzero(np.asarray(rows[schema.STATUS_COL].to_pylist()) == schema.STATUS_OK)
    if len(ok) < n:
        raise SystemExit(f"{out}/ingest has {len(ok)} accepted images, fewer than the {n} curated ones")
    pick = np.sort(np.random.default_rng(seed).choice(ok, n, replace=False))
    uris = rows[schema.URI].take(pa.array(pick)).to_pylist()
    images = [read_bytes(uri, MAX_FILE_BYTES) for uri in uris]
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({schema.URI: uris, schema.IMAGE: pa.array(images, pa.binary())}), target)
    return target


def train(data: Path, run: Path, args: argparse.Namespace, seed: int) -> tuple[Path, int, float]:
    """Pretrain the preset on ``data``; (export, steps, wall seconds)."""
    overrides = [f"out={run}", f"data={data}", f"seed={seed}", "progress=false", *args.overrides]
    if args.epochs is not None:
        overrides.append(f"optim.epochs={args.epochs}")
    cmd = [sys.executable, "-m", "lvdkit.cli", "pretrain", "--config", str(args.config), *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"pretraining on {data} failed:\n{done.stderr[-3000:]}")
    steps = int(json.loads((run / "final.json").read_text())["step"])
    return export(run, run.parent / f"{run.name}.safetensors"), steps, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="a finished curation run")
    parser.add_argument("--heldout", type=Path, default=Path("out/demo-data/heldout"))
    parser.add_argument("--config", type=Path, default=Path("configs/pretrain_demo.yaml"))
    parser.add_argument("--epochs", type=int, help="override the preset's optim.epochs (both runs)")
    parser.add_argument("--repeats", type=int, default=1, help="samples and seeds drawn (seed = repeat index)")
    parser.add_argument("--keep", type=Path, help="keep runs, samples and exports here (default: temporary)")
    parser.add_argument("overrides", nargs="*", help="key=value for both runs' config")
    args = parser.parse_args()
    n = curated_count(args.out)
    if n == 0:
        parser.error(f"{args.out}/curated holds no rows: run `lvdkit curate` first")
    print(machine_line())
    print(" ".join(sys.argv), flush=True)
    train_set, test_set = split(load_labeled(args.heldout), 0.5)
    pixels = knn_accuracy(raw_pixels(train_set), train_set.labels, raw_pixels(test_set), test_set.labels, 20, 0.07)
    results: dict[str, list[dict[str, float]]] = {"curated": [], "raw sample": []}
    with tempfile.TemporaryDirectory(prefix="lvdkit-curation-value-") as tmp:
        folder = args.keep or Path(tmp)
        for seed in range(args.repeats):
            sources = {
                "curated": args.out / "curated",
                "raw sample": raw_sample(args.out, n, seed, folder / f"raw-{seed}" / "part-0.parquet"),
            }
            for name, data in sources.items():
                model, steps, wall = train(data, folder / f"{name.replace(' ', '-')}-{seed}", args, seed)
                scores = evaluate(str(model), train_set, test_set, device="cpu")
                results[name].append({**scores, "steps": steps, "wall_s": wall})
                print(f"{name}, seed {seed}: {steps} steps, k-NN {scores['knn_top1']:.3f}", flush=True)
    rows: list[list[object]] = [["raw pixels (28x28 grayscale)", "-", "-", "-", f"{pixels:.3f}", "-"]]
    for name, runs in results.items():
        knn = [r["knn_top1"] for r in runs]
        spread = f" ({min(knn):.3f}-{max(knn):.3f})" if len(knn) > 1 else ""
        linear = statistics.mean(r["linear_top1"] for r in runs)
        steps, wall = runs[0]["steps"], statistics.mean(r["wall_s"] for r in runs)
        rows.append(
            [
                f"{args.config.name} on {name}",
                n,
                steps,
                f"{wall:.0f}",
                f"{statistics.mean(knn):.3f}{spread}",
                f"{linear:.3f}",
            ]
        )
    gain = statistics.mean(r["knn_top1"] for r in results["curated"]) - statistics.mean(
        r["knn_top1"] for r in results["raw sample"]
    )
    print(f"\nheld-out: {len(train_set.labels)} train / {len(test_set.labels)} test; {args.repeats} repeat(s)")
    print_table(["pretraining data", "images", "steps", "wall s", "k-NN top-1", "linear top-1"], rows)
    print(f"curated minus raw sample, k-NN top-1: {gain:+.3f}")


if __name__ == "__main__":
    main()
