"""A solve's read of one key range out of sorted scatter tables: the rows pyarrow.dataset's filter gives, in the same
order, from only the row groups that can hold them; on disk and in a bucket of a real S3 API server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from lvdkit.core.scratch_read import _groups_within, _open, read_range
from lvdkit.core.storage import ObjectPath

from ..s3_server import client, environment, s3_server


def _tables(folder: Path, n: int = 4, rows: int = 600) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for t in range(n):
        cell = np.sort(rng.integers(0, 50, rows)).astype(np.int32)
        table = pa.table({"cell": cell, "key": np.arange(rows, dtype=np.int64) + t * rows, "x": rng.random(rows)})
        paths.append(folder / f"{t}.parquet")
        pq.write_table(table, paths[-1], row_group_size=64)
    return paths


def _dataset(paths: list[Path], start: int, stop: int) -> pa.Table:
    data = pads.dataset([str(p) for p in paths], format="parquet")
    return data.to_table(filter=(pc.field("cell") >= start) & (pc.field("cell") < stop))


@pytest.mark.parametrize(("start", "stop"), [(0, 50), (10, 11), (17, 33), (49, 60), (60, 70)])
def test_a_range_reads_what_the_dataset_filter_reads(tmp_path: Path, start: int, stop: int) -> None:
    paths = _tables(tmp_path)
    got = read_range(list(paths), "cell", start, stop)
    assert got.equals(_dataset(paths, start, stop))  # same rows, same order, same schema (also when none match)
    assert got.schema == pq.read_schema(paths[0])


def test_only_row_groups_that_can_hold_the_range_are_read(tmp_path: Path) -> None:
    path = _tables(tmp_path, n=1)[0]
    file = _open(path)
    picked = _groups_within(file, "cell", 20, 22)
    assert 0 < len(picked) < file.metadata.num_row_groups / 3
    for g in range(file.metadata.num_row_groups):  # every group left out holds none of the range
        if g not in picked:
            cells = file.read_row_group(g)["cell"].to_numpy()
            assert not ((cells >= 20) & (cells < 22)).any()


def test_no_tables_is_an_error_not_an_empty_table() -> None:
    with pytest.raises(ValueError, match="no scatter tables"):
        read_range([], "cell", 0, 1)


@pytest.fixture(scope="module")
def bucket() -> Iterator[dict[str, str]]:
    with s3_server() as env, environment(env):
        client(env).create_dir("scratch")
        yield env


def test_tables_in_a_bucket_read_as_on_disk(bucket: dict[str, str], tmp_path: Path) -> None:
    paths = _tables(tmp_path)
    fs = client(bucket)
    for p in paths:
        with fs.open_output_stream(f"scratch/{p.name}") as out:
            out.write(p.read_bytes())
    remote = [ObjectPath(f"s3://scratch/{p.name}") for p in paths]
    assert read_range(list(remote), "cell", 17, 33).equals(_dataset(paths, 17, 33))
