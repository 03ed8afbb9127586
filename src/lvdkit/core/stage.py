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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import pyarrow as pa

from lvdkit.core import schema
from lvdkit.core.io import part_files, read_json, read_parts

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

    def folder(self, stage: str, sub: str = "") -> Path:
        """The folder of ``stage``'s parts (``sub``: one of its declared part sub-folders)."""
        if stage not in self.reads:
            raise KeyError(f"this stage does not declare {stage!r} among the outputs it reads ({self.reads})")
        base = Path(self.out) / stage
        return base / sub if sub else base

    def table(
        self, stage: str, columns: list[str] | None = None, schema: pa.Schema | None = None, sub: str = ""
    ) -> pa.Table:
        """All parts of ``stage`` as one table (empty with ``schema`` when it wrote none)."""
        return read_parts(self.folder(stage, sub), columns=columns, schema=schema)

    def parts(self, stage: str, sub: str = "") -> list[Path]:
        """The part files of ``stage``, in part order."""
        return part_files(self.folder(stage, sub))

    def side(self, stage: str, name: str) -> Path:
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


class PartWork:
    """A per-part stage's work as its part tasks run it: load a part's rows, process any subset of them (the whole
    part; one row at a time when the runner looks for the rows that fail), name them, and stand in for a row that
    cannot be processed (``on_part_error=quarantine``).

    ``process`` returns the part's table, or a dict of tables: ``""`` the part itself, other keys the stage's
    declared part sub-folders. ``setup`` runs once per worker before its first part (loading models, say).
    """

    may_quarantine: bool = True  # False: a part that keeps failing fails the stage with the work's own error

    def setup(self, threads: int = 1) -> None:
        """Prepare a worker (``threads``: intra-op threads it may use)."""
        return None

    def load(self, index: int) -> pa.Table:
        raise NotImplementedError

    def process(self, rows: pa.Table) -> pa.Table | dict[str, pa.Table]:
        raise NotImplementedError

    def uris(self, rows: pa.Table) -> list[str]:
        return [str(u) for u in rows[schema.URI].to_pylist()]

    def quarantined(self, rows: pa.Table, reason: str, detail: str) -> pa.Table | None:
        """Output rows standing for ``rows`` that failed; ``None``: they are left out (and listed by the runner)."""
        return None
