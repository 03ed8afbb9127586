"""Running a partitioned stage (a :class:`~lvdkit.core.stage.PartitionedWork`) as Ray tasks over the cluster.

Steps run in order (prepare, scatter per input part, plan in the driver, solve per partition, reduce, write per input
part); each is as many tasks as it has pieces, every task reserving the CPUs and memory the work declares, so Ray
spreads them over every node that has room. The driver only ever holds what the work's ``merge`` and ``plan`` keep
(per-cell counts, calibration figures) and object references: the state and the decisions stay in Ray's object
store. Scratch tables (``STAGE/_scratch/``) are committed like parts; an interrupted run redoes the scatter (cheap,
and the same) and keeps every solved partition and written part whose commit record matches. A task whose node is
lost is rerun elsewhere (``ray.max_task_retries``), and objects it made are rebuilt from their lineage.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from lvdkit.core.io import part_files, part_name
from lvdkit.core.knn import set_threads
from lvdkit.core.stage import PartitionedWork, Scratch, StageOutput
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


def run_partitioned(
    stage: PartitionedStage, cfg: CurateConfig, out: Path, progress: bool
) -> tuple[int, dict[str, Any], set[str]]:
    """Run every step; returns (rows written, stats, the nodes whose tasks took part)."""
    work = stage.work(cfg, stage.inputs(out, declared_sides()))
    stage_dir = out / stage.name
    hooks = faults.Hooks.for_stage(stage.name)
    retries = max(0, cfg.ray.max_task_retries)
    opts = {
        "num_cpus": work.resources.cpus,
        "memory": work.resources.memory_mb * 2**20,
        "max_retries": retries,
        "retry_exceptions": retries > 0,
        "scheduling_strategy": "SPREAD",  # over every node with room, not the driver's first
    }
    run = _Steps(stage.name, stage.sides, work, hooks, opts, progress)
    try:
        return run.all(stage_dir)
    except StageError:
        raise
    except Exception as exc:
        raise_own(exc)
        raise StageError(f"{stage.name}: a partitioned task failed on all {retries + 1} attempts: {exc}") from exc


class _Steps:
    def __init__(
        self,
        name: str,
        sides: tuple[str, ...],
        work: PartitionedWork,
        hooks: faults.Hooks,
        opts: dict[str, Any],
        progress: bool,
    ) -> None:
        self.name, self.sides, self.work, self.hooks, self.opts, self.progress = (
            name,
            sides,
            work,
            hooks,
            opts,
            progress,
        )
        self.nodes: set[str] = set()

    def task(self, fn: Any, returns: int = 1) -> Any:
        return ray.remote(fn).options(**self.opts, num_returns=returns)

    def all(self, stage_dir: Path) -> tuple[int, dict[str, Any], set[str]]:
        scratch = stage_dir / SCRATCH
        threads = max(1, int(self.work.resources.cpus))
        state, node = self.task(_prepare, 2).remote(self.work, threads)
        self.nodes.add(ray.get(node))
        scattered = [scratch / "scatter" / part_name(i) for i in range(self.work.n_inputs)]
        total = None
        refs = [
            self.task(_scatter).remote(self.work, state, i, str(p), threads, self.hooks)
            for i, p in enumerate(scattered)
        ]
        for summary in self.gather(refs, "scatter"):
            total = self.work.merge(total, summary)
        partitions, figures = self.work.plan(total)
        figures_ref = ray.put(figures)
        solved = [scratch / "solve" / part_name(j) for j in range(len(partitions))]
        kept = sum(_trusted(p) for p in solved)
        if kept:
            print(
                f"[lvdkit] {self.name}: {kept} of {len(solved)} partitions already solved", file=sys.stderr, flush=True
            )
        refs = [
            self.task(_solve).remote(
                self.work, state, figures_ref, partitions[j], scattered, str(p), threads, self.hooks, j
            )
            for j, p in enumerate(solved)
            if not _trusted(p)
        ]
        list(self.gather(refs, f"solve ({len(partitions)} partitions)"))
        decisions, stats_ref = self.task(_reduce, 2).remote(
            self.work, state, figures_ref, solved, str(stage_dir), self.sides, threads
        )
        stats, node = ray.get(stats_ref)
        self.nodes.add(node)
        outputs = len(partitions) if self.work.write_per_partition else self.work.n_inputs
        scratch_of = Scratch(scattered, solved)
        targets = [stage_dir / part_name(i) for i in range(outputs)]
        refs = [
            self.task(_write).remote(self.work, state, figures_ref, decisions, i, scratch_of, str(t), self.hooks)
            for i, t in enumerate(targets)
            if not _trusted(t)
        ]
        list(self.gather(refs, "write"))
        stats, node = ray.get(self.task(_final).remote(self.work, stats, targets))
        self.nodes.add(node)
        shutil.rmtree(scratch, ignore_errors=True)
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in part_files(stage_dir))
        return rows, stats, self.nodes

    def gather(self, refs: list[Any], step: str) -> Iterator[Any]:
        """Results as they finish (each fetched once, then dropped); the nodes that ran them are noted."""
        desc = f"{self.name} {step}"
        with tqdm(total=len(refs), desc=desc, unit="task", disable=not self.progress, file=sys.stderr) as bar:
            while refs:
                done, refs = ray.wait(refs, num_returns=1)
                value, node = ray.get(done[0])
                self.nodes.add(node)
                bar.update(1)
                yield value


def _trusted(path: Path) -> bool:
    return path.exists() and untrusted(path) is None


def _prepare(work: PartitionedWork, threads: int) -> tuple[Any, str]:
    set_threads(threads)
    return work.prepare(), node_id()


def _scatter(work: PartitionedWork, state: Any, index: int, path: str, threads: int, hooks: faults.Hooks) -> Any:
    set_threads(threads)
    table, summary = work.scatter(state, index)
    commit_part(table, Path(path), hooks)
    return summary, node_id()


def _solve(
    work: PartitionedWork,
    state: Any,
    figures: Any,
    partition: Any,
    scattered: list[Path],
    path: str,
    threads: int,
    hooks: faults.Hooks,
    index: int,
) -> tuple[None, str]:
    set_threads(threads)
    hooks.check(index, [])
    commit_part(work.solve(state, figures, partition, [p for p in scattered if p.exists()]), Path(path), hooks)
    hooks.pause()  # LVDKIT_TEST_STAGE_DELAY=STAGE:S: a test kills a node (or the run) while partitions are solved
    return None, node_id()


def _reduce(
    work: PartitionedWork,
    state: Any,
    figures: Any,
    solved: list[Path],
    stage_dir: str,
    sides: tuple[str, ...],
    threads: int,
) -> tuple[Any, tuple[dict[str, Any], str]]:
    set_threads(threads)
    output: StageOutput = work.reduce(state, figures, solved)
    write_sides(Path(stage_dir).name, sides, output, Path(stage_dir))
    return output.table, (output.stats, node_id())


def _final(work: PartitionedWork, stats: dict[str, Any], parts: list[Path]) -> tuple[dict[str, Any], str]:
    return work.final_stats(stats, parts), node_id()


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
    commit_part(work.write(state, figures, decisions, index, scratch), Path(path), hooks)
    return None, node_id()
