"""A solve task's rows: one key range out of every scatter table, read one table at a time.

Every scatter table is sorted by its key (a cell or a hash bucket), so a range lies in a few row groups of each,
found from the row groups' statistics. ``pyarrow.dataset`` over all the tables with a filter does the same but holds
every table's metadata at once (their number grows with the pool) and reads ahead across tables: 200k rows of 1 KiB
out of 200 tables peaked 317 MiB above the process through the dataset, 246 read table by table (20 tables: 382 and
353; ``bench/scratch_read.py``); a ``dedup_copy`` solve of 8 partitions out of 200 scatter tables, 871 MiB -> 824.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit.core.storage import Location, ObjectPath


def read_range(tables: list[Location], key: str, start: int, stop: int) -> pa.Table:
    """The rows of ``tables`` (each sorted by ``key``) with ``start <= key < stop``, in table order then row order.

    At least one table: its schema is the result's when no row matches."""
    if not tables:
        raise ValueError("read_range: no scatter tables to read")
    found, schema = [], None
    for path in tables:
        file = _open(path)
        schema = schema or file.schema_arrow
        groups = _groups_within(file, key, start, stop)
        if groups:
            rows = file.read_row_groups(groups)
            found.append(rows.filter(pc.and_(pc.greater_equal(rows[key], start), pc.less(rows[key], stop))))
    assert schema is not None
    return pa.concat_tables(found) if found else schema.empty_table()


def _open(path: Location) -> pq.ParquetFile:
    if isinstance(path, ObjectPath):
        return pq.ParquetFile(path.fs.open_input_file(path.path))
    return pq.ParquetFile(str(path))


def _groups_within(file: pq.ParquetFile, key: str, start: int, stop: int) -> list[int]:
    """Row groups whose ``key`` statistics overlap ``[start, stop)`` (all those without statistics)."""
    meta = file.metadata
    column = file.schema_arrow.get_field_index(key)
    picked = []
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max or (stats.max >= start and stats.min < stop):
            picked.append(g)
    return picked
