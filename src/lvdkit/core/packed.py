"""Vectors packed as fixed-size binary values: how partitioned stages keep descriptors in their scratch tables.

Parquet stores a list column (even a fixed-size list) with repetition and definition levels per value, and encoding
them is most of what writing a 256-d descriptor table costs: 150k x 256 float32 rows took 4.2 s to write and 0.6 s
to read back as a list column, 0.12 s and 0.12 s as fixed-size binary (uncompressed; measured on this machine, see
``bench/scratch_encoding.py``). Scratch tables are lvdkit's own, so they may use this; the bytes are little-endian
float32 whatever the node (a cluster's tasks read what other nodes wrote); the public tables keep their list columns.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def pack(x: np.ndarray) -> pa.FixedSizeBinaryArray:
    """[N, D] vectors as N fixed-size binary values of D float32 each."""
    x = np.ascontiguousarray(x, dtype="<f4")
    n, d = x.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * max(d, 1)), n, [None, pa.py_buffer(x.tobytes())])


def unpack(column: pa.ChunkedArray | pa.Array, dims: int | None = None) -> np.ndarray:
    """A column made by :func:`pack` back as a [N, D] float32 array (``dims`` gives D for an empty column).

    Chunk by chunk into one new array: one copy of the vectors, not two (combining the chunks first would be
    another), which is what bounds a solve task's peak."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    width = column.type.byte_width // 4
    out = np.empty((len(column), dims if dims is not None and len(column) == 0 else width), np.float32)
    at = 0
    for chunk in chunks:
        n = len(chunk)
        if n:
            data = np.frombuffer(chunk.buffers()[1], "<f4")  # the whole buffer: a slice starts at its offset
            out[at : at + n] = data[chunk.offset * width : (chunk.offset + n) * width].reshape(n, width)
        at += n
    return out
