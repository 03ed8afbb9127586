"""Scratch vectors packed as fixed-size binary come back exactly, whatever Arrow did to the column in between."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lvdkit.core.packed import pack, unpack


def _x(n: int, d: int) -> np.ndarray:
    return np.random.default_rng(n * 31 + d).standard_normal((n, d)).astype(np.float32)


def test_a_parquet_round_trip_gives_the_same_floats(tmp_path: Path) -> None:
    x = _x(1000, 7)
    pq.write_table(pa.table({"x": pack(x)}), tmp_path / "t.parquet", row_group_size=64)
    back = pq.read_table(tmp_path / "t.parquet")["x"]
    assert back.num_chunks > 1 or len(back) == 1000
    np.testing.assert_array_equal(unpack(back), x)


def test_slices_takes_sorts_and_filters_keep_the_rows_they_picked() -> None:
    x = _x(50, 4)
    table = pa.table({"cell": np.arange(50)[::-1], "x": pack(x)})
    np.testing.assert_array_equal(unpack(table["x"].slice(10, 5)), x[10:15])  # a slice starts at an offset
    np.testing.assert_array_equal(unpack(table.sort_by("cell")["x"]), x[::-1])
    np.testing.assert_array_equal(unpack(table.take(pa.array([3, 0, 3]))["x"]), x[[3, 0, 3]])
    kept = table.filter(pa.array(np.arange(50) % 3 == 0))
    np.testing.assert_array_equal(unpack(kept["x"]), x[::3])


def test_an_empty_column_has_the_asked_width_and_float64_input_is_stored_as_float32() -> None:
    assert unpack(pack(np.zeros((0, 5), np.float32)), 5).shape == (0, 5)
    x = _x(3, 2).astype(np.float64)
    np.testing.assert_array_equal(unpack(pack(x)), x.astype(np.float32))
