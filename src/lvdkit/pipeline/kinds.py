"""Stage kinds: what the runner needs to know about a stage to run it, one type per way of running.

A stage names the upstream stages whose outputs it reads (``reads``) and every output it writes besides its parts
(``sides``: side files; ``subparts``: part sub-folders), so the runner resolves every path and writes every file.

- :class:`WholeStage`: one task over the whole dataset, returning a :class:`~lvdkit.core.stage.StageOutput`.
- :class:`PartStage`: a work list split into parts, each part one task (or one call on an actor pool holding
  models) writing one ``part-NNNNNN.parquet``; interrupted runs resume part by part. The work list is one file
  planned by one call, or listing files made by partitioned steps (curated: no task holds the curated set).
- :class:`PartitionedStage`: a whole-dataset stage that can also run split by content over the cluster (a
  :class:`~lvdkit.core.stage.PartitionedWork`: tasks per input part, per k-means partition, a reduce), chosen per
  run (small pools may be faster as one task).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvdkit.core.stage import PartitionedWork, PartPlan, PartWork, StageInputs, StageOutput
from lvdkit.core.storage import Location
from lvdkit.pipeline.config import CurateConfig


@dataclass(frozen=True, kw_only=True)
class Stage:
    """What every stage declares."""

    name: str
    reads: tuple[str, ...]  # upstream stages whose outputs it reads (all must have finished)
    section: Callable[[CurateConfig], Any]  # its config section (its hash decides whether it is redone)
    sides: tuple[str, ...] = ()  # side files it writes in its folder (names or fnmatch patterns)
    subparts: tuple[str, ...] = ()  # per-part sub-folders it writes (one file per part in each)
    extra_fingerprint: Callable[[CurateConfig], str] | None = None  # inputs beyond upstream outputs (files read)
    # parts of its output that readers use separately, with the identity of each (embed: one per model); recorded in
    # _SUCCESS, so adding a model reruns only the stages that read it
    views: Callable[[CurateConfig], dict[str, str]] | None = None
    # the views of upstream stages it reads (e.g. {"embed": ("copy",)}); an upstream stage not named counts whole
    uses: Callable[[CurateConfig], dict[str, tuple[str, ...]]] | None = None

    def inputs(self, out: Location, sides: dict[str, tuple[str, ...]]) -> StageInputs:
        """Read access to its declared upstream outputs (and to its own, for its stats)."""
        return StageInputs(str(out), (*self.reads, self.name), sides)


@dataclass(frozen=True, kw_only=True)
class WholeStage(Stage):
    """One task over the whole dataset."""

    run: Callable[[CurateConfig, StageInputs], StageOutput]


@dataclass(frozen=True)
class Actors:
    """An actor pool for a per-part stage whose work holds models: replicas and resources per replica."""

    replicas: int
    num_cpus: float
    num_gpus: float
    threads: int | None  # intra-op threads per replica; None: its CPUs, rounded up
    min_replicas: int | None = None  # an autoscaling pool between min_replicas and replicas; None: fixed
    decode_cpus: float = 0.5  # CPUs per decode task, for works that decode apart from the actors (PartWork.decodes)


@dataclass(frozen=True, kw_only=True)
class PartStage(Stage):
    """A work list split into parts, one output part each."""

    work: Callable[[CurateConfig, Location, PartPlan], PartWork]  # (cfg, listing, plan) -> the part work, on the driver
    stats: Callable[[StageInputs], dict[str, Any]]
    # the work list: written by one call (cfg, inputs, upstream fingerprint, listing file), or by partitioned steps
    # over the cluster into a folder of listing files (``plan_work``: no task holds the whole list)
    plan: Callable[[CurateConfig, StageInputs, str, Path], PartPlan] | None = None
    plan_work: Callable[[CurateConfig, StageInputs], PartitionedWork] | None = None
    actors: Callable[[CurateConfig], Actors | None] | None = None  # None: plain tasks
    # the work list decides the stage's fingerprint (ingest: the files listed), so it is planned before the skip
    # decision, in the driver; other stages plan in a Ray task, only when they have work
    plans_fingerprint: bool = False


@dataclass(frozen=True, kw_only=True)
class PartitionedStage(WholeStage):
    """A whole-dataset stage (``run``: the single-task path) with a partitioned path over the cluster (``work``);
    ``partitioned`` chooses the path for this run (by pool size and config)."""

    work: Callable[[CurateConfig, StageInputs], PartitionedWork]
    partitioned: Callable[[CurateConfig, StageInputs], bool]
