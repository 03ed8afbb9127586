"""Images/second of the ``embed`` stage vs a bare loop calling the same model on pre-decoded tensors, one run.

The bare loop is the ceiling: every image already decoded and preprocessed into a uint8 array in memory, the model
called batch after batch with all cores. The stage does everything for real: Ray Data decode tasks read and decode
the files, an actor holds the model, the driver writes Parquet parts. The ratio says what the pipeline costs.

Usage: python bench/embed_throughput.py [--model timm:vit_small_patch14_dinov2] [--n 1000] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import ensure_demo, ensure_pool, machine_line, pool_files, print_table
from lvdkit.core.image import decode, to_rgb
from lvdkit.core.settings import load_config
from lvdkit.embeddings import create_embedder
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run


def bare_loop(model_name: str, files: list[str], batch_size: int, threads: int) -> tuple[float, float]:
    """(images/s of the model alone on pre-decoded batches, seconds spent decoding beforehand)."""
    model = create_embedder(model_name, num_threads=threads)
    start = time.perf_counter()
    pixels = np.stack([model.preprocess.prepare(to_rgb(decode(Path(f).read_bytes(), 10**8).image)) for f in files])
    decode_s = time.perf_counter() - start
    model.embed(pixels[:batch_size])  # warm-up (allocations, kernel selection), as the stage's actor also gets
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        model.embed(pixels[i : i + batch_size])
    return len(pixels) / (time.perf_counter() - start), decode_s


def stage(model_name: str, pool: Path, out: Path, batch_size: int) -> tuple[float, float]:
    """(images/s of the embed stage end to end, seconds of the stage)."""
    cfg: CurateConfig = load_config(
        CurateConfig,
        None,
        [
            f"out={out}",
            f"ingest.inputs=[{pool}]",
            "progress=false",
            f"embed.models={{copy: '{model_name}'}}",
            "embed.model_options={}",
            f"embed.batch_size={batch_size}",
            "embed.calibration_copies=0",
            "dedup_exact.enabled=false",
            "dedup_phash.enabled=false",
            "embed.images_per_part=250",
        ],
    )
    run(cfg, stages=("ingest", "dedup_exact", "dedup_phash"))
    run(cfg, stages=("embed",), force=True)
    record = json.loads((out / "embed" / "_SUCCESS").read_text())
    return record["rows"] / record["seconds"], record["seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm:vit_small_patch14_dinov2")
    parser.add_argument("--n", type=int, default=1000, help="images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(machine_line())
    pool = ensure_pool(ensure_demo(args.out / "demo-data"), args.out / f"pool-{args.n}", args.n)
    files = [str(pool / f) for f in pool_files(pool)][: args.n]
    threads = os.cpu_count() or 1
    bare_ips, decode_s = bare_loop(args.model, files, args.batch_size, threads)
    stage_ips, stage_s = stage(args.model, pool, args.out / f"embed-throughput-{args.n}", args.batch_size)
    print(f"\n{args.model} (random init), {len(files)} images, batch {args.batch_size}, {threads} CPUs")
    print_table(
        ["run", "images/s", "seconds", "ratio to bare"],
        [
            ["bare model loop on pre-decoded uint8 batches", f"{bare_ips:.1f}", f"{len(files) / bare_ips:.1f}", "1.00"],
            [
                "embed stage (Ray Data decode tasks + model actor + Parquet)",
                f"{stage_ips:.1f}",
                f"{stage_s:.1f}",
                f"{stage_ips / bare_ips:.2f}",
            ],
        ],
    )
    print(
        f"(the bare loop also spent {decode_s:.1f}s decoding and preprocessing beforehand, not counted above; "
        "the stage's seconds include Ray start of the actor and the model load in it)"
    )


if __name__ == "__main__":
    main()
