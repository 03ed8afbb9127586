"""Small helpers shared by the benchmarks: the machine, synthetic image pools, timing, memory, tables, subprocesses.

Image pools are built from the demo dataset (:func:`lvdkit.demo.make_demo`): its usable ``raw/`` images, re-encoded
as plain RGB JPEGs, plus deterministic synthetic variations of them (crop, brightness, flip, resize, JPEG quality)
to reach the requested size. Pools are cached next to a small JSON marker and reused when it matches.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

POOL_VERSION = 1  # bump when the way pools are made changes: cached pools are then rebuilt
POOL_MAX_SIDE = 128
POOL_MIN_SIDE = 64
FILES_PER_FOLDER = 1000
USABLE_KINDS = ("original", "exact_dup", "near_dup")


# --- the machine --------------------------------------------------------------------------------------------------


def machine_line() -> str:
    """CPU count, CPU model and memory of this machine, one line."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"nproc={os.cpu_count()}  cpu={model!r}  mem={mem_gb:.0f} GiB  python={platform.python_version()}"


# --- image pools --------------------------------------------------------------------------------------------------


def ensure_demo(demo_dir: Path, seed: int = 0) -> Path:
    """The demo dataset at ``demo_dir``, made (once) with ``make_demo(seed=seed)``."""
    if not (demo_dir / "truth.parquet").exists():
        from lvdkit.demo import make_demo

        print(f"making the demo dataset in {demo_dir} (once) ...", flush=True)
        make_demo(demo_dir, seed=seed, progress=False, overwrite=True)
    return demo_dir


def usable_demo_images(demo_dir: Path) -> list[Path]:
    """The demo's ``raw/`` images that are real images (originals and planted copies), in path order."""
    import pyarrow.parquet as pq

    truth = pq.read_table(demo_dir / "truth.parquet", columns=["path", "kind"]).to_pylist()
    paths = sorted(r["path"] for r in truth if r["kind"] in USABLE_KINDS and r["path"].startswith("raw/"))
    return [demo_dir / p for p in paths]


def pool_name(index: int) -> str:
    """Relative path of image ``index`` of a pool (``d000/img_000000.jpg``): 1000 files per folder."""
    return f"d{index // FILES_PER_FOLDER:03d}/img_{index:06d}.jpg"


def pool_files(pool: Path) -> list[str]:
    """Relative ('/'-separated) paths of a pool's images, sorted: the common index for comparing results."""
    return sorted(p.relative_to(pool).as_posix() for p in pool.rglob("*.jpg"))


def ensure_pool(demo_dir: Path, pool: Path, n: int, seed: int = 0, workers: int = 2) -> Path:
    """A folder of ``n`` small JPEGs: demo images first, then synthetic variations of them (cached)."""
    marker = pool.with_name(pool.name + ".json")
    want = {"n": n, "seed": seed, "version": POOL_VERSION, "demo": str(demo_dir.resolve())}
    if marker.exists() and json.loads(marker.read_text()) == want and len(pool_files(pool)) == n:
        return pool
    marker.unlink(missing_ok=True)
    shutil.rmtree(pool, ignore_errors=True)
    sources = usable_demo_images(ensure_demo(demo_dir, seed))
    n_base = min(n, len(sources))
    for folder in sorted({pool_name(i).split("/")[0] for i in range(n)}):
        (pool / folder).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with Pool(workers) as procs:
        procs.starmap(_write_bases, [(pool, [(i, str(sources[i])) for i in ch]) for ch in _chunks(range(n_base))])
        jobs = [(pool, list(ch), n_base, seed) for ch in _chunks(range(n_base, n))]
        procs.starmap(_write_variations, jobs)
    marker.write_text(json.dumps(want))
    print(
        f"made {pool} ({n_base} demo images + {n - n_base} variations) in {time.perf_counter() - start:.0f}s",
        flush=True,
    )
    return pool


def _chunks(items: range, size: int = 500) -> Iterator[range]:
    for start in range(items.start, items.stop, size):
        yield range(start, min(start + size, items.stop))


def _small_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB no larger than POOL_MAX_SIDE (16-bit gray rescaled, alpha on white)."""
    from lvdkit.core.image import to_rgb

    image = to_rgb(ImageOps.exif_transpose(image) or image)
    image.thumbnail((POOL_MAX_SIDE, POOL_MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def _write_bases(pool: Path, items: Sequence[tuple[int, str]]) -> None:
    for index, src in items:
        with Image.open(src) as im:
            im.seek(0)
            _small_rgb(im).save(pool / pool_name(index), "JPEG", quality=90)


def _write_variations(pool: Path, indices: Sequence[int], n_base: int, seed: int) -> None:
    for index in indices:
        rng = np.random.default_rng([seed, index])
        with Image.open(pool / pool_name(int(rng.integers(n_base)))) as im:
            out = _vary(im.convert("RGB"), rng)
        out.save(pool / pool_name(index), "JPEG", quality=int(rng.integers(70, 96)))


def _vary(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (70-100% per side), brightness (x0.75-1.25), maybe a flip, and a resize to 64-128 px."""
    w, h = image.size
    cw, ch = max(8, int(w * rng.uniform(0.7, 1.0))), max(8, int(h * rng.uniform(0.7, 1.0)))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = image.crop((left, top, left + cw, top + ch))
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.75, 1.25)))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = int(rng.integers(POOL_MIN_SIDE, POOL_MAX_SIDE + 1))
    scale = side / max(cw, ch)
    return out.resize((max(16, round(cw * scale)), max(16, round(ch * scale))), Image.Resampling.BILINEAR)


def folder_mb(folder: Path) -> float:
    """Total size of the files under ``folder``, MB."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


# --- timing and memory --------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of this process and all its descendants: PSS summed over the tree, sampled in a thread.

    PSS (proportional set size) splits shared pages between the processes that map them, so forked workers and
    shared libraries are not counted twice. Falls back to this process's ``ru_maxrss`` without psutil.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        if self.peak_bytes:
            return self.peak_bytes / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def _loop(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_full_info().pss
                except (psutil.Error, AttributeError):
                    continue
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval_s)


class RayPeaks:
    """Peak RSS of this (driver) process and of the largest Ray worker process, per task name too, and the most
    worker processes seen at once running a task whose name contains ``counting`` (Ray titles a busy worker
    ``ray::<task name>``), sampled in a thread. Only this process's own Ray is counted (the workers descend from the
    raylet it started), so another Ray on the machine (a test suite, another bench) does not leak into the figures.
    A reused worker keeps what earlier tasks left, so the worker peak bounds a task's from above.
    """

    def __init__(self, counting: str | None = None, interval_s: float = 0.2) -> None:
        import psutil

        self.psutil, self.me, self.interval_s, self.counting = psutil, psutil.Process(), interval_s, counting
        self.driver = self.worker = self.most_at_once = 0
        self.driver_own = 0  # the driver's resident set less shared pages (libraries, Ray's object store it read)
        self.by_task: dict[str, int] = {}  # task name -> largest RSS of a worker seen running it
        self.by_task_own: dict[str, int] = {}  # the same less shared pages (libraries, object-store pages it read)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RayPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def largest_task(self) -> str:
        """The task name whose worker peaked highest, with its peak in MiB."""
        if not self.by_task:
            return ""
        name = max(self.by_task, key=self.by_task.__getitem__)
        return f"{name} {self.by_task[name] / 2**20:,.0f}"

    def _loop(self) -> None:
        while not self._stop.is_set():
            mem = self.me.memory_info()
            self.driver = max(self.driver, mem.rss)
            self.driver_own = max(self.driver_own, mem.rss - getattr(mem, "shared", 0))
            busy = 0
            for proc in self._own_workers():
                try:
                    title = (proc.cmdline() or [""])[0]
                    if not title.startswith("ray::"):
                        continue
                    mem = proc.memory_info()
                    rss, own = mem.rss, mem.rss - getattr(mem, "shared", 0)
                    self.worker = max(self.worker, rss)
                    name = title.removeprefix("ray::").split()[0] if len(title) > 5 else "idle"
                    self.by_task[name] = max(self.by_task.get(name, 0), rss)
                    self.by_task_own[name] = max(self.by_task_own.get(name, 0), own)
                    busy += bool(self.counting and self.counting in title)
                except (self.psutil.Error, IndexError):
                    continue
            self.most_at_once = max(self.most_at_once, busy)
            self._stop.wait(self.interval_s)

    def _own_workers(self) -> list:
        try:
            return self.me.children(recursive=True)
        except self.psutil.Error:
            return []


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` is the elapsed wall-clock seconds."""
    elapsed = [0.0]
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.perf_counter() - start


# --- subprocesses with a time limit -------------------------------------------------------------------------------


def run_limited(cmd: Sequence[str], timeout_s: float | None, log: Path) -> int | None:
    """Run ``cmd`` (output appended to ``log``); kill its whole process group after ``timeout_s``.

    Returns the exit code, or None when it ran out of time.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


# --- tables -------------------------------------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> None:
    """A plain text table: the first ``left`` columns left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        parts = [c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(row)]
        print("  ".join(parts).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
