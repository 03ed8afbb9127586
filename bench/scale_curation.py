"""Curation at scale on the partitioned path: memory per task and in the driver, recall, time per million rows.

For each pool size, synthetic copy-detection descriptors (``bench/dedup_scale.py``'s model: clusters, a shared mean,
anisotropic spread, edits that move along "nuisance" directions; 1% planted copies of other rows, and synthetic
calibration copies as the embed stage makes them) are written as a finished ``embed`` stage in a fresh OUT, part by
part (a subprocess, so the driver below never held them). Then, on a local Ray:

- ``dedup_copy`` runs partitioned (cells, one exact k-NN task per partition of ``--partition-rows``), calibrating
  its threshold as a user's run does;
- ``cluster`` runs partitioned (level 1 fitted per partition of ``--cluster-partition-rows``, ``k1 = N / 500``);
- sample-based retrieval's partitioned k-NN (``retrieve``'s scatter and merge: each seed's k nearest per embed part,
  merged) for 1,000 seeds near pool images, as Ray tasks (the stage itself ingests seed *images*, which synthetic
  descriptors do not have);
- ``curated``'s plan (the work list: selections merged per cluster part, joined per embed part) on the balanced
  sample (``N / 10``) and the retrieved images, written as a finished ``retrieve``;
- the planted copies are checked against an exact k-NN over the whole pool (whitened as the stage whitened it, same
  threshold, k = 64): recall = planted pairs the partitioned run grouped / planted pairs exact k-NN finds;
- where the pool fits (``--single-max``), ``dedup_copy``'s single task runs on the same OUT, side by side.

Peak memory: the largest resident set of any Ray worker process of this bench's own Ray (each task's process; a
reused worker keeps what earlier tasks left, so this is an upper bound per task), the task it was running, and of
this driver process, sampled every 0.2 s; beside the driver's, in brackets, its own share: the resident set less
shared pages (the libraries' files and the pages of Ray's object store it has read, which the store owns). Run one
size per process (``--sizes 4000000``) for a driver figure that
holds nothing from an earlier size.

Usage: python bench/scale_curation.py [--sizes 1000000,4000000,10000000] [--work /tmp/lvdk-scale] [--keep]
       [--part-rows 50000] [--set dedup_copy.KEY=VALUE ...] [--only-copy | --skip-copy] [--skip-single]

``--skip-copy`` measures cluster, sample retrieval and curated's plan alone (a 10M pool in minutes rather than an
hour): the pool is written with a finished ``dedup_copy`` that removed nothing, so cluster sees every row (1% more
than after a real dedup_copy).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _common import RayPeaks, machine_line, print_table
from dedup_scale import DescriptorModel
from lvdkit.core import schema
from lvdkit.core.io import part_name, write_json_atomic

KEY = "copy"
STAGES_BEFORE = ("ingest", "dedup_exact", "dedup_phash", "embed")


# --- the synthetic pool, written as a finished embed stage ----------------------------------------------------------


def generate(
    out: Path, n: int, dim: int, part_rows: int, copy_fraction: float, calib: int, seed: int, copy_done: bool = False
) -> None:
    """Write OUT with ingest..embed finished: embed parts, calibration copies, the work list; truth.parquet. With
    ``copy_done``, also a finished partitioned ``dedup_copy`` that removed nothing (for ``--skip-copy``)."""
    rng = np.random.default_rng(seed)
    model = DescriptorModel(rng, dim)
    n_parts = math.ceil(n / part_rows)
    calib_per_part = max(1, math.ceil(calib / n_parts))
    writer = None
    sources, copies = [], []
    for p in range(n_parts):
        prng = np.random.default_rng([seed, p])
        rows = min(part_rows, n - p * part_rows)
        x = model.sample(prng, rows)
        n_copies = int(rows * copy_fraction)
        pick = prng.choice(rows, size=2 * n_copies, replace=False)
        x[pick[:n_copies]], _ = model.edit(prng, x[pick[n_copies:]])
        ids = np.array([f"{p:06d}{r:08d}" for r in range(rows)], dtype=object)
        copies.extend(ids[pick[:n_copies]])
        sources.extend(ids[pick[n_copies:]])
        order = np.argsort(ids)  # embed parts are sorted by image id
        _write(out / "embed" / part_name(p), ids[order], x[order])
        cal = np.sort(prng.choice(rows, size=min(rows, calib_per_part), replace=False))
        cx, _ = model.edit(prng, x[cal])
        _write(out / "embed" / schema.CALIBRATION / part_name(p), ids[cal], cx, edit="synthetic")
        listing = pa.table(
            {
                schema.IMAGE_ID: pa.array(ids, pa.string()),
                schema.URI: pa.array([f"/synthetic/{i}.jpg" for i in ids], pa.string()),
                schema.CONTENT_HASH: pa.array([f"{int(i):032x}" for i in ids], pa.string()),
                schema.WIDTH: pa.array(np.full(rows, 256, np.int32)),
                schema.HEIGHT: pa.array(np.full(rows, 256, np.int32)),
                schema.FORMAT: pa.array(["JPEG"] * rows, pa.string()),
                schema.METADATA: pa.nulls(rows, pa.string()),
                schema.PART: pa.array(np.full(rows, p, np.int64)),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(out / "embed" / schema.LISTING, listing.schema)
        writer.write_table(listing, row_group_size=part_rows)
        ingest = {f.name: pa.nulls(rows, f.type) for f in schema.INGEST}  # what the single task reads
        ingest.update({c: listing[c] for c in listing.column_names if c != schema.PART})
        ingest[schema.STATUS_COL] = pa.array([schema.STATUS_OK] * rows, pa.string())
        (out / "ingest").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(ingest, schema=schema.INGEST), out / "ingest" / part_name(p))
        kept = pa.table(
            {
                schema.IMAGE_ID: listing[schema.IMAGE_ID],
                schema.GROUP_ID: listing[schema.IMAGE_ID],
                schema.KEEP: pa.array(np.ones(rows, bool)),
                schema.DUP_OF: pa.nulls(rows, pa.string()),
                schema.DISTANCE: pa.array(np.zeros(rows, np.float32)),
            },
            schema=schema.DEDUP,
        )
        for stage in ("dedup_exact", "dedup_phash", *(["dedup_copy"] if copy_done else [])):  # nothing removed
            (out / stage).mkdir(parents=True, exist_ok=True)
            pq.write_table(kept, out / stage / part_name(p))
    assert writer is not None
    writer.close()
    pq.write_table(pa.table({"copy": copies, "source": sources}), out / "truth.parquet")
    for stage in STAGES_BEFORE:
        record = {"stage": stage, "rows": n, "config_hash": "synthetic", "fingerprint": f"n={n}", "stats": {}}
        write_json_atomic(out / stage / "_SUCCESS", record)
    write_json_atomic(out / "dedup_relative" / "_SUCCESS", {**record, "stage": "dedup_relative"})
    if copy_done:  # aligned with embed's parts, as the partitioned stage writes them
        copy_record = {**record, "stage": "dedup_copy", "stats": {"path": "partitioned"}}
        write_json_atomic(out / "dedup_copy" / "_SUCCESS", copy_record)


def _write(path: Path, ids: np.ndarray, x: np.ndarray, edit: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: dict[str, Any] = {schema.IMAGE_ID: pa.array(ids, pa.string())}
    if edit is not None:
        cols[schema.EDIT] = pa.array([edit] * len(ids), pa.string())
    cols[schema.embedding_column(KEY)] = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    pq.write_table(pa.table(cols), path)


# --- memory of the driver and of every Ray worker -------------------------------------------------------------------


def run_stage(out: Path, stage: str, overrides: list[str]) -> tuple[float, RayPeaks, dict[str, Any]]:
    from lvdkit.core.ray_env import LazyRay
    from lvdkit.core.settings import load_config
    from lvdkit.pipeline.config import CurateConfig
    from lvdkit.pipeline.runner import run_stage as lvdkit_run_stage

    cfg = load_config(CurateConfig, None, [f"out={out}", "progress=false", f"embed.models={{{KEY}: sscd}}", *overrides])
    start = time.perf_counter()
    with RayPeaks() as peaks:
        record = lvdkit_run_stage(stage, cfg, LazyRay(out, None, None, None), force=True)
    return time.perf_counter() - start, peaks, record


# --- recall against exact k-NN ---------------------------------------------------------------------------------


def exact_recall(out: Path, k: int, max_queries: int) -> dict[str, Any]:
    """Planted pairs that exact k-NN finds above the stage's threshold (whitened as the stage whitened), and of
    those, the ones the stage grouped. Runs in a subprocess; the pool is searched in chunks (bounded memory).
    At most ``max_queries`` planted copies (a fixed random subset) are checked: exact k-NN of every planted copy
    against 10M rows would take hours on 2 cores, and 10,000 queries already bound the estimate's standard error
    near 0.001 at a recall of 0.99."""
    from lvdkit.core.io import part_files
    from lvdkit.core.partitions import merge_top, top_against
    from lvdkit.core.whitening import Whitener

    stage = out / "dedup_copy"
    whitener = Whitener.load(str(stage / schema.WHITENING_FILE))
    threshold = json.loads((stage / schema.THRESHOLD_FILE).read_text())["threshold"]
    truth = pq.read_table(out / "truth.parquet").to_pydict()
    col = schema.embedding_column(KEY)
    wanted = set(truth["copy"])
    if len(wanted) > max_queries:
        wanted = set(np.random.default_rng(7).choice(np.array(sorted(wanted), dtype=object), max_queries, False))
    queries, query_ids = [], []
    for part in part_files(out / "embed"):
        t = pq.read_table(part)
        keep = np.isin(t[schema.IMAGE_ID].to_numpy(zero_copy_only=False), list(wanted))
        t = t.filter(pa.array(keep))
        dims = t.schema.field(col).type.list_size  # a part may hold none of the queries
        queries.append(whitener(t[col].combine_chunks().flatten().to_numpy().reshape(t.num_rows, dims)))
        query_ids.extend(t[schema.IMAGE_ID].to_pylist())
    q = np.concatenate(queries)
    best: tuple[np.ndarray, np.ndarray] | None = None
    ids: list[str] = []
    for part in part_files(out / "embed"):
        t = pq.read_table(part)
        x = whitener(t[col].combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1))
        keys = np.arange(len(ids), len(ids) + len(x), dtype=np.int64)
        ids.extend(t[schema.IMAGE_ID].to_pylist())
        top = top_against(q, x, keys, k + 1)
        best = top if best is None else merge_top(best, top)
    assert best is not None
    source_of = dict(zip(truth["copy"], truth["source"], strict=True))
    id_arr = np.asarray(ids, dtype=object)
    found_exact = [
        c for r, c in enumerate(query_ids) if source_of[c] in set(id_arr[best[1][r][best[0][r] > threshold]])
    ]
    dedup = pa.concat_tables([pq.read_table(p) for p in part_files(stage)]).to_pydict()
    group = dict(zip(dedup[schema.IMAGE_ID], dedup[schema.GROUP_ID], strict=True))
    grouped = [c for c in found_exact if group[c] == group[source_of[c]]]
    return {"planted": len(query_ids), "exact": len(found_exact), "grouped": len(grouped), "threshold": threshold}


def recall(out: Path, k: int, max_queries: int) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(pool.submit(exact_recall, out, k, max_queries).result())


# --- sample retrieval's partitioned k-NN, as Ray tasks ---------------------------------------------------------------


def sample_retrieval(out: Path, n_seeds: int, k: int) -> tuple[float, RayPeaks, list[str]]:
    import ray

    from lvdkit.core.io import part_files
    from lvdkit.core.partitions import merge_top, top_against

    col = schema.embedding_column(KEY)
    first = pq.read_table(part_files(out / "embed")[0])
    rng = np.random.default_rng(1)
    x0 = first[col].combine_chunks().flatten().to_numpy().reshape(first.num_rows, -1)
    seeds = x0[rng.choice(len(x0), size=min(n_seeds, len(x0)), replace=False)]
    seeds = seeds + 0.05 * rng.standard_normal(seeds.shape).astype(np.float32)
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)

    @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
    def nearest(path: str, part: int, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = pq.read_table(path, columns=[col])
        x = t[col].combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
        return top_against(seeds, x, (np.int64(part) << 32) + np.arange(len(x), dtype=np.int64), k)

    start = time.perf_counter()
    with RayPeaks() as peaks:
        seeds_ref = ray.put(seeds)
        refs = [nearest.remote(str(p), i, seeds_ref) for i, p in enumerate(part_files(out / "embed"))]
        best = None
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            top = ray.get(done[0])
            best = top if best is None else merge_top(best, top)
    assert best is not None
    found = np.unique(best[1][best[1] >= 0])
    return time.perf_counter() - start, peaks, [f"{i >> 32:06d}{i & 0xFFFFFFFF:08d}" for i in found.tolist()]


# --- curated's plan ----------------------------------------------------------------------------------------------


def curated_plan(out: Path, retrieved: list[str]) -> tuple[float, RayPeaks, dict[str, Any]]:
    """``curated``'s work list on the finished cluster (its balanced sample) and ``retrieved`` (written as a finished
    ``retrieve``): the partitioned plan alone (the stage then reads image bytes, which a synthetic pool has not)."""
    from lvdkit.core.settings import load_config
    from lvdkit.curation.curated_plan import CuratedPlan
    from lvdkit.pipeline.config import CurateConfig
    from lvdkit.pipeline.partitioned import run_work
    from lvdkit.pipeline.stages import STAGES, declared_sides

    n = len(retrieved)
    hits = pa.table(
        {
            schema.IMAGE_ID: pa.array(retrieved, pa.string()),
            schema.SEED_SET: pa.array(["bench"] * n, pa.string()),
            schema.SEED_ID: pa.nulls(n, pa.string()),
            schema.SCORE: pa.array(np.ones(n, np.float32)),
            schema.METHOD: pa.array([schema.METHOD_SAMPLE] * n, pa.string()),
        },
        schema=schema.RETRIEVED,
    )
    (out / "retrieve").mkdir(parents=True, exist_ok=True)
    pq.write_table(hits, out / "retrieve" / part_name(0))
    write_json_atomic(out / "retrieve" / "_SUCCESS", {"stage": "retrieve", "rows": n, "stats": {}})
    cfg = load_config(CurateConfig, None, [f"out={out}", "progress=false", f"curated.embedding={KEY}"])
    shutil.rmtree(out / "curated", ignore_errors=True)
    inputs = STAGES["curated"].inputs(out, declared_sides())
    start = time.perf_counter()
    with RayPeaks() as peaks:
        work = CuratedPlan.create(cfg.curated, inputs, whole_pool=False)
        _, stats, _ = run_work("curated", (), work, out / "curated" / schema.LISTING, cfg, False)
    listed = {"listed": sum(stats["listing_rows"]), "listing_files": len(stats["listing_rows"])}
    return time.perf_counter() - start, peaks, {"stats": listed}


# --- the bench -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,4000000,10000000", help="pool sizes, comma-separated")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--part-rows", type=int, default=50_000, help="rows per embed part")
    ap.add_argument("--partition-rows", type=int, default=25_000, help="dedup_copy rows per partition task")
    ap.add_argument("--cell-copies", type=int, default=3, help="dedup_copy cells per descriptor")
    ap.add_argument("--cell-rows", type=int, default=12_500, help="dedup_copy rows per k-means cell")
    ap.add_argument("--cluster-partition-rows", type=int, default=250_000, help="cluster images per partition task")
    ap.add_argument("--single-max", type=int, default=1_000_000, help="run the single task up to this size")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lvdk-scale"))
    ap.add_argument("--keep", action="store_true", help="keep each size's OUT (about 2.2 GB per million rows)")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--recall-queries", type=int, default=10_000, help="planted copies checked against exact k-NN")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more config for the stages, e.g. dedup_copy.solve_tasks_min=1",
    )
    ap.add_argument("--only-copy", action="store_true", help="dedup_copy only, both paths (to compare settings)")
    ap.add_argument(
        "--skip-copy",
        action="store_true",
        help="cluster and sample retrieval only, on a pool written with a dedup_copy that removed nothing",
    )
    args = ap.parse_args(argv)

    _fresh_ray(args.num_cpus)
    print(machine_line(), flush=True)
    copy_cfg = [
        "dedup_copy.path=partitioned",
        f"dedup_copy.partition_rows={args.partition_rows}",
        f"dedup_copy.cell_rows={args.cell_rows}",
        f"dedup_copy.cell_copies={args.cell_copies}",
        *[kv for kv in args.set if kv.startswith("dedup_copy.")],
    ]
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        out = args.work / f"n{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(generate, out, n, args.dim, args.part_rows, 0.01, 1000, 0, args.skip_copy).result()
        print(f"n={n:,}: pool written in {time.perf_counter() - t0:.0f}s", flush=True)
        if not args.skip_copy:
            secs, peaks, record = run_stage(out, "dedup_copy", copy_cfg)
            print(steps_text(record), peaks_text(peaks), sep="\n", flush=True)
            rec = recall(out, 64, args.recall_queries)
            rows.append(_row(n, "dedup_copy partitioned", secs, peaks, record, rec))
            _print(rows[-1:])
        k1 = max(2, n // 500)
        levels = [k1, max(2, k1 // 10), max(2, k1 // 100)]
        cluster_cfg = [
            "cluster.path=partitioned",
            f"cluster.embedding={KEY}",
            f"cluster.hierarchy.levels={levels}",
            f"cluster.partition_rows={args.cluster_partition_rows}",
            f"cluster.target_size={n // 10}",
            *[kv for kv in args.set if kv.startswith("cluster.")],
        ]
        if not args.only_copy:
            secs, peaks, record = run_stage(out, "cluster", cluster_cfg)
            print(steps_text(record), peaks_text(peaks), sep="\n", flush=True)
            fitted = record.get("stats", {}).get("levels") or levels  # what was fitted (--set may change levels)
            label = f"cluster partitioned (k1={fitted[0]:,}, levels {'/'.join(f'{k:,}' for k in fitted)})"
            rows.append(_row(n, label, secs, peaks, record, None))
            _print(rows[-1:])
            secs, peaks, found = sample_retrieval(out, 1000, 4)
            found_stats = {"stats": {"found": len(found)}}
            rows.append(_row(n, "sample retrieval k-NN (1000 seeds, k=4)", secs, peaks, found_stats, None))
            _fresh_ray(args.num_cpus)  # workers of its own: a reused worker's peak holds what cluster left in it
            secs, peaks, record = curated_plan(out, found)
            listed = record["stats"]
            print(f"  curated plan: {listed['listed']:,} rows in {listed['listing_files']} listing files", flush=True)
            print(peaks_text(peaks), flush=True)
            rows.append(_row(n, "curated plan (balanced sample + retrieved)", secs, peaks, record, None))
            _print(rows[-1:])
        if n <= args.single_max and not args.skip_single and not args.skip_copy:
            secs_single, peaks_single, record = run_stage(out, "dedup_copy", ["dedup_copy.path=single"])
            rec_single = recall(out, 64, args.recall_queries)
            rows.append(_row(n, "dedup_copy single task", secs_single, peaks_single, record, rec_single))
            partitioned = next(r for r in rows if r[0] == f"{n:,}" and r[1] == "dedup_copy partitioned")
            rows[-1].append(f"{secs_single / partitioned[2]:.2f}x time")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        _print(rows)
    return 0


def _fresh_ray(num_cpus: int | None) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.shutdown()
    # its own Ray: without address="local", ray.init joins a cluster another process started on this machine
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")


def steps_text(record: dict[str, Any]) -> str:
    """Where a partitioned stage's time went (``_SUCCESS``'s ``steps``): per step, tasks, the driver's wall seconds,
    the tasks' summed seconds and the phases the work timed in them."""
    lines = [f"  {record['stage']} steps (wall s / summed task s, phases):"]
    for step, row in record.get("stats", {}).get("steps", {}).items():
        phases = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in row.items() if k not in ("tasks", "wall_s", "task_s"))
        lines.append(
            f"    {step:<8} {int(row['tasks']):>5} tasks  {row['wall_s']:>8.1f} / {row['task_s']:>8.1f}"
            + (f"  ({phases})" if phases else "")
        )
    return "\n".join(lines)


def peaks_text(peaks: RayPeaks) -> str:
    """Every task's worker peak, largest first (the table shows only the largest)."""
    ranked = sorted(peaks.by_task.items(), key=lambda kv: -kv[1])
    own = peaks.by_task_own
    return "  worker peak MiB by task (own: less shared pages): " + ", ".join(
        f"{name} {rss / 2**20:,.0f} ({own.get(name, 0) / 2**20:,.0f})" for name, rss in ranked
    )


def _row(n: int, what: str, secs: float, peaks: RayPeaks, record: dict[str, Any], rec: dict[str, Any] | None) -> list:
    recall_text = ""
    if rec is not None:
        recall_text = (
            f"{rec['grouped'] / max(1, rec['exact']):.4f} ({rec['grouped']}/{rec['exact']} of {rec['planted']})"
        )
    return [
        f"{n:,}",
        what,
        round(secs, 1),
        round(secs / (n / 1e6), 1),
        round(peaks.worker / 2**20),
        f"{peaks.driver / 2**20:,.0f} ({peaks.driver_own / 2**20:,.0f})",
        recall_text,
        peaks.largest_task(),
    ]


def _print(rows: list[list]) -> None:
    headers = [
        "rows",
        "step",
        "wall s",
        "s per M rows",
        "largest task MiB",
        "driver MiB (own)",
        "planted-copy recall",
        "largest task",
        "vs",
    ]
    print_table(headers, [r + [""] * (len(headers) - len(r)) for r in rows])
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
