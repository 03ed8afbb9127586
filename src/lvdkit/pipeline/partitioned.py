"""Running a partitioned stage (a :class:`~lvdkit.core.stage.PartitionedWork`) as Ray tasks over the cluster.

Steps run in order (prepare, scatter per input part, plan, solve per partition, reduce, write per input part); each
is as many tasks as it has pieces, every task reserving the CPUs and memory the work declares, so Ray spreads them
over every node that has room. The driver holds the list of partitions and object references, nothing more: the
plan task folds the scatter summaries (read in the driver, their object-store pages stayed in its resident set:
145 MiB of 432 at 10M rows, one 0.7 MiB summary per embed part), and the state, the figures and the decisions stay
in Ray's object store. Scratch tables (``STAGE/_scratch/``) are committed like parts; an interrupted run redoes the
scatter (cheap, and the same) and keeps every solved partition and written part whose commit record matches. A task
whose node is lost is rerun elsewhere (``ray.max_task_retries``), and objects it made are rebuilt from their lineage.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from lvdkit.core.io import part_files, part_name
from lvdkit.core.knn import set_threads
from lvdkit.core.stage import PartitionedWork, Scratch, StageOutput
from lvdkit.core.storage import Location, location, remove_tree
from lvdkit.core.timing import take, timed
from lvdkit.pipeline import faults
from lvdkit.pipeline.commits import commit_part, untrusted
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.errors import StageError, raise_own
from lvdkit.pipeline.kinds import PartitionedStage
from lvdkit.pipeline.outputs import write_sides
from lvdkit.pipeline.stages import declared_sides

SCRATCH = "_scratch"  # a partitioned stage's intermediate tables, removed when it finishes


def node_id() -> str:
    """The Ray node this code runs on (recorded per stage, so a run shows which nodes took part)."""
    return str(ray.get_runtime_context().get_node_id())


@dataclass(frozen=True)
class Ran:
    """Where a task ran and how long it took (its phases as the work timed them: :mod:`lvdkit.core.timing`)."""

    node: str
    seconds: float
    phases: dict[str, float]

    @classmethod
    def since(cls, start: float) -> Ran:
        return cls(node_id(), time.perf_counter() - start, take())


@dataclass
class StepTimes:
    """Per step: tasks run, the driver's wall seconds, the tasks' summed seconds and phases (``_SUCCESS``'s
    ``steps``): tasks' seconds over wall seconds is the parallelism a step got."""

    steps: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, step: str, ran: Ran) -> None:
        row = self.steps.setdefault(step, {"tasks": 0, "wall_s": 0.0, "task_s": 0.0})
        row["tasks"] += 1
        row["task_s"] += ran.seconds
        for phase, secs in ran.phases.items():
            row[f"{phase}_s"] = row.get(f"{phase}_s", 0.0) + secs

    def wall(self, step: str, seconds: float) -> None:
        self.steps.setdefault(step, {"tasks": 0, "wall_s": 0.0, "task_s": 0.0})["wall_s"] += seconds

    def rounded(self) -> dict[str, dict[str, float]]:
        return {s: {k: round(v, 2) for k, v in row.items()} for s, row in self.steps.items()}


def run_partitioned(
    stage: PartitionedStage, cfg: CurateConfig, out: Location, progress: bool
) -> tuple[int, dict[str, Any], set[str]]:
    """Run every step; returns (rows written, stats, the nodes whose tasks took part)."""
    work = stage.work(cfg, stage.inputs(out, declared_sides()))
    return run_work(stage.name, stage.sides, work, out / stage.name, cfg, progress)


def run_work(
    name: str,
    sides: tuple[str, ...],
    work: PartitionedWork,
    into: Location,
    cfg: CurateConfig,
    progress: bool,
    label: str | None = None,
) -> tuple[int, dict[str, Any], set[str]]:
    """Run the steps of stage ``name``'s ``work``, writing its parts (and declared ``sides``) into ``into``: the
    stage's folder, or a folder of it (a per-part stage's listing files; ``label`` names the steps in progress
    bars, e.g. ``curated plan``)."""
    hooks = faults.Hooks.for_stage(name)
    retries = max(0, cfg.ray.max_task_retries)
    opts = {
        "num_cpus": work.resources.cpus,
        "memory": work.resources.memory_mb * 2**20,
        "max_retries": retries,
        "retry_exceptions": retries > 0,
        "scheduling_strategy": "SPREAD",  # over every node with room, not the driver's first
    }
    run = _Steps(name, sides, work, hooks, opts, progress, label or name)
    try:
        return run.all(into)
    except StageError:
        raise
    except Exception as exc:
        raise_own(exc)
        raise StageError(f"{name}: a partitioned task failed on all {retries + 1} attempts: {exc}") from exc


class _Steps:
    """One run of a partitioned stage's steps; remembers the nodes its tasks ran on and the time each step took."""

    def __init__(
        self,
        name: str,
        sides: tuple[str, ...],
        work: PartitionedWork,
        hooks: faults.Hooks,
        opts: dict[str, Any],
        progress: bool,
        label: str,
    ) -> None:
        self.name, self.sides, self.hooks, self.opts, self.progress = name, sides, hooks, opts, progress
        self.label = label  # what progress bars call its steps
        self.work = work
        self.work_ref = ray.put(work)  # shipped once, not with every task
        self.threads = max(1, int(work.resources.cpus))
        self.nodes: set[str] = set()
        self.times = StepTimes()

    def task(self, fn: Any, returns: int = 1) -> Any:
        return ray.remote(fn).options(**self.opts, num_returns=returns)

    def one(self, step: str, ref: Any, ran_ref: Any = None) -> Any:
        """Wait for a single task's (value, :class:`Ran`): one reference to the pair, or one to each."""
        start = time.perf_counter()
        value, ran = ray.get(ref) if ran_ref is None else ray.get([ref, ran_ref])
        self.nodes.add(ran.node)
        self.times.add(step, ran)
        self.times.wall(step, time.perf_counter() - start)
        return value

    def all(self, stage_dir: Location) -> tuple[int, dict[str, Any], set[str]]:
        scratch = stage_dir / SCRATCH
        start = time.perf_counter()
        state, ran_ref = self.task(_prepare, 2).remote(self.work_ref, self.threads)
        ran = ray.get(ran_ref)
        self.nodes.add(ran.node)
        self.times.add("prepare", ran)
        self.times.wall("prepare", time.perf_counter() - start)
        scattered = [scratch / "scatter" / part_name(i) for i in range(self.work.n_inputs)]
        partitions, figures = self.scatter(state, scattered)
        solved = [scratch / "solve" / part_name(j) for j in range(len(partitions))] if self.work.solves else []
        if self.work.solves:
            self.solve(state, figures, partitions, scattered, solved)
        decisions, stats_ref = self.task(_reduce, 2).remote(
            self.work_ref, state, figures, solved, str(stage_dir), self.sides, self.threads
        )
        stats = self.one("reduce", stats_ref)
        outputs = len(partitions) if self.work.write_per_partition else self.work.n_inputs
        targets = [stage_dir / part_name(i) for i in range(outputs)]
        scratch_of = Scratch(scattered, solved)
        refs = [
            self.task(_write).remote(self.work_ref, state, figures, decisions, i, scratch_of, str(t), self.hooks)
            for i, t in enumerate(targets)
            if not _trusted(t)
        ]
        list(self.gather(refs, "write"))
        if not targets:  # nothing to write (an empty pool): one empty part, as the single task writes
            targets = [stage_dir / part_name(0)]
            commit_part(self.work.empty_output(), targets[0], self.hooks)
        stats = self.one("final", self.task(_final).remote(self.work_ref, stats, targets))
        remove_tree(scratch, strict=False)  # leftovers are only scratch: a rerun redoes it anyway
        stats = {**stats, "steps": self.times.rounded()}
        return sum(pq.ParquetFile(p).metadata.num_rows for p in part_files(stage_dir)), stats, self.nodes

    def scatter(self, state: Any, scattered: list[Location]) -> tuple[list[Any], Any]:
        """Scatter every input part (always: cheap, and the same again), then one task folds the summaries and
        plans; the driver gets the partitions, the figures stay in the object store for the later steps."""
        refs = [
            self.task(_scatter, 2).remote(self.work_ref, state, i, str(p), self.threads, self.hooks)
            for i, p in enumerate(scattered)
        ]
        summaries = [summary for summary, _ in refs]
        list(self.gather([ran for _, ran in refs], "scatter", valued=False))
        del refs
        partitions, figures, ran = self.task(_plan, 3).remote(self.work_ref, summaries)
        return self.one("plan", partitions, ran), figures

    def solve(
        self, state: Any, figures: Any, partitions: list[Any], scattered: list[Location], solved: list[Location]
    ) -> None:
        """Solve every partition not already solved by an interrupted run."""
        kept = sum(_trusted(p) for p in solved)
        if kept:
            note = f"[lvdkit] {self.name}: {kept} of {len(solved)} partitions already solved"
            print(note, file=sys.stderr, flush=True)
        refs = [
            self.task(_solve).remote(
                self.work_ref, state, figures, partitions[j], scattered, str(p), self.threads, self.hooks, j
            )
            for j, p in enumerate(solved)
            if not _trusted(p)
        ]
        list(self.gather(refs, "solve", f"solve ({len(partitions)} partitions)"))

    def gather(self, refs: list[Any], step: str, desc: str | None = None, valued: bool = True) -> Iterator[Any]:
        """Results as they finish (each fetched once, then dropped); the nodes that ran them and their times are
        noted. ``valued=False``: the tasks' :class:`Ran` alone (their values stay in the object store)."""
        start = time.perf_counter()
        label = f"{self.label} {desc or step}"
        with tqdm(total=len(refs), desc=label, unit="task", disable=not self.progress, file=sys.stderr) as bar:
            while refs:
                done, refs = ray.wait(refs, num_returns=1)
                value, ran = ray.get(done[0]) if valued else (None, ray.get(done[0]))
                self.nodes.add(ran.node)
                self.times.add(step, ran)
                bar.update(1)
                yield value
        self.times.wall(step, time.perf_counter() - start)


def _trusted(path: Location) -> bool:
    return path.exists() and untrusted(path) is None


def _prepare(work: PartitionedWork, threads: int) -> tuple[Any, Ran]:
    start = _begin(threads)
    return work.prepare(), Ran.since(start)


def _begin(threads: int) -> float:
    set_threads(threads)
    take()  # a reused worker's tally from an earlier task
    return time.perf_counter()


def _scatter(work: PartitionedWork, state: Any, index: int, path: str, threads: int, hooks: faults.Hooks) -> Any:
    start = _begin(threads)
    table, summary = work.scatter(state, index)
    with timed("write"):
        commit_part(table, location(path), hooks, work.scratch_row_group_rows)
    return summary, Ran.since(start)


def _plan(work: PartitionedWork, summaries: list[Any]) -> tuple[list[Any], Any, Ran]:
    """Fold the scatter summaries one at a time (each fetched, folded, dropped), then plan."""
    start = _begin(1)
    total = None
    for ref in summaries:
        total = work.merge(total, ray.get(ref))
    partitions, figures = work.plan(total)
    return partitions, figures, Ran.since(start)


def _solve(
    work: PartitionedWork,
    state: Any,
    figures: Any,
    partition: Any,
    scattered: list[Location],
    path: str,
    threads: int,
    hooks: faults.Hooks,
    index: int,
) -> tuple[None, Ran]:
    start = _begin(threads)
    hooks.check(index, [])
    present = {p.name for p in part_files(scattered[0].parent)} if scattered else set()  # one listing
    table = work.solve(state, figures, partition, [p for p in scattered if p.name in present])
    with timed("write"):
        commit_part(table, location(path), hooks)
    hooks.pause()  # LVDKIT_TEST_STAGE_DELAY=STAGE:S: a test kills a node (or the run) while partitions are solved
    return None, Ran.since(start)


def _reduce(
    work: PartitionedWork,
    state: Any,
    figures: Any,
    solved: list[Location],
    stage_dir: str,
    sides: tuple[str, ...],
    threads: int,
) -> tuple[Any, tuple[dict[str, Any], Ran]]:
    start = _begin(threads)
    output: StageOutput = work.reduce(state, figures, solved)
    write_sides(location(stage_dir).name, sides, output, location(stage_dir))
    return output.table, (output.stats, Ran.since(start))


def _final(work: PartitionedWork, stats: dict[str, Any], parts: list[Location]) -> tuple[dict[str, Any], Ran]:
    start = _begin(1)
    return work.final_stats(stats, parts), Ran.since(start)


def _write(
    work: PartitionedWork,
    state: Any,
    figures: Any,
    decisions: Any,
    index: int,
    scratch: Scratch,
    path: str,
    hooks: faults.Hooks,
) -> Any:
    start = _begin(1)
    table = work.write(state, figures, decisions, index, scratch)
    commit_part(table, location(path), hooks, work.output_row_group_rows)
    return None, Ran.since(start)
