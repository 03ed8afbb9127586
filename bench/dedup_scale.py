"""Copy-detection self-dedup (``dedup_copy``) at scale: 1M synthetic 512-d descriptors with planted copies.

Runs the real :func:`lvdkit.curation.dedup_copy.dedup_copy` (default config except ``--index``/``--nprobe``/
``--whiten``) and prints the time and memory of each phase (the functions ``dedup_copy`` calls are wrapped with
timers, nothing else changes), the peak memory, and how many of the planted copies end in their source's group.

The descriptors imitate copy-detection embeddings enough that the pipeline's choices matter:

* a shared mean direction (distinct images have positive cosine, as with real descriptors);
* a few hundred clusters of unequal size and spread (images of similar content);
* anisotropic within-cluster spread (power-law spectrum in a random basis), whose top directions also carry a
  strong "nuisance" component (think colour, contrast, compression): large variance over the pool, and also what
  an edit changes most. So raw cosine confuses copies with lookalikes and PCA whitening helps (``--whiten none``
  to see it).

A planted copy replaces a row with an edit of another row: ``c * source + sqrt(1 - c^2) * u`` with ``u`` a unit
vector orthogonal to the source (70% nuisance directions, 30% isotropic) and ``c`` uniform in [0.70, 0.95], the
cosine of copy and source in raw descriptor space. Sources and copies are disjoint. The calibration copies that
``dedup_copy`` needs (synthetic edits of a sample of images) use the same edit model.

    .venv/bin/python bench/dedup_scale.py                 # 1M x 512, index auto (IVF above 200k rows)
    .venv/bin/python bench/dedup_scale.py --n 100000      # quick check (exact flat index)
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from _common import machine_line, print_table

GIB = 2**30
COS_RANGE = (0.70, 0.95)  # raw cosine of a planted (or calibration) copy to its source
NUISANCE_SHARE = 0.7  # share of an edit along the nuisance directions (the rest is isotropic)
CHUNK = 65_536  # rows generated at a time


# --- synthetic descriptors ----------------------------------------------------------------------------------------


class DescriptorModel:
    """The generative model of the synthetic descriptors (see the module docstring). Deterministic given ``rng``."""

    def __init__(
        self,
        rng: np.random.Generator,
        dim: int,
        n_clusters: int = 300,
        n_nuisance: int = 16,
        spectrum_decay: float = 0.5,
        w_mean: float = 0.5,
        w_between: float = 0.7,
        w_within: float = 1.0,
        w_nuisance: float = 1.0,
    ) -> None:
        self.dim = dim
        rot, _ = np.linalg.qr(rng.standard_normal((dim, dim)))  # a random orthonormal basis
        lam = np.arange(1, dim + 1, dtype=np.float64) ** -spectrum_decay
        lam /= lam.sum()
        self.within = (np.sqrt(lam)[:, None] * rot.T).astype(np.float32)  # [D, D]: z = g @ within
        self.nuisance = rot[:, : min(n_nuisance, dim)].T.astype(np.float32)  # [K, D] orthonormal rows
        self.mean = _unit(rng.standard_normal((1, dim)).astype(np.float32))[0]
        self.centres = (rng.standard_normal((n_clusters, dim)) / np.sqrt(dim)).astype(np.float32)
        self.weights = rng.dirichlet(np.full(n_clusters, 2.0))  # unequal cluster sizes
        self.spread = rng.uniform(0.6, 1.4, n_clusters).astype(np.float32)  # and spreads
        self.w = (w_mean, w_between, w_within, w_nuisance)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` unit descriptors [n, D] float32."""
        w_mean, w_between, w_within, w_nuisance = self.w
        label = rng.choice(len(self.weights), size=n, p=self.weights)
        x = rng.standard_normal((n, self.dim), dtype=np.float32) @ self.within
        x *= w_within * self.spread[label, None]
        x += w_between * self.centres[label]
        k = len(self.nuisance)
        x += (w_nuisance / np.sqrt(k)) * (rng.standard_normal((n, k), dtype=np.float32) @ self.nuisance)
        x += w_mean * self.mean
        return _unit(x)

    def edit(self, rng: np.random.Generator, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Copies of unit rows ``source`` [n, D]: returns the copies [n, D] and their raw cosine to the source [n]."""
        n = len(source)
        along = _unit(rng.standard_normal((n, len(self.nuisance)), dtype=np.float32) @ self.nuisance)
        iso = _unit(rng.standard_normal((n, self.dim), dtype=np.float32))
        u = NUISANCE_SHARE * along + (1.0 - NUISANCE_SHARE) * iso
        u -= np.sum(u * source, axis=1, keepdims=True) * source  # orthogonal to the source: exact cosine c
        u = _unit(u)
        c = rng.uniform(*COS_RANGE, size=n).astype(np.float32)
        return _unit(c[:, None] * source + np.sqrt(1.0 - c * c)[:, None] * u), c


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def make_data(n: int, dim: int, copy_fraction: float, n_calib: int, seed: int) -> dict[str, Any]:
    """Descriptors [n, D] with planted copies, and calibration copies of a sample of rows."""
    rng = np.random.default_rng(seed)
    model = DescriptorModel(rng, dim)
    emb = np.empty((n, dim), np.float32)
    for start in range(0, n, CHUNK):
        emb[start : start + CHUNK] = model.sample(rng, min(CHUNK, n - start))
    n_copies = min(round(n * copy_fraction), n // 2)
    rows = rng.choice(n, size=2 * n_copies, replace=False)
    copies, sources = np.sort(rows[:n_copies]), rows[n_copies:]  # disjoint: no copy of a copy
    cosine = np.empty(n_copies, np.float32)
    for start in range(0, n_copies, CHUNK):
        sl = slice(start, start + CHUNK)
        emb[copies[sl]], cosine[sl] = model.edit(rng, emb[sources[sl]])
    calib_source = np.sort(rng.choice(n, size=min(n, n_calib), replace=False))
    calib_emb, _ = model.edit(rng, emb[calib_source])
    return {
        "emb": emb,
        "copies": copies,
        "sources": sources,
        "cosine": cosine,
        "calib_source": calib_source,
        "calib_emb": calib_emb,
    }


def images_table(n: int) -> pa.Table:
    """``image_id`` (zero-padded row number), ``width`` and ``height`` (all 1: ties are broken by id)."""
    ids = np.char.zfill(np.arange(n).astype(str), len(str(max(n - 1, 0))))
    ones = pa.array(np.ones(n, np.int32))
    return pa.table({"image_id": pa.array(ids.tolist(), pa.string()), "width": ones, "height": ones})


# --- memory and per-phase timing ----------------------------------------------------------------------------------


def load() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine slows every phase."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def vm_hwm_bytes() -> int | None:
    """This process's peak RSS since start or since :func:`reset_peak` (``VmHWM``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            line = next(ln for ln in fh if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``). False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Wall time and memory of consecutive phases. A phase lasts from one :meth:`mark` to the next.

    A thread samples the RSS every ``interval_s`` for the peak of each phase (numpy and Faiss release the GIL).
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.rows: dict[str, list[float]] = {}  # label -> [seconds, cpu seconds, rss at end, peak rss]
        self.label: str | None = None
        self._t0 = self._cpu0 = 0.0
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
        self._thread.start()

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            rss = rss_bytes()
            with self._lock:
                self._peak = max(self._peak, rss)

    def mark(self, label: str | None) -> None:
        """End the current phase (if any) and start ``label`` (None: start nothing)."""
        if label is not None and label == self.label:
            return
        now, cpu, rss = time.perf_counter(), time.process_time(), rss_bytes()
        with self._lock:
            peak, self._peak = max(self._peak, rss), rss
        if self.label is not None:
            row = self.rows.setdefault(self.label, [0.0, 0.0, 0.0, 0.0])
            row[0] += now - self._t0
            row[1] += cpu - self._cpu0
            row[2] = rss
            row[3] = max(row[3], peak)
            print(
                f"  {self.label}: {now - self._t0:.1f}s (CPU {cpu - self._cpu0:.1f}s), RSS {rss / GIB:.2f} GiB "
                f"(peak {peak / GIB:.2f})",
                flush=True,
            )
        self.label, self._t0, self._cpu0 = label, now, cpu

    def stop(self) -> None:
        self.mark(None)
        self._stop.set()
        self._thread.join()


def instrument(dc: Any, phases: Phases, n: int) -> None:
    """Wrap the functions ``dedup_copy`` calls (names in module ``dc``) so each call marks its phase."""

    def timed(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            phases.mark(label)
            return fn(*args, **kwargs)

        return wrapper

    from lvdkit.core.whitening import Whitener

    class TimedWhitener(Whitener):
        def __call__(self, x: np.ndarray) -> np.ndarray:
            phases.mark("whiten (apply)" if len(x) == n else "calibration")
            return super().__call__(x)

    fit = dc.fit_whitener

    def fit_whitener(*args: Any, **kwargs: Any) -> Any:
        w = fit(*args, **kwargs)
        return TimedWhitener(mean=w.mean, matrix=w.matrix)

    dc.fit_whitener = fit_whitener
    for name, label in [
        ("build_index", "index build"),
        ("knn", "kNN search"),
        ("nearest_other", "calibration"),
        ("calibrate", "calibration"),
        ("pairs_above", "pairs above threshold"),
        ("keep_priority", "grouping + output"),
        ("group", "grouping + output"),
        ("star_groups", "grouping + output"),
        ("representatives", "grouping + output"),
        ("connected_components", "grouping + output"),
        ("component_sizes", "grouping + output"),
        ("groups_table", "grouping + output"),
    ]:
        if callable(getattr(dc, name, None)):  # the names dedup_copy imports vary between versions
            setattr(dc, name, timed(getattr(dc, name), label))


# --- evaluation ---------------------------------------------------------------------------------------------------


def evaluate(out: pa.Table, copies: np.ndarray, sources: np.ndarray, cosine: np.ndarray) -> dict[str, Any]:
    """Recall: planted (copy, source) pairs that share a group. Precision: removed images whose planted partner is
    in their group (so the removal is one of a planted pair)."""
    n = out.num_rows
    group = pc.cast(out["group_id"], pa.int64()).to_numpy()  # ids are row numbers
    keep = out["keep"].to_numpy(zero_copy_only=False)
    partner = np.full(n, -1, np.int64)
    partner[copies], partner[sources] = sources, copies
    same = group[copies] == group[sources]
    removed = ~keep
    explained = removed & (partner >= 0) & (group[np.maximum(partner, 0)] == group)
    edges = np.linspace(*COS_RANGE, 6)
    by_cos = []
    for lo, hi in itertools.pairwise(edges):
        sel = (cosine >= lo) & ((cosine < hi) if hi < edges[-1] else (cosine <= hi))
        by_cos.append((f"[{lo:.2f}, {hi:.2f})", int(sel.sum()), float(same[sel].mean()) if sel.any() else None))
    return {
        "planted": len(copies),
        "found": int(same.sum()),
        "recall": float(same.mean()) if len(same) else float("nan"),
        "removed": int(removed.sum()),
        "removed_explained": int(explained.sum()),
        "precision": float(explained.sum() / removed.sum()) if removed.any() else float("nan"),
        "by_cosine": by_cos,
    }


# --- main ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="descriptors (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=512, help="descriptor dimension (default 512)")
    parser.add_argument(
        "--copy-fraction",
        type=float,
        default=0.01,
        help="fraction of rows replaced by a copy of another row (default 0.01)",
    )
    parser.add_argument("--calib", type=int, default=1000, help="calibration copies (default 1000)")
    parser.add_argument(
        "--index",
        choices=("auto", "flat", "ivf", "ivfpq"),
        default="auto",
        help="DedupCopyConfig.index (default auto: flat up to 50k rows, IVF above)",
    )
    parser.add_argument("--nprobe", type=int, default=None, help="DedupCopyConfig.nprobe (default: the config's)")
    parser.add_argument(
        "--whiten",
        choices=("none", "center", "pca"),
        default=None,
        help="DedupCopyConfig.whiten (default: the config's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data and dedup seed (default 0)")
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        default=24.0,
        help="exit with status 1 when the process's peak RSS exceeds this (default 24)",
    )
    args = parser.parse_args(argv)

    import faiss

    import lvdkit.curation.dedup_copy as dc
    from lvdkit.core.knn import gpu_available

    overrides: dict[str, Any] = {"index": args.index, "seed": args.seed}
    if args.nprobe is not None:
        overrides["nprobe"] = args.nprobe
    if args.whiten is not None:
        overrides["whiten"] = args.whiten
    cfg = dc.DedupCopyConfig(**overrides)

    print(machine_line())
    print(f"load average: {load()}")
    print(
        f"faiss {faiss.__version__}  omp_threads={faiss.omp_get_max_threads()}  gpu={gpu_available()}  "
        f"numpy {np.__version__}"
    )
    print(f"config: {asdict(cfg)}")
    print(flush=True)

    t_start = time.perf_counter()
    data = make_data(args.n, args.dim, args.copy_fraction, args.calib, args.seed)
    images = images_table(args.n)
    t_data = time.perf_counter() - t_start
    emb = data["emb"]
    desc_bytes = emb.nbytes
    rss_before = rss_bytes()
    print(
        f"generated {args.n:,} x {args.dim} descriptors ({desc_bytes / GIB:.2f} GiB), "
        f"{len(data['copies']):,} planted copies, {len(data['calib_source']):,} calibration copies "
        f"in {t_data:.1f}s; RSS {rss_before / GIB:.2f} GiB",
        flush=True,
    )

    peak_reset = reset_peak()
    phases = Phases()
    instrument(dc, phases, args.n)
    phases.mark("whiten (fit)")
    t0, c0 = time.perf_counter(), time.process_time()
    out, stats, _ = dc.dedup_copy(images, emb, data["calib_source"], data["calib_emb"], cfg)
    total, cpu_total = time.perf_counter() - t0, time.process_time() - c0
    phases.stop()
    hwm = vm_hwm_bytes() if peak_reset else None
    peak_process = ru_maxrss_bytes()
    peak_dedup = hwm if hwm is not None else max(r[3] for r in phases.rows.values())

    ev = evaluate(out, data["copies"], data["sources"], data["cosine"])

    print("\nphases of dedup_copy (RSS of the whole process, descriptors included)")
    print_table(
        ["phase", "seconds", "CPU s", "RSS after GiB", "peak RSS GiB"],
        [[label, s, c, rss / GIB, peak / GIB] for label, (s, c, rss, peak) in phases.rows.items()]
        + [["total", total, cpu_total, rss_bytes() / GIB, peak_dedup / GIB]],
    )
    print(f"load average now: {load()} (CPU s / seconds below {os.cpu_count()} means the cores were shared or idle)")

    print("\ncalibration:", stats.get("calibration"))
    print("stats:", {k: v for k, v in stats.items() if k != "calibration"})
    print("\nrecall of the planted copies by raw cosine to the source")
    print_table(["cosine", "copies", "recall"], ev["by_cosine"])
    print(
        f"\nplanted {ev['planted']:,}, found {ev['found']:,}; removed {ev['removed']:,}, "
        f"of which {ev['removed_explained']:,} are one of a planted pair"
    )

    cal = stats.get("calibration") or {}
    within = peak_process <= args.memory_budget_gib * GIB
    print("\nresult")
    print_table(
        [
            "N",
            "dim",
            "index",
            "nprobe",
            "whiten",
            "data s",
            "dedup s",
            "peak RSS GiB",
            "dedup peak GiB",
            "descriptors GiB",
            "peak / descr",
            "recall",
            "precision",
            "threshold",
            "est. precision",
            "est. recall",
        ],
        [
            [
                f"{args.n:,}",
                args.dim,
                stats.get("index", cfg.index),
                cfg.nprobe,
                cfg.whiten,
                t_data,
                total,
                peak_process / GIB,
                peak_dedup / GIB,
                desc_bytes / GIB,
                f"{peak_process / desc_bytes:.1f}x",
                f"{ev['recall']:.4f}",
                f"{ev['precision']:.4f}",
                f"{stats.get('threshold', float('nan')):.4f}",
                f"{cal.get('precision', float('nan')):.4f}",
                f"{cal.get('recall', float('nan')):.4f}",
            ]
        ],
        left=0,
    )
    print(
        f"\npeak RSS of the process (ru_maxrss, data generation included): {peak_process / GIB:.2f} GiB; "
        f"during dedup_copy: {peak_dedup / GIB:.2f} GiB ({'VmHWM' if hwm is not None else 'sampled'}; "
        f"{(peak_dedup - rss_before) / GIB:+.2f} GiB over the {rss_before / GIB:.2f} GiB held before it); "
        f"budget {args.memory_budget_gib:.0f} GiB: {'OK' if within else 'EXCEEDED'}"
    )
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
