"""How a partitioned stage's scratch descriptors are stored: Parquet list column vs fixed-size binary.

``dedup_copy`` and ``cluster`` write every whitened descriptor to scratch tables (``dedup_copy`` three times, once per
cell) and read them back per partition. This writes and reads one scatter table's worth of descriptors both ways
(zstd, as scratch tables are written; row groups as a 4M-row pool's scatter tables get) and prints the seconds and
the ratio of each to the list column, which is how the scratch was stored before ``lvdkit.core.packed``.

Usage: python bench/scratch_encoding.py [--rows 150000] [--dims 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from _common import machine_line, print_table
from lvdkit.core.packed import pack, unpack


def _as_list(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])


def _from_list(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    return arr.flatten().to_numpy().reshape(len(arr), -1)


def _time(x: np.ndarray, path: Path, packed: bool, row_group: int) -> tuple[float, float]:
    start = time.perf_counter()
    table = pa.table({"x": pack(x) if packed else _as_list(x)})
    pq.write_table(table, path, row_group_size=row_group, compression="zstd")
    wrote = time.perf_counter() - start
    start = time.perf_counter()
    col = pq.read_table(path)["x"]
    back = unpack(col) if packed else _from_list(col)
    read = time.perf_counter() - start
    assert np.array_equal(back, x)  # the same floats either way
    return wrote, read


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=150_000, help="rows of one scatter table (50k-row part x 3 cells)")
    ap.add_argument("--dims", type=int, default=256)
    ap.add_argument("--row-group", type=int, default=2_500, help="rows per row group")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each; the best is printed")
    args = ap.parse_args(argv)
    print(machine_line(), flush=True)
    x = np.random.default_rng(0).standard_normal((args.rows, args.dims)).astype(np.float32)
    best: dict[bool, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for packed in (False, True):
                got = _time(x, Path(tmp) / f"{packed}.parquet", packed, args.row_group)
                old = best.get(packed, (float("inf"), float("inf")))
                best[packed] = (min(old[0], got[0]), min(old[1], got[1]))
    base = best[False]
    rows = [
        [name, f"{w:.2f}", f"{w / base[0]:.2f}", f"{r:.2f}", f"{r / base[1]:.2f}"]
        for name, (w, r) in (("list<float32> column", best[False]), ("fixed-size binary (packed)", best[True]))
    ]
    print(f"\n{args.rows:,} x {args.dims} float32, zstd, row groups of {args.row_group:,}, best of {args.repeats}")
    print_table(["scratch column", "write s", "vs list", "read s", "vs list"], rows)


if __name__ == "__main__":
    main()
