"""lvdkit's PHash dedup against imagededup's ``PHash().find_duplicates``, side by side on the same images.

For each pool size N (synthetic variations of the demo images, see ``_common.ensure_pool``) this times, each in a
fresh subprocess (so peak memory is per measurement):

* end to end, files in -> duplicates out: lvdkit's ``run(stages=("ingest", "dedup_exact", "dedup_phash"))`` on Ray
  (it fully decodes, content-hashes and PHashes every file, then dedups) against imagededup's
  ``find_duplicates(image_dir=...)`` (PHash encoding in a process pool, then its brute-force search);
* the search alone on precomputed hashes: lvdkit's ``dedup_phash`` (Faiss multi-index hashing + grouping) against
  ``find_duplicates(encoding_map=...)``, at max_distance 0 (lvdkit's default) and 10 (imagededup's default);
* imagededup's ``encode_images`` alone, next to lvdkit's ingest stage.

The pairs each tool finds are compared exactly (as sets of image pairs) at both distances. imagededup's search is
quadratic, so each of its runs has a time limit (``--imagededup-timeout``, which also bounds lvdkit's search-only
runs: its multi-index hashing degrades at large distances); a run that exceeds it is reported as a timeout and the
runs that would certainly take longer are skipped, so the benchmark always completes.

    .venv/bin/python bench/dedup_phash.py --sizes 5000 20000 100000
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    PeakMemory,
    ensure_pool,
    folder_mb,
    machine_line,
    pool_files,
    print_table,
    run_limited,
    stopwatch,
)

LVDKIT_D = 0  # lvdkit's default dedup_phash.max_distance
IMAGEDEDUP_D = 10  # imagededup's default max_distance_threshold
DISTANCES = (LVDKIT_D, IMAGEDEDUP_D)
STAGES = ("ingest", "dedup_exact", "dedup_phash")
RETRY_AFTER_S = 20

Result = dict[str, Any]


# --- measurements, each run in its own process (``--worker``) ------------------------------------------------------


def work_lvdkit_run(spec: Result) -> Result:
    """lvdkit end to end on Ray: ingest (decode + hashes) -> dedup_exact -> dedup_phash."""
    from lvdkit.pipeline.config import CurateConfig
    from lvdkit.pipeline.runner import run

    cfg = CurateConfig(out=spec["out"], progress=False)
    cfg.ingest.inputs = [spec["pool"]]
    cfg.ray.num_cpus = spec["cpus"]
    cfg.dedup_phash.max_distance = spec["d"]
    with PeakMemory() as mem, stopwatch() as t:
        summary = run(cfg, stages=STAGES, force=True)
    stages = {s: summary["stages"][s]["seconds"] for s in STAGES}
    return {
        "seconds": t[0],
        "peak_mb": mem.peak_mb,
        "stage_seconds": stages,
        "images_in": summary["images_in"],
        "phash_stats": summary["stages"]["dedup_phash"]["stats"],
    }


def work_lvdkit_search(spec: Result) -> Result:
    """lvdkit's ``dedup_phash`` (pair search + grouping) on the PHashes of every usable image of the ingest table."""
    import pyarrow.compute as pc

    from lvdkit.core import schema
    from lvdkit.core.io import read_parts
    from lvdkit.curation.dedup_phash import DedupPhashConfig, dedup_phash, hamming_pairs

    table = read_parts(
        Path(spec["out"]) / "ingest", columns=[schema.IMAGE_ID, schema.URI, "phash", "width", "height", "status"]
    )
    images = table.filter(pc.equal(table["status"], schema.STATUS_OK))
    cfg = DedupPhashConfig(max_distance=spec["d"])
    with PeakMemory() as mem, stopwatch() as t:
        _, stats = dedup_phash(images, cfg)
    hashes = images["phash"].to_numpy(zero_copy_only=False).astype(np.uint64)
    pairs = _equal_hash_pairs(hashes) if spec["d"] == 0 else hamming_pairs(hashes, spec["d"])[0]
    rel = [os.path.relpath(u, spec["pool"]).replace(os.sep, "/") for u in images[schema.URI].to_pylist()]
    names = _index(spec["pool"])
    idx = np.array([names[r] for r in rel], dtype=np.int64)
    return {
        "seconds": t[0],
        "peak_mb": mem.peak_mb,
        "images": images.num_rows,
        "stats_pairs": stats["pairs"],
        **_pair_digest(idx[pairs] if len(pairs) else np.empty((0, 2), np.int64), len(names)),
    }


def work_lvdkit_ingest_1p(spec: Result) -> Result:
    """lvdkit's per-file ingest work (read, blake2b, full decode, PHash) on a sample, in one process, without Ray."""
    from lvdkit.curation.ingest import IngestConfig, ingest_files, phash64

    uris = _sample(spec)
    phash64(np.full((64, 64, 3), 128, np.uint8))  # import imagededup (and torch) before the clock starts
    with PeakMemory() as mem, stopwatch() as t:
        table = ingest_files(uris, IngestConfig())
    return {"seconds": t[0], "peak_mb": mem.peak_mb, "images": table.num_rows}


def work_imagededup_encode_1p(spec: Result) -> Result:
    """imagededup's ``encode_image`` on each file of the same sample, in one process."""
    from imagededup.methods import PHash

    uris = _sample(spec)
    phash = PHash(verbose=False)
    with PeakMemory() as mem, stopwatch() as t:
        hashes = [phash.encode_image(image_file=u) for u in uris]
    return {"seconds": t[0], "peak_mb": mem.peak_mb, "images": len(hashes)}


def _sample(spec: Result) -> list[str]:
    return [os.path.join(spec["pool"], name) for name in pool_files(Path(spec["pool"]))[: spec["sample"]]]


def work_imagededup_encode(spec: Result) -> Result:
    """imagededup's ``encode_images`` on the pool (its process pool); the encodings are saved for the searches."""
    from imagededup.methods import PHash

    with PeakMemory() as mem, stopwatch() as t:
        enc = PHash(verbose=False).encode_images(image_dir=spec["pool"], recursive=True, num_enc_workers=spec["cpus"])
    Path(spec["enc"]).write_text(json.dumps(enc))
    return {"seconds": t[0], "peak_mb": mem.peak_mb, "images": len(enc)}


def work_imagededup_search(spec: Result) -> Result:
    """imagededup's ``find_duplicates(encoding_map=...)``: its brute-force search alone."""
    from imagededup.methods import PHash

    enc = json.loads(Path(spec["enc"]).read_text())
    phash = PHash(verbose=False)
    with PeakMemory() as mem, stopwatch() as t:
        dups = phash.find_duplicates(
            encoding_map=enc, max_distance_threshold=spec["d"], scores=False, num_dist_workers=spec["cpus"]
        )
    return {"seconds": t[0], "peak_mb": mem.peak_mb, "images": len(enc), **_dups_digest(dups, spec["pool"])}


def work_imagededup_run(spec: Result) -> Result:
    """imagededup end to end: ``find_duplicates(image_dir=...)`` encodes the folder, then searches."""
    from imagededup.methods import PHash

    phash = PHash(verbose=False)
    with PeakMemory() as mem, stopwatch() as t:
        dups = phash.find_duplicates(
            image_dir=spec["pool"],
            max_distance_threshold=spec["d"],
            scores=False,
            recursive=True,
            num_enc_workers=spec["cpus"],
            num_dist_workers=spec["cpus"],
        )
    return {"seconds": t[0], "peak_mb": mem.peak_mb, "images": len(dups), **_dups_digest(dups, spec["pool"])}


WORKERS = {
    "lvdkit-run": work_lvdkit_run,
    "lvdkit-search": work_lvdkit_search,
    "lvdkit-ingest-1p": work_lvdkit_ingest_1p,
    "imagededup-encode-1p": work_imagededup_encode_1p,
    "imagededup-encode": work_imagededup_encode,
    "imagededup-search": work_imagededup_search,
    "imagededup-run": work_imagededup_run,
}


def _index(pool: str) -> dict[str, int]:
    return {name: i for i, name in enumerate(pool_files(Path(pool)))}


def _equal_hash_pairs(hashes: np.ndarray) -> np.ndarray:
    """Every pair i < j of equal hashes ([P, 2]); ``hamming_pairs`` at distance 0 only returns a spanning star."""
    order = np.argsort(hashes, kind="stable")
    starts = np.flatnonzero(np.concatenate([[True], hashes[order][1:] != hashes[order][:-1], [True]]))
    out = [np.empty((0, 2), np.int64)]
    for lo, hi in itertools.pairwise(starts.tolist()):
        if hi - lo > 1:
            a, b = np.triu_indices(hi - lo, 1)
            out.append(np.stack([order[lo + a], order[lo + b]], axis=1))
    return np.concatenate(out).astype(np.int64)


def _dups_digest(dups: dict[str, list[str]], pool: str) -> Result:
    names = _index(pool)
    pairs = [(names[k], names[v]) for k, vs in dups.items() for v in vs]
    return _pair_digest(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), len(names))


def _pair_digest(pairs: np.ndarray, n: int) -> Result:
    """Number of distinct unordered pairs and a digest of the set, to compare two tools' answers exactly."""
    keys = np.unique(pairs.min(axis=1) * n + pairs.max(axis=1)) if len(pairs) else np.empty(0, np.int64)
    return {"pairs": len(keys), "digest": hashlib.blake2b(keys.astype("<i8").tobytes(), digest_size=8).hexdigest()}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = WORKERS[spec["kind"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))


# --- the benchmark driver -----------------------------------------------------------------------------------------


class Runner:
    """Runs measurements for one pool size in subprocesses and keeps their results (or why there is none)."""

    def __init__(self, pool: Path, work: Path, cpus: int, timeout_s: float) -> None:
        self.pool, self.work, self.cpus, self.timeout_s = pool, work, cpus, timeout_s
        self.results: dict[str, Result] = {}

    def measure(self, key: str, kind: str, limited: bool, **args: Any) -> Result:
        result_file = self.work / f"{key}.json"
        result_file.unlink(missing_ok=True)
        spec = {"kind": kind, "result": str(result_file), "pool": str(self.pool), "cpus": self.cpus, **args}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        print(f"  {key} ...", end=" ", flush=True)
        rc = run_limited(cmd, self.timeout_s if limited else None, self.work / f"{key}.log")
        if rc not in (0, None):  # a crash (not a timeout): retry once, e.g. after a transient import error
            print(f"failed rc={rc}, retrying ...", end=" ", flush=True)
            time.sleep(RETRY_AFTER_S)
            rc = run_limited(cmd, self.timeout_s if limited else None, self.work / f"{key}.log")
        if rc is None:
            res: Result = {"status": f"timeout >{self.timeout_s:.0f}s"}
        elif rc != 0 or not result_file.exists():
            res = {"status": f"failed rc={rc}", "log": str(self.work / f"{key}.log")}
        else:
            res = json.loads(result_file.read_text())
        print(
            res.get("status", "") + (f" (see {res['log']})" if "log" in res else "") or f"{res['seconds']:.1f}s",
            flush=True,
        )
        self.results[key] = res
        return res

    def skip(self, key: str, why: str) -> None:
        print(f"  {key} ... {why}", flush=True)
        self.results[key] = {"status": why}


def ok(res: Result) -> bool:
    return "seconds" in res


def bench_size(n: int, args: argparse.Namespace) -> dict[str, Result]:
    out = Path(args.out)
    pool = ensure_pool(out / "demo-data", out / f"pool-{n}", n, seed=args.seed, workers=args.cpus).resolve()
    work = (out / f"run-{n}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    r = Runner(pool, work, args.cpus, args.imagededup_timeout)
    print(f"\nN={n:,}: measuring (logs in {work}) ...", flush=True)
    r.measure("lvdkit-run-d0", "lvdkit-run", False, out=str(work / "lvdkit"), d=LVDKIT_D)
    for d in DISTANCES:
        r.measure(f"lvdkit-search-d{d}", "lvdkit-search", True, out=str(work / "lvdkit"), d=d)
    sample = min(n, args.sample)
    r.measure("lvdkit-ingest-1p", "lvdkit-ingest-1p", False, sample=sample)
    r.measure("imagededup-encode-1p", "imagededup-encode-1p", True, sample=sample)
    enc = str(work / "imagededup-encodings.json")
    if ok(r.measure("imagededup-encode", "imagededup-encode", True, enc=enc)):
        first = r.measure(f"imagededup-search-d{LVDKIT_D}", "imagededup-search", True, enc=enc, d=LVDKIT_D)
        if ok(first):
            r.measure(f"imagededup-search-d{IMAGEDEDUP_D}", "imagededup-search", True, enc=enc, d=IMAGEDEDUP_D)
        else:
            r.skip(f"imagededup-search-d{IMAGEDEDUP_D}", f"skipped: D={LVDKIT_D} search {first['status']}")
    else:
        for d in DISTANCES:
            r.skip(f"imagededup-search-d{d}", f"skipped: encode {r.results['imagededup-encode']['status']}")
    for d in DISTANCES:
        search = r.results[f"imagededup-search-d{d}"]
        if ok(search):
            r.measure(f"imagededup-run-d{d}", "imagededup-run", True, d=d)
        else:
            why = search["status"]
            r.skip(f"imagededup-run-d{d}", why if why.startswith("skipped") else f"skipped: search {why}")
    report(n, pool, r.results, args.cpus, args.imagededup_timeout)
    (out / f"dedup_phash-{n}.json").write_text(json.dumps(r.results, indent=2))
    return r.results


def report(n: int, pool: Path, res: dict[str, Result], cpus: int, timeout_s: float) -> None:
    run = res["lvdkit-run-d0"]
    print(f"\n=== N = {n:,} images: {pool} ({folder_mb(pool):.0f} MB of JPEGs, 64-128 px) ===")
    rows = [
        _row("lvdkit", f"run {'+'.join(STAGES)} (Ray, {cpus} CPUs)", LVDKIT_D, run, n, None),
        _row("imagededup", "find_duplicates(image_dir) [D=lvdkit default]", LVDKIT_D, res["imagededup-run-d0"], n, run),
        _row(
            "imagededup",
            "find_duplicates(image_dir) [its default D]",
            IMAGEDEDUP_D,
            res[f"imagededup-run-d{IMAGEDEDUP_D}"],
            n,
            run,
        ),
    ]
    ingest = {"seconds": run["stage_seconds"]["ingest"]} if ok(run) else run
    rows += [
        _row("lvdkit", "ingest stage alone (decode+hashes)", None, ingest, n, None),
        _row("imagededup", "encode_images (PHash only)", None, res["imagededup-encode"], n, ingest),
    ]
    one = res["lvdkit-ingest-1p"]
    k = one.get("images", 0) or 1
    rows += [
        _row("lvdkit", f"ingest_files, 1 process, no Ray ({k:,} images)", None, one, k, None),
        _row("imagededup", f"encode_image loop, 1 process ({k:,} images)", None, res["imagededup-encode-1p"], k, one),
    ]
    for d in DISTANCES:
        mine = res[f"lvdkit-search-d{d}"]
        rows += [
            _row("lvdkit", "dedup_phash on hashes (search+grouping)", d, mine, n, None),
            _row("imagededup", "find_duplicates(encoding_map) (search)", d, res[f"imagededup-search-d{d}"], n, mine),
        ]
    print_table(["tool", "what", "D", "seconds", "images/s", "ratio", "peak MB", "pairs"], rows, left=2)
    if ok(run):
        st = run["stage_seconds"]
        print(
            "lvdkit stage seconds (summary.json): "
            + ", ".join(f"{s} {v:.1f}" for s, v in st.items())
            + f"; run() wall incl. Ray start-up {run['seconds']:.1f}"
        )
    print(
        "ratio = imagededup seconds / lvdkit seconds of the lvdkit row above it (>1: lvdkit is faster); "
        f"peak MB = peak PSS of the process tree; a timeout is >{timeout_s:.0f}s"
    )
    for d in DISTANCES:
        print(_agreement(d, res))


def _row(tool: str, what: str, d: int | None, res: Result, n: int, base: Result | None) -> list[object]:
    """One table row; ``base`` is the lvdkit result this one is compared with (None: this is the baseline)."""
    if not ok(res):
        return [tool, what, d, res.get("status", "?"), None, None, None, None]
    ratio = 1.0 if base is None else (res["seconds"] / base["seconds"] if ok(base) and base["seconds"] else None)
    return [tool, what, d, res["seconds"], n / res["seconds"], ratio, res.get("peak_mb"), res.get("pairs")]


def _agreement(d: int, res: dict[str, Result]) -> str:
    mine = res[f"lvdkit-search-d{d}"]
    theirs = next((res[k] for k in (f"imagededup-search-d{d}", f"imagededup-run-d{d}") if ok(res[k])), None)
    if not ok(mine) or theirs is None:
        return f"pairs at D={d}: lvdkit {mine.get('pairs', '-')}, imagededup not available: agreement n/a"
    same = mine["pairs"] == theirs["pairs"] and mine["digest"] == theirs["digest"]
    return (
        f"pairs at D={d}: lvdkit {mine['pairs']:,}, imagededup {theirs['pairs']:,}; "
        f"same pairs: {'yes' if same else 'NO'}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 100000], help="pool sizes (images)")
    p.add_argument("--out", default="out/bench", help="cache and work folder (default: out/bench)")
    p.add_argument(
        "--imagededup-timeout",
        type=float,
        default=900.0,
        help="seconds allowed to each imagededup run, and to each lvdkit search alone, before it is "
        "reported as a timeout (default 900)",
    )
    p.add_argument("--cpus", type=int, default=2, help="CPUs for Ray, imagededup's workers and pool making")
    p.add_argument("--sample", type=int, default=2000, help="images timed one by one in a single process")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo and the synthetic variations")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    print(machine_line())
    print(f"sizes={args.sizes} cpus={args.cpus} imagededup timeout={args.imagededup_timeout:.0f}s out={args.out}")
    for n in args.sizes:
        bench_size(n, args)


if __name__ == "__main__":
    main()
