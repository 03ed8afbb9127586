"""Faiss k-means at scale, and hierarchical k-means + balanced sampling against flat k-means on a skewed mixture.

Part 1, time: :func:`lvdkit.cluster.kmeans` on ``--n`` x ``--dim`` float32 unit rows (a mixture of 2,000 random
directions with noise) into ``--k`` clusters with ``--iters`` Lloyd iterations (default 3 on CPU, 20 on GPU),
split into k-means++ seeding, Faiss training, and the chunked assignment of every row. With ``--budget-s``, a
pilot at ``--pilot-n`` rows first predicts the full run (every phase but seeding is linear in N at fixed k); when
the prediction exceeds the budget, the run is made at the largest N that fits and the requested size is printed as
an extrapolation, labelled as such.

Part 2, balance (Vo et al. 2024): ``--mix-n`` points drawn from ``--dense-modes`` dense modes holding
``--dense-share`` of the points and ``--sparse-modes`` sparse ones (equal shares inside each group, random unit
centres, noise of norm ~0.5: modes well apart), then samples of ``--target`` points from

* a uniform random sample (no clustering),
* flat k-means (the level-1 k of the hierarchy) + balanced sampling over its clusters,
* hierarchical k-means without resampling + balanced sampling,
* hierarchical k-means with the paper's resampling (default config) + balanced sampling,

each scored on the true modes of the sampled points: entropy (nats; ln(#modes) is perfectly balanced), the dense
modes' share, the smallest and largest mode counts and their ratio, and the modes covered.

    .venv/bin/python bench/kmeans.py --n 100000 --k 1000     # quick
    .venv/bin/python bench/kmeans.py                         # 1M x 384, k = 10,000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakMemory, machine_line, print_table, stopwatch
from lvdkit.cluster import (
    HierarchicalConfig,
    assign_to_centroids,
    balanced_sample,
    default_levels,
    hierarchical_kmeans,
    kmeans,
    kmeans_pp_seeds,
)
from lvdkit.cluster.kmeans import SEED_POINTS_PER_CENTROID
from lvdkit.core.knn import gpu_available, l2_normalize

CHUNK = 65_536  # rows generated at a time (bounded float64 temporaries)
ASSIGN_PROBE = 100_000  # rows the assignment is timed on, then scaled to N (it is linear in N)


# --- data ---------------------------------------------------------------------------------------------------------


def mixture(n: int, dim: int, weights: np.ndarray, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n unit rows [n, dim] float32 around len(weights) random unit centres (noise of norm ~``noise``), labels [n]."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((len(weights), dim), dtype=np.float32))
    labels = rng.choice(len(weights), size=n, p=weights / weights.sum())
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, CHUNK):
        lab = labels[start : start + CHUNK]
        eps = rng.standard_normal((len(lab), dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
        x[start : start + CHUNK] = l2_normalize(centres[lab] + eps)
    return x, labels


# --- part 1: time -------------------------------------------------------------------------------------------------


def time_kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> dict[str, float]:
    """Seconds of each phase of ``kmeans(x, k)`` and its peak memory (MB)."""
    n = len(x)
    with PeakMemory() as mem:
        with stopwatch() as t_seed:
            seeds = kmeans_pp_seeds(x, k, seed=seed)
        with stopwatch() as t_fit:
            centroids, _, _ = kmeans(x, k, n_iter=iters, seed=seed, init_centroids=seeds)
        probe = x[: min(n, ASSIGN_PROBE)]
        with stopwatch() as t_probe:
            assign_to_centroids(probe, centroids)
    assign_s = t_probe[0] * n / len(probe)
    return {
        "n": n,
        "seed_s": t_seed[0],
        "fit_s": t_fit[0],
        "assign_s": assign_s,
        "train_s": max(0.0, t_fit[0] - assign_s),
        "total_s": t_seed[0] + t_fit[0],
        "peak_mb": mem.peak_mb,
    }


def predict_seeding(run: dict[str, float], n: int, k: int) -> float:
    """Seeding seconds at n rows from a run: it scales with its sample, min(N, max(16 k, 10,000)) rows."""

    def rows(total: float) -> float:
        return min(total, max(SEED_POINTS_PER_CENTROID * k, 10_000))

    return run["seed_s"] * rows(n) / rows(run["n"])


def predict(run: dict[str, float], n: int, k: int) -> float:
    """Total seconds at n rows from a run at fewer rows: training and assignment are linear in N at fixed k."""
    return predict_seeding(run, n, k) + run["fit_s"] * n / run["n"]


def part_time(args: argparse.Namespace, iters: int) -> None:
    print(f"\n## k-means time: {args.n:,} x {args.dim} float32, k = {args.k:,}, {iters} iterations", flush=True)
    weights = np.random.default_rng(args.seed).pareto(2.0, 2000) + 0.1
    runs: list[tuple[str, dict[str, float]]] = []
    n_run = args.n
    if args.budget_s and args.pilot_n < args.n:
        pilot_n = max(args.pilot_n, args.k)
        x, _ = mixture(pilot_n, args.dim, weights, noise=0.8, seed=args.seed)
        pilot = time_kmeans(x, args.k, iters, args.seed)
        del x
        runs.append(("pilot (measured)", pilot))
        full = predict(pilot, args.n, args.k)
        print(
            f"pilot at {pilot_n:,} rows: {pilot['total_s']:.1f} s -> predicted {full:.0f} s at {args.n:,} rows "
            f"(budget {args.budget_s:.0f} s)",
            flush=True,
        )
        if full > args.budget_s:
            # the largest N whose predicted time fits (linear in N), in whole 10k rows
            per_row = pilot["fit_s"] / pilot["n"]
            spare = args.budget_s - predict_seeding(pilot, args.n, args.k)
            n_run = int(max(pilot_n, spare / per_row) // 10_000 * 10_000)
            n_run = min(n_run, args.n)
            print(f"{args.n:,} rows do not fit the budget: running {n_run:,} rows instead", flush=True)
    if n_run > (runs[0][1]["n"] if runs else 0):
        t0 = time.perf_counter()
        x, _ = mixture(n_run, args.dim, weights, noise=0.8, seed=args.seed)
        print(f"generated {n_run:,} x {args.dim} in {time.perf_counter() - t0:.1f} s", flush=True)
        runs.append(("measured", time_kmeans(x, args.k, iters, args.seed)))
        del x
    rows = []
    for label, r in runs:
        rows.append(
            [
                label,
                int(r["n"]),
                r["seed_s"],
                r["train_s"],
                r["assign_s"],
                r["total_s"],
                r["train_s"] / max(1, iters),
                r["peak_mb"],
            ]
        )
    if runs[-1][1]["n"] < args.n:
        base = runs[-1][1]
        scale = args.n / base["n"]
        seed_full = predict_seeding(base, args.n, args.k)
        rows.append(
            [
                "EXTRAPOLATED (not run)",
                args.n,
                seed_full,
                base["train_s"] * scale,
                base["assign_s"] * scale,
                seed_full + base["fit_s"] * scale,
                base["train_s"] * scale / max(1, iters),
                None,
            ]
        )
    print_table(["run", "N", "seeding s", "train s", "assign s", "total s", "s / iteration", "peak MB"], rows)
    print(
        "train = Faiss Lloyd iterations; assign = every row to its nearest centroid (timed on "
        f"{ASSIGN_PROBE:,} rows, scaled to N); seeding = k-means++ on a sample of min(N, 16 k) rows"
    )


# --- part 2: balance ----------------------------------------------------------------------------------------------


def part_balance(args: argparse.Namespace) -> None:
    n_modes = args.dense_modes + args.sparse_modes
    weights = np.r_[
        np.full(args.dense_modes, args.dense_share / args.dense_modes),
        np.full(args.sparse_modes, (1 - args.dense_share) / args.sparse_modes),
    ]
    x, labels = mixture(args.mix_n, args.dim, weights, noise=0.5, seed=args.seed + 1)
    levels = default_levels(args.mix_n)
    print(
        f"\n## balance: {args.mix_n:,} x {args.dim} points, {args.dense_modes} dense modes holding "
        f"{args.dense_share:.0%} + {args.sparse_modes} sparse modes; samples of {args.target:,}; "
        f"{args.mix_iters} k-means iterations; hierarchy {levels}",
        flush=True,
    )
    true_counts = np.bincount(labels, minlength=n_modes)
    print(
        f"data: dense modes {true_counts[: args.dense_modes].mean():,.0f} points each, sparse modes "
        f"{true_counts[args.dense_modes :].mean():,.0f} each"
    )

    rows = []

    def score(name: str, idx: np.ndarray, seconds: float) -> None:
        counts = np.bincount(labels[idx], minlength=n_modes)
        p = counts / counts.sum()
        nz = p[p > 0]
        entropy = float(-(nz * np.log(nz)).sum())
        lo, hi = int(counts.min()), int(counts.max())
        rows.append(
            [
                name,
                len(idx),
                entropy,
                entropy / np.log(n_modes),
                counts[: args.dense_modes].sum() / len(idx),
                lo,
                hi,
                hi / lo if lo else None,
                int((counts > 0).sum()),
                seconds,
            ]
        )
        print(f"  done: {name} ({seconds:.0f} s)", flush=True)

    score("uniform random sample", np.random.default_rng(args.seed).choice(args.mix_n, args.target, replace=False), 0)
    configs = [
        (f"flat k-means (k={levels[0]:,}) + balanced", HierarchicalConfig(levels=levels[:1], n_resampling_steps=[0])),
        (
            "hierarchical, no resampling + balanced",
            HierarchicalConfig(levels=levels, n_resampling_steps=[0] * len(levels)),
        ),
        ("hierarchical + resampling (paper) + balanced", HierarchicalConfig(levels=levels)),
    ]
    for name, cfg in configs:
        cfg.n_iter, cfg.seed = args.mix_iters, args.seed
        with stopwatch() as t:
            result = hierarchical_kmeans(x, cfg)
            idx = balanced_sample(result, args.target, seed=args.seed)
        score(name, idx, t[0])
    print_table(
        [
            "sample",
            "size",
            "entropy",
            "/ ln modes",
            "dense share",
            "min mode",
            "max mode",
            "max/min",
            "modes hit",
            "cluster s",
        ],
        rows,
    )
    print(
        f"perfect balance: entropy ln {n_modes} = {np.log(n_modes):.2f}, {args.target // n_modes} per mode, "
        f"dense share {args.dense_modes / n_modes:.1%}; max/min '-' = some mode got no point"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="rows to cluster in part 1 (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=384, help="dimension (default 384)")
    parser.add_argument("--k", type=int, default=10_000, help="clusters in part 1 (default 10,000)")
    parser.add_argument("--iters", type=int, default=None, help="Lloyd iterations in part 1 (default 3 CPU, 20 GPU)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=600.0,
        help="part 1 time budget: predict from a pilot, shrink N if needed (0: run as asked)",
    )
    parser.add_argument("--pilot-n", type=int, default=100_000, help="pilot rows for the prediction (default 100k)")
    parser.add_argument("--mix-n", type=int, default=100_000, help="points of the skewed mixture (default 100k)")
    parser.add_argument("--dense-modes", type=int, default=10, help="dense modes (default 10)")
    parser.add_argument("--dense-share", type=float, default=0.8, help="share of points in dense modes (0.8)")
    parser.add_argument("--sparse-modes", type=int, default=190, help="sparse modes (default 190)")
    parser.add_argument("--target", type=int, default=10_000, help="sample size in part 2 (default 10,000)")
    parser.add_argument("--mix-iters", type=int, default=10, help="k-means iterations in part 2 (default 10)")
    parser.add_argument("--skip-time", action="store_true", help="only part 2")
    parser.add_argument("--skip-balance", action="store_true", help="only part 1")
    parser.add_argument("--seed", type=int, default=0, help="data and k-means seed (default 0)")
    args = parser.parse_args(argv)

    import faiss

    gpu = gpu_available()
    iters = args.iters if args.iters is not None else (20 if gpu else 3)
    print(machine_line())
    print(f"faiss {faiss.__version__}, {'GPU' if gpu else 'CPU'}, {faiss.omp_get_max_threads()} OpenMP threads")
    if not args.skip_time:
        part_time(args, iters)
    if not args.skip_balance:
        part_balance(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
