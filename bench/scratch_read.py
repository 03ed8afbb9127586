"""A solve task's read: one key range out of many scatter tables, through pyarrow.dataset vs table by table.

A partitioned stage's solve task reads its partitions' rows out of every scatter table (one per input part, so
their number grows with the pool). This writes scatter-like tables (sorted by cell, packed 1 KiB descriptors, zstd,
row groups of about a solve's share of each table) at two table counts holding the same rows in all, reads the same
200k rows out of them both ways, each read in a fresh process, and prints the process's peak resident set over what
it held before the read, the seconds, and the ratio of ``lvdkit.core.scratch_read.read_range`` to the dataset
filter (how the solves read before).

Usage: python bench/scratch_read.py [--tables 20,200] [--rows 3000000] [--read 200000] [--work /tmp/lvdk-read]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from _common import machine_line, print_table
from lvdkit.core.packed import pack
from lvdkit.core.scratch_read import read_range

CELLS = 2_400


def write_tables(folder: Path, tables: int, rows: int, dims: int, row_group: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for t in range(tables):
        cell = np.sort(rng.integers(0, CELLS, rows)).astype(np.int32)
        x = rng.standard_normal((rows, dims)).astype(np.float32)
        table = pa.table({"cell": cell, "key": np.arange(rows, dtype=np.int64) + t * rows, "x": pack(x)})
        paths.append(folder / f"{t:05d}.parquet")
        pq.write_table(table, paths[-1], row_group_size=row_group, compression="zstd")
    return paths


def read_once(paths: list[Path], start: int, stop: int, how: str) -> tuple[int, int, float]:
    """In a fresh process: (rows read, peak RSS growth in bytes, seconds)."""
    before = _peak_rss()
    t0 = time.perf_counter()
    if how == "dataset":
        data = pads.dataset([str(p) for p in paths], format="parquet")
        rows = data.to_table(filter=(pc.field("cell") >= start) & (pc.field("cell") < stop))
    else:
        rows = read_range(list(paths), "cell", start, stop)
    secs = time.perf_counter() - t0
    return rows.num_rows, _peak_rss() - before, secs


def _peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM: unlike ru_maxrss, not inherited from a forking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _fresh(paths: list[Path], start: int, stop: int, how: str) -> tuple[int, int, float]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(read_once, paths, start, stop, how).result()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default="20,200", help="table counts, comma-separated")
    ap.add_argument("--rows", type=int, default=3_000_000, help="rows in all the tables together")
    ap.add_argument("--read", type=int, default=200_000, help="rows the range holds (a solve group of 8 x 25k)")
    ap.add_argument("--dims", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lvdk-read"))
    args = ap.parse_args(argv)
    print(machine_line(), flush=True)
    rows_out = []
    for tables in [int(s) for s in args.tables.split(",")]:
        per_table = args.rows // tables
        row_group = max(1, args.read // tables)  # a solve's share of each table, as scratch_row_group_rows sizes it
        folder = args.work / f"t{tables}"
        paths = write_tables(folder, tables, per_table, args.dims, row_group)
        start = CELLS // 3
        stop = start + max(1, round(CELLS * args.read / args.rows))
        got = {how: _fresh(paths, start, stop, how) for how in ("dataset", "by table")}
        assert got["dataset"][0] == got["by table"][0]
        mib = {how: v[1] / 2**20 for how, v in got.items()}
        rows_out.append(
            [
                tables,
                f"{got['dataset'][0]:,}",
                f"{mib['dataset']:,.0f}",
                f"{mib['by table']:,.0f}",
                f"{mib['by table'] / mib['dataset']:.2f}x",
                f"{got['dataset'][2]:.2f}",
                f"{got['by table'][2]:.2f}",
            ]
        )
        shutil.rmtree(folder, ignore_errors=True)
    print_table(
        ["tables", "rows read", "dataset peak MiB", "by table peak MiB", "ratio", "dataset s", "by table s"], rows_out
    )


if __name__ == "__main__":
    main()
