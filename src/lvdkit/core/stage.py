"""The contract between a stage and the runner that executes it.

A stage reads the outputs of the stages it declares (:class:`StageInputs`, handed to it by the runner) and returns
what it made; it never builds a path under OUT itself and never writes a file. Two kinds of stage exist:

- whole-dataset stages return a :class:`StageOutput` (the table, summary stats, declared side files), which the
  runner writes atomically into the stage's folder;
- per-part stages split their work list into parts and give the runner a :class:`PartWork` that loads, processes
  and names the rows of one part; the runner writes one ``part-NNNNNN.parquet`` per part (plus, per part, one file in
  each declared sub-folder such as ``embed/calibration/``).

The layout of OUT (``OUT/<stage>/part-*.parquet``, ``OUT/<stage>/<side file>``) is known here and in the runner only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import pyarrow as pa

from lvdkit.core import schema
from lvdkit.core.io import ROW_GROUP_ROWS, part_files, read_json, read_tables
from lvdkit.core.storage import Location, location

SUCCESS = "_SUCCESS"  # a finished stage's record (JSON): config hash, input fingerprint, rows, stats, parts
SideFile: TypeAlias = pa.Table | dict[str, Any] | bytes  # written as Parquet, JSON or raw bytes


@dataclass(frozen=True)
class StageInputs:
    """Read access to the finished outputs of the stages a stage declared (``reads``), by stage and output name.

    ``sides`` maps each readable stage to the side-file names (or patterns) it declared; reading anything else is a
    programming error that names the missing declaration.
    """

    out: str
    reads: tuple[str, ...]
    sides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _listed: dict[str, dict[str, int]] = field(default_factory=dict, compare=False, repr=False)

    def folder(self, stage: str, sub: str = "") -> Location:
        """The folder of ``stage``'s parts (``sub``: one of its declared part sub-folders)."""
        if stage not in self.reads:
            raise KeyError(f"this stage does not declare {stage!r} among the outputs it reads ({self.reads})")
        base = location(self.out) / stage
        return base / sub if sub else base

    def table(
        self,
        stage: str,
        columns: list[str] | None = None,
        schema: pa.Schema | None = None,
        sub: str = "",
        keep: Callable[[pa.Table], pa.ChunkedArray] | None = None,
    ) -> pa.Table:
        """All parts of ``stage`` as one table (empty with ``schema`` when it wrote none); ``keep``: only the rows
        it marks, read part by part (:func:`lvdkit.core.io.read_tables`)."""
        return read_tables(self.parts(stage, sub), self.folder(stage, sub), columns, schema, keep)

    def parts(self, stage: str, sub: str = "") -> list[Location]:
        """The part files of ``stage``, in part order: those its ``_SUCCESS`` lists once it has finished (the commit
        point: a reader trusts no other file), else those in its folder (a stage reading its own parts)."""
        listed = self._listed.get(stage)
        if listed is None:
            listed = self.record(stage).get("part_bytes")
            if listed is None:
                return part_files(self.folder(stage, sub))
            self._listed[stage] = listed  # a finished stage's record does not change: read it once
        base = self.folder(stage)
        names = sorted(rel for rel in listed if rel.rpartition("/")[0] == sub and fnmatch.fnmatchcase(rel, "*part-*"))
        return [base / rel for rel in names]

    def side(self, stage: str, name: str) -> Location:
        """The path of side file ``name`` that ``stage`` declared (it may not exist when the stage wrote none)."""
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.sides.get(stage, ())):
            raise KeyError(f"{stage!r} declares no side output {name!r} (it declares {self.sides.get(stage, ())})")
        return self.folder(stage) / name

    def record(self, stage: str) -> dict[str, Any]:
        """``stage``'s ``_SUCCESS`` record (stats, rows, config), or ``{}`` when it has not finished."""
        return read_json(self.folder(stage) / SUCCESS) or {}


@dataclass
class StageOutput:
    """What a whole-dataset stage made: its table (written as parts), stats for ``_SUCCESS`` and side files."""

    table: pa.Table
    stats: dict[str, Any] = field(default_factory=dict)
    sides: dict[str, SideFile] = field(default_factory=dict)


@dataclass(frozen=True)
class PartPlan:
    """A per-part stage's plan: the fingerprint of its inputs and how many parts its work list has."""

    fingerprint: str
    n_parts: int
    layout: tuple[int, ...] = ()  # a work list in several files (curated): the rows of each, in part order


class PartWork:
    """A per-part stage's work as its part tasks run it: load a part's rows, process any subset of them (the whole
    part; one row at a time when the runner looks for the rows that fail), name them, and stand in for a row that
    cannot be processed (``on_part_error=quarantine``).

    ``process`` returns the part's table, or a dict of tables: ``""`` the part itself, other keys the stage's
    declared part sub-folders. ``setup`` runs once per worker before its first part (loading models, say).
    """

    may_quarantine: bool = True  # False: a part that keeps failing fails the stage with the work's own error
    # True: ``decode`` does the part's CPU-side reading apart from the workers holding models, in tasks of its own
    decodes: bool = False

    def setup(self, threads: int = 1) -> None:
        """Prepare a worker (``threads``: intra-op threads it may use)."""
        return None

    def load(self, index: int) -> pa.Table:
        raise NotImplementedError

    def decode(self, rows: pa.Table) -> Any:
        """The part's inputs made ready for ``process`` (images decoded, say), on a CPU task of its own; picklable."""
        return None

    def process(self, rows: pa.Table, decoded: Any = None) -> pa.Table | dict[str, pa.Table]:
        """The part's output (``decoded``: what ``decode`` made of these rows, or None: process reads them itself)."""
        raise NotImplementedError

    def uris(self, rows: pa.Table) -> list[str]:
        return [str(u) for u in rows[schema.URI].to_pylist()]

    def reuse(self, previous: Location, views: tuple[str, ...]) -> None:
        """An earlier output of this stage (same inputs) whose ``views`` are still valid: parts may copy them from it
        rather than compute them (:mod:`lvdkit.pipeline.reuse`). Default: ignored."""
        return None

    def quarantined(self, rows: pa.Table, reason: str, detail: str) -> pa.Table | None:
        """Output rows standing for ``rows`` that failed; ``None``: they are left out (and listed by the runner)."""
        return None


@dataclass(frozen=True)
class Resources:
    """What one task of a partitioned stage reserves: CPUs (its threads match them) and memory (Ray schedules by it;
    the stage keeps each task's working set within it)."""

    cpus: float
    memory_mb: int


@dataclass(frozen=True)
class Scratch:
    """A partitioned stage's intermediate tables: one per input part (scatter), one per partition (solve)."""

    scattered: list[Location]
    solved: list[Location]


def scratch_row_group_rows(partition_rows: int, n_tables: int) -> int:
    """Rows per scatter row group: about one partition's share of each of ``n_tables`` tables (within 256..8192)."""
    return min(8192, max(256, partition_rows // max(1, n_tables)))


class PartitionedWork:
    """A stage whose work is split by content (k-means cells of the descriptors), not by the parts it reads.

    The runner runs, in order, each step as Ray tasks wherever the cluster has room, and writes what they return:

    1. ``prepare()``, one task: a state fitted on a bounded sample (whitening, cells); handed to later tasks by
       reference, never fetched by the driver;
    2. ``scatter(state, i)``, one task per input part ``i`` (``n_inputs`` of them): a scratch table (the part's rows
       with their cells) and a small summary (per-cell counts, calibration figures);
    3. ``plan(summary)`` in the driver, on the summaries merged as they arrive (``merge``): the partitions (a list of
       small picklable values) and any figures the later steps need;
    4. ``solve(state, plan, j, scratch)``, one task per partition ``j``: a scratch table (its pairs), reading only its
       rows of the scatter tables (``scratch``: their paths);
    5. ``reduce(state, plan, solved)``, one task: the decisions (a table that grows with what was found, not with the
       pool), stats and declared side files;
    6. ``write(state, figures, decisions, i, scratch)``, one task per input part (or, with ``write_per_partition``,
       per partition): output part ``i`` (``scratch``: the scatter and solve tables, to read its own).
    """

    n_inputs: int = 0
    resources: Resources = Resources(cpus=1.0, memory_mb=1024)
    write_per_partition: bool = False  # output part j holds partition j's rows (their work stays together)
    solves: bool = True  # False: no solve step (the writes join what the scatter keyed; a plan, say)
    output_row_group_rows: int = ROW_GROUP_ROWS  # rows per row group of the output parts
    # Rows per row group of the scatter tables. Each solve reads its cell range from every scatter table through the
    # row groups' statistics: row groups near one partition's share of a table keep what it reads but does not use
    # from growing with the number of tables (with 8192-row groups, a 10M pool's solve decoded 30x what it kept).
    scratch_row_group_rows: int = 8192

    def prepare(self) -> Any:
        raise NotImplementedError

    def scatter(self, state: Any, index: int) -> tuple[pa.Table, Any]:
        raise NotImplementedError

    def merge(self, total: Any, summary: Any) -> Any:
        """Fold one scatter summary into the running total (``total`` is None before the first)."""
        raise NotImplementedError

    def plan(self, total: Any) -> tuple[list[Any], Any]:
        """(partitions, figures handed to solve/reduce/write)."""
        raise NotImplementedError

    def solve(self, state: Any, figures: Any, partition: Any, scratch: list[Location]) -> pa.Table:
        raise NotImplementedError

    def reduce(self, state: Any, figures: Any, solved: list[Location]) -> StageOutput:
        raise NotImplementedError

    def write(self, state: Any, figures: Any, decisions: pa.Table, index: int, scratch: Scratch) -> pa.Table:
        raise NotImplementedError

    def empty_output(self) -> pa.Table:
        """The stage's table with no rows: written as its one part when it has nothing to write (an empty pool),
        as the single-task path does, so readers find the stage's schema."""
        raise NotImplementedError

    def final_stats(self, stats: dict[str, Any], parts: list[Location]) -> dict[str, Any]:
        """The stage's stats once its output ``parts`` are written (for figures only they can give)."""
        return stats
