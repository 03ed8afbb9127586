"""The ``embed`` stage's data plane: throughput against a bare model loop, decode tasks in parallel, driver memory.

1. Throughput: images/s of the ``embed`` stage vs a bare loop calling the same model on pre-decoded tensors (the
   ceiling: every image already decoded into a uint8 array in memory, the model called batch after batch with all
   cores). The stage does everything for real: Ray Data decode tasks (one per part) read, decode and preprocess the
   files, a model actor embeds them and writes the Parquet parts. Run with the default resources (``actor_cpus``
   null: the node's CPUs less one decode task's, the model's threads to match) and, with ``--actor-cpus-1``, with
   ``embed.actor_cpus=1`` (two half-CPU decode tasks at once beside a one-thread model), so both the ratio and the
   decode parallelism show. Two ratios: end to end (the stage's ``_SUCCESS`` seconds, start-up included) and steady
   (the parts after the first over the time between the first and the last part written).
2. Driver memory: the driver's peak RSS while the stage embeds ``--rss-sizes`` images (a cheap model, so decoding
   dominates): it holds the list of pending parts and one small row per finished part, nothing per image. Each size
   runs in a fresh process (nothing left over from the others).

Decode tasks in parallel: the most Ray worker processes seen at once running ``_decode_parts`` (Ray titles a busy
worker ``ray::<task>``), sampled every 0.2 s.

Usage: python bench/embed_throughput.py [--model timm:vit_small_patch14_dinov2] [--n 6000] [--rss-sizes 20000,100000]
       [--per-part 1000] [--actor-cpus-1] [--bare-n 1000]

``--bare-n``: the bare loop times only the first images (its rate does not depend on how many), so a stage run
long enough for its start-up to weigh what it weighs on a real pool costs half the time.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RayPeaks, ensure_demo, ensure_pool, machine_line, pool_files, print_table
from lvdkit.core.image import decode, to_rgb
from lvdkit.core.settings import load_config
from lvdkit.embeddings import create_embedder
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run

DECODE_TASK = "_decode_parts"
CHEAP_MODEL = "timm:vit_tiny_patch16_224"  # at 32 px: 4 patches, so decoding is the work


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


def stage(
    model: str,
    options: str,
    pool: Path,
    out: Path,
    batch_size: int,
    per_part: int,
    extra: list[str],
    sample_s: float = 0.2,
) -> dict[str, float]:
    """The embed stage over ``pool`` (ingested first, not timed): images/s, seconds, driver peak MiB, decode tasks
    seen at once."""
    cfg: CurateConfig = load_config(
        CurateConfig,
        None,
        [
            f"out={out}",
            f"ingest.inputs=[{pool}]",
            "progress=false",
            f"embed.models={{copy: '{model}'}}",
            f"embed.model_options={{copy: {options}}}",
            f"embed.batch_size={batch_size}",
            "embed.calibration_copies=0",
            "dedup_exact.enabled=false",
            "dedup_phash.enabled=false",
            f"embed.images_per_part={per_part}",
            *extra,
        ],
    )
    run(cfg, stages=("ingest", "dedup_exact", "dedup_phash"))
    # sampling every process costs the machine CPU: 0.2 s (about 6% of a core) for the short decode-bound runs
    # where decode tasks must be seen, 1 s where the stage's own speed is measured
    with RayPeaks(counting=DECODE_TASK, interval_s=sample_s) as peaks:
        run(cfg, stages=("embed",), force=True)
    record = json.loads((out / "embed" / "_SUCCESS").read_text())
    return {
        "ips": record["rows"] / record["seconds"],
        "seconds": record["seconds"],
        "steady_ips": steady_rate(out / "embed"),
        "driver_mib": peaks.driver / 2**20,
        "decode_at_once": peaks.most_at_once,
        "rows": record["rows"],
    }


def steady_rate(stage_dir: Path) -> float:
    """Images/s once the stage runs: the rows of every part after the first one written, over the time from the
    first part's commit to the last's (part files' modification times). What start-up costs (Ray Data's plan, the
    actor's process, torch and the model, the first part's decode) is left out; a stage embedding millions of
    images pays it once."""
    import pyarrow.parquet as pq

    parts = sorted(stage_dir.glob("part-*.parquet"), key=lambda p: p.stat().st_mtime)
    if len(parts) < 2:
        return float("nan")
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts[1:])
    return rows / max(1e-9, parts[-1].stat().st_mtime - parts[0].stat().st_mtime)


def _in_fresh_process(*args: Any) -> dict[str, float]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(pool.submit(stage, *args).result())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm:vit_small_patch14_dinov2")
    parser.add_argument("--n", type=int, default=6000, help="images for the throughput runs")
    parser.add_argument(
        "--bare-n", type=int, default=1000, help="images the bare loop times (0: all --n; its rate is flat in n)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rss-sizes", default="20000,100000", help="images for the driver-memory runs ('' skips)")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--skip-throughput", action="store_true", help="only the driver-memory runs")
    parser.add_argument(
        "--per-part", type=int, default=1000, help="embed.images_per_part of the throughput runs (the stage's default)"
    )
    parser.add_argument("--actor-cpus-1", action="store_true", help="also run with embed.actor_cpus=1")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    print(machine_line(), flush=True)
    demo = ensure_demo(args.out / "demo-data")
    if not args.skip_throughput:
        throughput(args, demo)
    driver_memory(args, demo)


def throughput(args: argparse.Namespace, demo: Path) -> None:
    pool = ensure_pool(demo, args.out / f"pool-{args.n}", args.n)
    files = [str(pool / f) for f in pool_files(pool)][: args.n]
    threads = os.cpu_count() or 1
    bare_files = files[: args.bare_n or len(files)]
    bare_ips, decode_s = bare_loop(args.model, bare_files, args.batch_size, threads)
    bare: list[object] = [
        f"bare model loop on pre-decoded uint8 batches ({len(bare_files)} images)",
        f"{bare_ips:.1f}",
        f"{len(bare_files) / bare_ips:.1f}",
        "",
        "",
        "",
        "",
    ]
    rows: list[list[object]] = [bare]
    variants: list[tuple[str, list[str]]] = [("embed stage, default resources", [])]
    if args.actor_cpus_1:
        variants.append(("embed stage, embed.actor_cpus=1", ["embed.actor_cpus=1"]))
    for label, extra in variants:
        out = args.out / f"embed-throughput-{args.n}"
        got = _in_fresh_process(args.model, "{}", pool, out, args.batch_size, args.per_part, extra, 1.0)
        rows.append(
            [
                label,
                f"{got['ips']:.1f}",
                f"{got['seconds']:.1f}",
                f"{got['ips'] / bare_ips:.2f}",
                f"{got['steady_ips']:.1f}",
                f"{got['steady_ips'] / bare_ips:.2f}",
                got["decode_at_once"],
            ]
        )
    print(f"\n{args.model} (random init), {len(files)} images, batch {args.batch_size}, {threads} CPUs")
    headers = ["run", "images/s", "seconds", "ratio to bare", "steady images/s", "steady ratio", "decode tasks at once"]
    print_table(headers, rows)
    print(
        f"(the bare loop also spent {decode_s:.1f}s decoding and preprocessing beforehand, not counted above; "
        "the stage's seconds include Ray Data's start, its actor's process, the model load and the first part's "
        f"decode; steady: parts 2..{math.ceil(len(files) / args.per_part)} over the time between the first and the "
        "last part written)",
        flush=True,
    )


def driver_memory(args: argparse.Namespace, demo: Path) -> None:
    sizes = [int(float(s)) for s in args.rss_sizes.split(",") if s]
    rss_rows: list[list[object]] = []
    for n in sizes:
        big = ensure_pool(demo, args.out / f"pool-{n}", n)
        got = _in_fresh_process(CHEAP_MODEL, "{img_size: 32}", big, args.out / f"embed-rss-{n}", 64, 1000, [])
        rss_rows.append(
            [f"{n:,}", got["rows"], f"{got['seconds']:.0f}", f"{got['ips']:.0f}", f"{got['driver_mib']:.0f}"]
        )
        rss_rows[-1].append(f"{got['driver_mib'] / float(str(rss_rows[0][4])):.2f}")
        rss_rows[-1].append(got["decode_at_once"])
        print_table(
            ["images", "embedded", "seconds", "images/s", "driver peak MiB", "vs first", "decode tasks at once"],
            rss_rows,
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
