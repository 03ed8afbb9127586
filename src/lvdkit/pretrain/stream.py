"""The training stream's source: every remaining epoch's Parquet row groups, each epoch in its own seeded order.

One Ray Data source for the whole run, the indices of (epoch, row group) units read by one map, rather than a
``read_parquet`` per epoch unioned: each read adds its own file-listing task and operators, and on 2 cores (Ray
2.60) the first batch came 44 s after the start for one epoch, 111 s for 3 and not within 10 minutes for 36. The
unit is a row group, so a task holds one row group (``ROW_GROUP_ROWS`` rows at most in lvdkit's shards), never a
whole file. The driver holds the file list and row-group counts only; a worker derives its units from the index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MAX_BLOCKS = 4096  # blocks of the index range: enough to spread, few enough for Ray Data's planning


@dataclasses.dataclass(frozen=True)
class RowGroups:
    """Parquet files and the row groups of each: the units one epoch reads, in a seeded order per epoch."""

    paths: tuple[str, ...]
    groups: tuple[int, ...]  # row groups per file
    rows: int  # rows in all files

    @classmethod
    def of(cls, paths: list[str], fs: pafs.FileSystem | None) -> RowGroups:
        """Read the files' footers (metadata only)."""
        metas = [pq.read_metadata(p, filesystem=fs) for p in paths]
        return cls(tuple(paths), tuple(m.num_row_groups for m in metas), sum(m.num_rows for m in metas))

    @property
    def per_epoch(self) -> int:
        return sum(self.groups)

    def order(self, epoch: int, seed: int) -> np.ndarray:
        """The units of ``epoch`` (indices into the run's row groups, file by file), permuted by (seed, epoch)."""
        return np.random.default_rng([seed, epoch]).permutation(self.per_epoch)

    def locate(self, unit: int) -> tuple[str, int]:
        """(file, row group within it) of a unit."""
        ends = np.cumsum(self.groups)
        file = int(np.searchsorted(ends, unit, side="right"))
        return self.paths[file], unit - int(ends[file - 1] if file else 0)


Transform = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class ReadRowGroups:
    """A Ray Data ``map_batches`` callable (``batch_size=1``): ``{"data": [stream index]}`` -> the unit's row group
    in batches of ``batch_rows`` images (``{column: bytes}``, or what ``transform`` makes of it: the training views).

    Stream index ``i`` is unit ``i % per_epoch`` of epoch ``start_epoch + i // per_epoch`` in that epoch's order.
    The transform runs here, not as a second ``map_batches``: Ray Data would fuse the two and bundle as many
    indices into one task as the second one's batch size, so a task would read that many row groups.
    """

    def __init__(
        self,
        groups: RowGroups,
        column: str,
        fs: pafs.FileSystem | None,
        seed: int,
        start_epoch: int,
        transform: Transform | None = None,
        batch_rows: int = 32,
    ) -> None:
        self.groups, self.column, self.fs = groups, column, fs
        self.seed, self.start_epoch = seed, start_epoch
        self.transform, self.batch_rows = transform, batch_rows
        self._orders: dict[int, np.ndarray] = {}

    def unit(self, index: int) -> tuple[str, int]:
        epoch, k = divmod(index, self.groups.per_epoch)
        epoch += self.start_epoch
        if epoch not in self._orders:
            self._orders = {epoch: self.groups.order(epoch, self.seed)}  # indices arrive in order: keep one epoch
        return self.groups.locate(int(self._orders[epoch][k]))

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for index in batch["data"]:
            path, group = self.unit(int(index))
            images = pq.ParquetFile(path, filesystem=self.fs).read_row_group(group, columns=[self.column])[self.column]
            for start in range(0, len(images), self.batch_rows):
                rows = {self.column: images.slice(start, self.batch_rows).to_numpy(zero_copy_only=False)}
                out = self.transform(rows) if self.transform is not None else rows
                if out:  # a transform drops images it cannot decode; a batch may lose them all
                    yield out


def stream_indices(groups: RowGroups, start_epoch: int, epochs: int) -> list[np.ndarray]:
    """The stream's indices (epochs ``start_epoch`` .. ``epochs - 1``, at least one) in at most ``MAX_BLOCKS``
    chunks: one Ray Data block, hence one task, per chunk."""
    n = stream_size(groups, start_epoch, epochs)
    return np.array_split(np.arange(n), min(n, MAX_BLOCKS))


def stream_size(groups: RowGroups, start_epoch: int, epochs: int) -> int:
    """Units in the stream of epochs ``start_epoch`` .. ``epochs - 1`` (at least one epoch)."""
    return groups.per_epoch * max(epochs - start_epoch, 1)
