"""Memory of ``ingest`` + ``dedup_exact`` + ``dedup_phash`` as the number of images grows: does the driver stay flat?

Generates (once, cached) a pool of small images (32x32 PNG and JPEG, about 3% byte-identical copies and 5% near
duplicates: re-encoded, or a pixel changed) laid out so that each requested size is one folder walked recursively
(``n200000/`` holds ``n100000/``, which holds ``n50000/``, ...). For each size, in a fresh process, it runs the three
stages through lvdkit's runner (``lvdkit.pipeline.runner.run``, a local Ray with ``--cpus`` CPUs) while a thread
samples, every ``--interval`` seconds, the RSS of

* the driver (this process: the runner, Ray's driver side, the summary),
* each Ray worker process (``ray::...``: the shard tasks, the whole-dataset dedup tasks; reported as the largest
  single worker and the largest sum over all workers at one instant),
* Ray's own services (raylet, GCS, dashboard agents), for context,

and prints the peaks, per stage and overall, with rows/s. ``--tars N`` packs each size's images into WebDataset tars
of N images (cached) and ingests those instead: the driver then lists one file per tar, each task reads a tar.
RSS counts shared pages (Ray's object store is shared memory) in every process that touches them, so worker sums
overstate; the driver's figure is what this bench is for.

    .venv/bin/python bench/ingest_memory.py --sizes 50000 100000 200000
    .venv/bin/python bench/ingest_memory.py --sizes 20000 100000 --tars 1000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from _common import machine_line, print_table, run_limited

POOL_VERSION = 1
FILES_PER_FOLDER = 1000
SIDE = 32
STAGES = ("ingest", "dedup_exact", "dedup_phash")
EXACT_EVERY, NEAR_EVERY = 33, 20  # about 3% byte copies, 5% near duplicates

Result = dict[str, Any]


# --- the pool -----------------------------------------------------------------------------------------------------


def size_folder(pool: Path, sizes: list[int], n: int) -> Path:
    """The folder whose recursive walk lists exactly the first ``n`` images (``n`` one of ``sizes``)."""
    folder = pool
    for s in sorted(sizes, reverse=True):
        folder = folder / f"n{s:07d}"
        if s == n:
            return folder
    raise ValueError(f"{n} is not one of {sizes}")


def image_path(pool: Path, sizes: list[int], index: int) -> Path:
    """Image ``index`` lives in the folder of the smallest size that includes it, 1000 files per subfolder."""
    n = min(s for s in sizes if index < s)
    return size_folder(pool, sizes, n) / f"d{index // FILES_PER_FOLDER:04d}" / f"img_{index:07d}.{_ext(index)}"


def _ext(index: int) -> str:
    return "jpg" if index % 3 == 0 else "png"


def _encode(pixels: np.ndarray, ext: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(seed: int) -> np.ndarray:
    """A distinct low-frequency picture (so PHashes differ), 32x32 RGB."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(coarse).resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.int16)
    return np.clip(big + rng.integers(-8, 9, big.shape), 0, 255).astype(np.uint8)


def _write_chunk(pool: str, sizes: list[int], indices: list[int]) -> None:
    root = Path(pool)
    for index in indices:
        path = image_path(root, sizes, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        if index % EXACT_EVERY == 1 and index > 1:  # a byte copy of the previous image (same extension kind or not)
            data = _encode(_pixels(index - 1), _ext(index - 1))
        elif index % NEAR_EVERY == 2 and index > 2:  # the previous image, re-encoded or with one pixel changed
            pixels = _pixels(index - 1)
            pixels[0, 0] ^= 1
            data = _encode(pixels, _ext(index), quality=85)
        else:
            data = _encode(_pixels(index), _ext(index))
        path.write_bytes(data)


def ensure_pool(pool: Path, sizes: list[int], workers: int) -> Path:
    marker = pool.with_name(pool.name + ".json")
    want = {"sizes": sorted(sizes), "version": POOL_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return pool
    marker.unlink(missing_ok=True)
    if pool.exists():
        subprocess.run(["rm", "-rf", str(pool)], check=True)
    n = max(sizes)
    start = time.perf_counter()
    chunks = [(str(pool), sorted(sizes), list(range(s, min(s + 2000, n)))) for s in range(0, n, 2000)]
    with Pool(workers) as procs:
        procs.starmap(_write_chunk, chunks)
    marker.write_text(json.dumps(want))
    print(f"made {n:,} images of {SIDE}x{SIDE} in {pool} in {time.perf_counter() - start:.0f}s", flush=True)
    return pool


# --- sampling -----------------------------------------------------------------------------------------------------


class Sampler:
    """Peak RSS of the driver, the Ray workers and Ray's services, overall and per running stage."""

    def __init__(self, out: Path, interval_s: float) -> None:
        self.out, self.interval_s = out, interval_s
        self.peaks: dict[str, dict[str, float]] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _stage(self) -> str:
        running = [s for s in STAGES if (self.out / s / "_RUNNING").exists()]
        return running[0] if running else "other"

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            driver = me.memory_info().rss
            workers, services = [], 0
            for proc in me.children(recursive=True):
                try:
                    rss = proc.memory_info().rss
                    name = " ".join(proc.cmdline()[:1]) or proc.name()
                except psutil.Error:
                    continue
                if name.startswith("ray::"):
                    workers.append(rss)
                else:
                    services += rss
            figures = {
                "driver": driver,
                "worker_max": max(workers, default=0),
                "workers_sum": sum(workers),
                "services": services,
            }
            for key in (self._stage(), "all"):
                peak = self.peaks.setdefault(key, {})
                for name, value in figures.items():
                    peak[name] = max(peak.get(name, 0), value / 2**20)
            self.samples += 1
            self._stop.wait(self.interval_s)


# --- one size, in its own process (``--worker``) ------------------------------------------------------------------


def measure(spec: Result) -> Result:
    import psutil

    from lvdkit.pipeline.config import CurateConfig
    from lvdkit.pipeline.runner import run

    out = Path(spec["out"])
    cfg = CurateConfig(out=str(out), progress=False)
    cfg.ingest.inputs = [spec["inputs"]]
    cfg.ray.num_cpus = spec["cpus"]
    baseline = psutil.Process().memory_info().rss / 2**20
    with Sampler(out, spec["interval"]) as sampler:
        start = time.perf_counter()
        summary = run(cfg, stages=STAGES, force=True)
        seconds = time.perf_counter() - start
    return {
        "n": summary["images_in"],
        "seconds": seconds,
        "stage_seconds": {s: summary["stages"][s]["seconds"] for s in STAGES},
        "duplicates": summary["duplicates_by_stage"],
        "quarantined": summary["quarantined"],
        "driver_before_mb": baseline,
        "peaks": sampler.peaks,
        "samples": sampler.samples,
    }


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = measure(spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


def ensure_tars(folder: Path, out: Path, per_shard: int) -> Path:
    """``folder``'s images as WebDataset tars of ``per_shard`` images in ``out`` (made once, then reused)."""
    from lvdkit.demo_containers import write_webdataset

    marker = out.with_name(out.name + ".json")
    want = {"source": str(folder), "per_shard": per_shard, "version": POOL_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return out
    subprocess.run(["rm", "-rf", str(out)], check=True)
    start = time.perf_counter()
    shards = write_webdataset(folder, out, per_shard)
    marker.write_text(json.dumps(want))
    print(f"packed {folder} into {len(shards)} tars in {time.perf_counter() - start:.0f}s", flush=True)
    return out


def bench_size(n: int, args: argparse.Namespace, pool: Path) -> Result | None:
    work = Path(args.out) / "ingest_memory"
    inputs = size_folder(pool, args.sizes, n)
    if args.tars:
        inputs = ensure_tars(inputs, work / "tars" / f"n{n:07d}", args.tars)
    spec = {
        "inputs": str(inputs),
        "out": str(work / f"run-{n}"),
        "cpus": args.cpus,
        "interval": args.interval,
        "result": str(work / f"ingest_memory-{n}.json"),
    }
    Path(spec["result"]).unlink(missing_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    code = run_limited(cmd, args.timeout, work / f"run-{n}.log")
    if code != 0:
        print(f"N={n:,}: {'timed out' if code is None else f'failed ({code})'}; see {work / f'run-{n}.log'}")
        return None
    result: Result = json.loads(Path(spec["result"]).read_text())
    result["tars"] = args.tars
    return result


def report(results: list[Result], cpus: int) -> None:
    print(f"\n=== ingest + dedup_exact + dedup_phash, local Ray with {cpus} CPUs: peak RSS (MB) ===")
    if results and results[0].get("tars"):
        print(f"(inputs: WebDataset tars of {results[0]['tars']} images each)")
    rows = []
    for r in results:
        p = r["peaks"]["all"]
        ingest_s = r["stage_seconds"]["ingest"]
        rows.append(
            [
                r["n"],
                r["seconds"],
                r["n"] / r["seconds"],
                r["n"] / ingest_s,
                r["driver_before_mb"],
                p["driver"],
                p["worker_max"],
                p["workers_sum"],
                p["services"],
                r["duplicates"].get("dedup_exact", 0),
                r["duplicates"].get("dedup_phash", 0),
            ]
        )
    headers = ["images", "seconds", "rows/s", "ingest rows/s", "driver start", "driver peak", "worker max"]
    headers += ["workers sum", "ray services", "exact dups", "phash dups"]
    print_table(headers, rows)
    print("\ndriver peak RSS (MB) by stage running when sampled ('other': Ray start-up, planning, summary):")
    keys = [*STAGES, "other"]
    stage_rows = [[r["n"], *[r["peaks"].get(k, {}).get("driver") for k in keys]] for r in results]
    print_table(["images", *keys], stage_rows)
    print("\nlargest Ray worker RSS (MB) by stage:")
    stage_rows = [[r["n"], *[r["peaks"].get(k, {}).get("worker_max") for k in keys]] for r in results]
    print_table(["images", *keys], stage_rows)
    print("\nstage seconds:")
    print_table(["images", *STAGES], [[r["n"], *[r["stage_seconds"][s] for s in STAGES]] for r in results])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", type=int, nargs="+", default=[50000, 100000, 200000], help="pool sizes (images)")
    p.add_argument("--out", default="out/bench", help="cache and work folder (default: out/bench)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs for Ray and for making the pool")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each size")
    p.add_argument("--tars", type=int, default=0, help="ingest WebDataset tars of this many images (0: loose files)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    args.sizes = sorted(set(args.sizes))
    print(machine_line())
    print(f"sizes={args.sizes} cpus={args.cpus} out={args.out}")
    pool = ensure_pool(Path(args.out) / "ingest_memory" / "pool", args.sizes, args.cpus)
    results = []
    for n in args.sizes:
        result = bench_size(n, args, pool)
        if result is not None:
            results.append(result)
            print(
                f"N={n:,}: {result['seconds']:.0f}s, driver peak {result['peaks']['all']['driver']:.0f} MB",
                flush=True,
            )
    if results:
        report(results, args.cpus)


if __name__ == "__main__":
    main()
