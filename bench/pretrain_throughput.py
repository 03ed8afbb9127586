"""Training images/s through lvdkit (Ray Train + Ray Data) vs a bare PyTorch loop on pre-made tensors, one run each.

Both run the same method module (same model, heads, losses, batch, threads, precision) for the same number of steps;
the bare loop feeds pre-made uint8 crops already in memory (no decode, no augmentation, no Ray), so it is the
ceiling and the ratio says what the data path and Ray Train cost. The lvdkit figure is the steady state: steps
after ``--warmup`` (compile, first batches, Ray Data start-up) from the run's own metrics.jsonl.

On CUDA it also prints peak GPU memory and model FLOPs utilisation: FLOPs of one training step (forward + backward
+ teacher forward, counted by ``torch.utils.flop_counter``) x steps/s over the GPU's dense bf16 peak (``--peak-tflops``,
989 for an H100 SXM).

Usage: python bench/pretrain_throughput.py [--data out/demo/curated] [--config configs/pretrain_demo.yaml]
       [--steps 40] [--warmup 10] [--photos] [key=value ...]   (e.g. model=timm:vit_small_patch14_dinov2
       crops.global_size=224; --photos: 2,048 photo JPEGs of 200-500 px instead of the 28 px demo or synthetic data)
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, print_table
from lvdkit.core.image import decode_rgb
from lvdkit.core.settings import load_config
from lvdkit.pretrain.augment import GLOBAL_KEYS, LOCAL_KEY, VIEW_KEY, VIEWS
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.run import pretrain
from lvdkit.pretrain.train import build_method, build_optimizer, build_schedules, train_step


def synthetic_shards(folder: Path, n: int, side: int) -> Path:
    """``n`` random-texture JPEGs of ``side`` px as curated-style Parquet (when no curated set are given)."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        small = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((side, side), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_id": [str(i) for i in range(n)], "image": images}), folder / "part-00000.parquet")
    return folder


def photo_shards(folder: Path, n: int, sides: tuple[int, int] = (200, 500)) -> Path:
    """``n`` JPEGs of real photographs at 200-500 px (the packaged photos: random crops, sizes, aspect ratios and
    qualities), as curated-style Parquet: images of the size real pools hold, not the demo's 28 px digits."""
    from lvdkit.demo_images import load_photos

    photos = [photo for _, photo in load_photos()]
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(sides[0], sides[1] + 1))
        scale = side / max(cw, ch)
        crop = photo.crop((x, y, x + cw, y + ch)).resize((round(cw * scale), round(ch * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
        images.append(buf.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_id": [str(i) for i in range(n)], "image": images}), folder / "part-00000.parquet")
    return folder


def view_costs(cfg: PretrainConfig, data: Path, n: int = 256) -> list[list[object]]:
    """Where one image's training views spend their time, on one thread as in a Ray Data task: ms per image for
    decoding (whole, and at the reduced scale the views allow), the geometric crops, and the batched colour ops."""
    images = pq.read_table(sorted(data.glob("*.parquet"))[0], columns=[cfg.image_column])[cfg.image_column]
    blobs = [bytes(b) for b in images.to_pylist()[:n]]
    views = VIEWS[cfg.method](cfg.crops)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows: list[list[object]] = []

        def timed(name: str, fn: Callable[[], Any]) -> Any:
            start = time.perf_counter()
            out = fn()
            ms = (time.perf_counter() - start) / len(blobs) * 1000
            rows.append([name, f"{ms:.2f}", f"{1000 / ms:.0f}"])
            return out

        timed("decode, whole image", lambda: [decode_rgb(b) for b in blobs])
        decoded = timed(
            f"decode, reduced (shorter side >= {views.min_side})",
            lambda: [decode_rgb(b, min_side=views.min_side) for b in blobs],
        )
        crops = timed("geometric crops (Pillow)", lambda: [views.crops(im) for im in decoded])
        stacked = {k: np.stack([c[k] for c in crops]) for k in crops[0]}
        timed("colour ops (batched)", lambda: views.colour(stacked))
    finally:
        torch.set_num_threads(threads)
    return rows


def fake_batch(cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    """One optimizer step's views (``batch_size * accumulate_steps`` images) as the method's augmentation makes them."""
    b, c = cfg.optim.step_batch, cfg.crops
    g = torch.randint(0, 255, (b, 3, c.global_size, c.global_size), dtype=torch.uint8)
    if cfg.method == "distillation":
        return {VIEW_KEY: g}
    batch = {GLOBAL_KEYS[0]: g, GLOBAL_KEYS[1]: g.clone()}
    if cfg.method in ("dinov2", "dino") and c.n_local:
        batch[LOCAL_KEY] = torch.randint(0, 255, (b, c.n_local, 3, c.local_size, c.local_size), dtype=torch.uint8)
    return batch


def bare_loop(cfg: PretrainConfig, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """images/s of the worker's own training step (:func:`train_step`: same optimizer groups, schedules, clipping,
    teacher update) on pre-made tensors; on CUDA also peak memory and FLOPs per step."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    method = build_method(cfg, 10_000).to(device).train()
    optimizer = build_optimizer(method, cfg)
    total = warmup + 1 + steps
    schedules = build_schedules(cfg, total, max(1, total // max(1, cfg.optim.epochs)), 1)
    batch = {k: v.to(device) for k, v in fake_batch(cfg).items()}
    bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")

    def step(i: int) -> None:
        train_step(method, method.student, optimizer, batch, schedules, cfg, 0, i, bf16)

    for i in range(warmup):
        step(i)
    flops = 0.0
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step(warmup)
        flops = float(counter.get_total_flops())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + 1 + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"images_per_s": steps * cfg.optim.step_batch / seconds, "s_per_step": seconds / steps, "flops": flops}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def lvdkit_run(cfg: PretrainConfig, warmup: int) -> dict[str, float]:
    start = time.perf_counter()
    pretrain(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steady = rows[warmup:]
    span = steady[-1]["time"] - steady[0]["time"]
    ips = (len(steady) - 1) * cfg.optim.step_batch * cfg.num_workers / span if span > 0 else float("nan")
    return {
        "images_per_s": ips,
        "wall_s": wall,
        "data_wait_pct": statistics.median(r["data_wait_pct"] for r in steady),
        "steps": len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain_demo.yaml")
    parser.add_argument("--data", help="curated set (default: synthetic JPEGs)")
    parser.add_argument("--n-images", type=int, default=2048, help="synthetic images when --data is not given")
    parser.add_argument("--photos", action="store_true", help="real-sized data: --n-images photo JPEGs of 200-500 px")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (both sides)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak, for MFU")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="lvdkit-bench-") as tmp:
        cfg = load_config(PretrainConfig, args.config, [f"out={tmp}/run", "progress=false", *args.overrides])
        if args.data:
            data = Path(args.data)
        elif args.photos:
            data = photo_shards(Path(tmp) / "data", args.n_images)
        else:
            data = synthetic_shards(Path(tmp) / "data", args.n_images, 2 * cfg.crops.global_size)
        n_rows = sum(pq.read_metadata(f).num_rows for f in data.glob("*.parquet"))
        steps_total = args.steps + args.warmup
        per_epoch = n_rows // (cfg.optim.step_batch * cfg.num_workers)
        cfg.data, cfg.optim.epochs = str(data), max(1, -(-steps_total // per_epoch))
        cfg.checkpoint_every = 10**9  # only the final checkpoint (after the timed steps)
        use_cuda = torch.cuda.is_available() and cfg.use_gpu is not False
        device = torch.device("cuda" if use_cuda else "cpu")
        print(
            f"model {cfg.model} {cfg.model_kwargs}, method {cfg.method}, batch {cfg.optim.batch_size}, "
            f"crops {cfg.crops.global_size}/{cfg.crops.local_size} x{cfg.crops.n_local}, device {device}, "
            f"threads {cfg.torch_threads or 'default'}",
            flush=True,
        )
        print_table(["views of one image, one thread", "ms / image", "images / s"], view_costs(cfg, data))
        bare = bare_loop(cfg, args.steps, args.warmup, device)
        print(f"bare loop: {bare['images_per_s']:.1f} img/s", flush=True)
        run = lvdkit_run(cfg, args.warmup)
    rows = [
        ["bare PyTorch loop (pre-made tensors)", f"{bare['images_per_s']:.1f}", "-", "1.00"],
        [
            f"lvdkit pretrain (Ray Train + Ray Data), {run['steps']} steps",
            f"{run['images_per_s']:.1f}",
            f"{run['data_wait_pct']:.1f}",
            f"{run['images_per_s'] / bare['images_per_s']:.2f}",
        ],
    ]
    print_table(["path", "images/s", "data wait %", "ratio to bare"], rows)
    print(f"lvdkit wall time {run['wall_s']:.0f} s (includes Ray start-up, dataset start, checkpoint)")
    if device.type == "cuda":
        tflops = bare["flops"] / bare["s_per_step"] / 1e12
        print(
            f"GPU: {torch.cuda.get_device_name()}  peak memory {bare['peak_gib']:.2f} GiB  "
            f"model TFLOP/s {tflops:.1f}  MFU {100 * tflops / args.peak_tflops:.1f}% (bf16 peak {args.peak_tflops})"
        )


if __name__ == "__main__":
    main()
