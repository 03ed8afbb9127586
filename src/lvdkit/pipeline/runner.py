"""Running stages on Ray: skip what is finished, resume what was interrupted, record what was done.

The runner dispatches on the stage's kind (``lvdkit.pipeline.kinds``): per-part stages go through Ray Data, one task
(or actor call) per part writing one part file (``lvdkit.pipeline.parts``); whole-dataset stages are one Ray task.
It resolves every path under OUT and writes every output (parts, side files, ``_SUCCESS``) atomically. OUT is a
folder every Ray node can read and write, or a prefix on object storage (``s3://bucket/run``): there every output is
one whole object, each part has its commit record, and a stage's ``_SUCCESS`` (listing its parts) is its commit
point; readers of a finished stage read the parts it lists and no other.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray

from lvdkit.core import schema
from lvdkit.core.io import disk_errors, part_files, part_name, read_json, remove_temporaries
from lvdkit.core.ray_env import LazyRay, ray_session
from lvdkit.core.settings import config_hash, save_config, to_dict
from lvdkit.core.stage import PartPlan
from lvdkit.core.storage import Location, is_uri, location, publish, replace, scratch_file
from lvdkit.pipeline import faults
from lvdkit.pipeline.commits import commit_part, untrusted
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.errors import StageError, raise_own
from lvdkit.pipeline.kinds import PartitionedStage, PartStage, Stage, WholeStage
from lvdkit.pipeline.manifest import RunKey, fingerprint_of, finish, prepare, success
from lvdkit.pipeline.names import CURATE_ORDER, stage_names
from lvdkit.pipeline.outputs import write_sides
from lvdkit.pipeline.ownership import check_not_inside_inputs, claim, locked
from lvdkit.pipeline.partitioned import node_id, run_partitioned, run_work
from lvdkit.pipeline.parts import PartRun, actor_threads, map_parts
from lvdkit.pipeline.reuse import drop_previous, keep_previous
from lvdkit.pipeline.stages import STAGES, declared_sides
from lvdkit.pipeline.summary import (
    STATUS_FILE,
    SUMMARY_FILE,
    join_status_parts,
    n_status_parts,
    removed_in,
    summary_fingerprint,
    write_funnel,
    write_status_part,
    write_summary,
)

WHOLE_STAGE_PART_ROWS = 1_000_000  # whole-dataset outputs are split into parts of this many rows

__all__ = ["StageError", "check_embedding_keys", "log", "run", "run_stage", "write_summary"]


def log(msg: str) -> None:
    """Progress messages go to stderr so stdout stays clean for the final result."""
    print(f"[lvdkit] {msg}", file=sys.stderr, flush=True)


def run_stage(name: str, cfg: CurateConfig, ray_: LazyRay, force: bool = False) -> dict[str, Any]:
    """Run one stage, starting Ray only if there is work; returns its ``_SUCCESS`` record plus ``skipped``."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; valid stages: {stage_names()}")
    stage = STAGES[name]
    out = location(cfg.out)
    for up in stage.reads:
        if success(out / up) is None:
            raise RuntimeError(
                f"stage {name!r} needs the output of {up!r}, which has not finished in {out}: "
                f"run `lvdkit run {up}` (or `lvdkit curate`) first"
            )
    stage_dir = out / name
    start = time.time()
    key, n_parts, listing = _plan(stage, cfg, out)
    views = stage.views(cfg) if stage.views is not None else None
    previous, reused = keep_previous(stage_dir, key, views, force) if views else (None, ())
    action = prepare(stage_dir, key, force)
    if listing is not None:
        if action == "skip":
            listing.unlink(missing_ok=True)
        else:
            publish(listing, stage_dir / schema.LISTING)
    if action == "skip":
        record = success(stage_dir) or {}
        log(f"{name}: up to date ({record.get('rows')} rows), skipped")
        return {**record, "skipped": True}
    remove_temporaries(stage_dir)
    log(f"{name}: {'resuming' if action == 'resume' else 'running'}")
    ray_.ensure()
    if isinstance(stage, PartStage):
        plan, planned_on = PartPlan(key.fingerprint, n_parts), set[str]()
        if not stage.plans_fingerprint:
            plan, planned_on = _plan_in_tasks(stage, cfg, out, key.fingerprint)
        rows, nodes = _run_parts(stage, cfg, stage_dir, plan, (previous, reused))
        nodes |= planned_on
        stats = stage.stats(stage.inputs(out, declared_sides()))
        if reused:
            stats = {**stats, "reused_views": list(reused)}
    elif isinstance(stage, PartitionedStage) and stage.partitioned(cfg, stage.inputs(out, declared_sides())):
        _set_aside_untrusted(stage, stage_dir)
        rows, stats, nodes = run_partitioned(stage, cfg, out, cfg.progress)
        stats = {**stats, "path": "partitioned"}
    else:
        assert isinstance(stage, WholeStage)
        rows, stats, node = _run_whole(stage, cfg, out)
        stats, nodes = ({**stats, "path": "single"} if isinstance(stage, PartitionedStage) else stats), {node}
    seconds = time.time() - start
    record = finish(stage_dir, name, key, to_dict(stage.section(cfg)), rows, seconds, stats, sorted(nodes), views)
    drop_previous(stage_dir)
    log(f"{name}: {rows} rows in {record['seconds']:.1f}s -> {stage_dir}")
    for warning in stats.get("warnings", ()):
        log(f"{name}: warning: {warning}")
    return {**record, "skipped": False}


def _plan(stage: Stage, cfg: CurateConfig, out: Location) -> tuple[RunKey, int, Path | None]:
    """The stage's run key (config hash, input fingerprint). A per-part stage whose work list decides its fingerprint
    (ingest: the files it lists) writes it here; the others plan in a Ray task once they have work
    (:func:`_plan_in_task`): their work list holds a row per image, which the driver never should."""
    uses = stage.uses(cfg) if stage.uses is not None else None
    fingerprint = fingerprint_of(*(success(out / s) for s in stage.reads), uses=uses)
    if stage.extra_fingerprint is not None:
        fingerprint = hashlib.blake2b(
            f"{fingerprint}|{stage.extra_fingerprint(cfg)}".encode(), digest_size=8
        ).hexdigest()
    section_hash = config_hash(stage.section(cfg))
    if not isinstance(stage, PartStage) or not stage.plans_fingerprint:
        return RunKey(section_hash, fingerprint), 0, None
    listing = scratch_file(out / f"{stage.name}{schema.LISTING}")  # beside OUT's stage folders, or a local file
    assert stage.plan is not None, f"{stage.name}: a stage whose plan decides its fingerprint plans in one call"
    with disk_errors(listing):
        plan = stage.plan(cfg, stage.inputs(out, declared_sides()), fingerprint, listing)
    return RunKey(section_hash, plan.fingerprint), plan.n_parts, listing


def _plan_in_tasks(stage: PartStage, cfg: CurateConfig, out: Location, fingerprint: str) -> tuple[PartPlan, set[str]]:
    """Write the stage's work list in a Ray task, which moves it into place, or (``plan_work``) as listing files
    by partitioned steps over the cluster; the plan and the nodes that made it."""
    if stage.plan_work is not None:
        return _plan_partitioned(stage, cfg, out, fingerprint)
    task = ray.remote(num_cpus=1, max_retries=cfg.ray.max_task_retries)(_plan_task)
    try:
        n_parts, node = ray.get(task.remote(stage.name, cfg, str(out), fingerprint))
    except Exception as exc:
        raise_own(exc)
        raise
    return PartPlan(fingerprint, int(n_parts)), {node}


def _plan_partitioned(
    stage: PartStage, cfg: CurateConfig, out: Location, fingerprint: str
) -> tuple[PartPlan, set[str]]:
    """The listing files in ``STAGE/_listing/``, one output of the stage's ``plan_work`` each."""
    assert stage.plan_work is not None
    stage_dir = out / stage.name
    _drop_single_listing(stage_dir)
    work = stage.plan_work(cfg, stage.inputs(out, declared_sides()))
    listing = stage_dir / schema.LISTING
    _, stats, nodes = run_work(stage.name, (), work, listing, cfg, cfg.progress, label=f"{stage.name} plan")
    return PartPlan(fingerprint, int(stats["n_parts"]), tuple(stats["listing_rows"])), nodes


def _drop_single_listing(stage_dir: Location) -> None:
    """A work list in one file, from an lvdkit that planned this stage in one task: its parts follow another layout
    than the listing files', so an interrupted run's parts are redone, not resumed."""
    old = stage_dir / schema.LISTING
    if old.is_file():
        for part in part_files(stage_dir):
            part.unlink()
        old.unlink()


def _plan_task(name: str, cfg: CurateConfig, out: str, fingerprint: str) -> tuple[int, str]:
    stage = STAGES[name]
    assert isinstance(stage, PartStage)
    target = location(out) / name / schema.LISTING
    listing = scratch_file(target)
    with disk_errors(listing):
        assert stage.plan is not None
        plan = stage.plan(cfg, stage.inputs(location(out), declared_sides()), fingerprint, listing)
        publish(listing, target)
    return plan.n_parts, node_id()


def _run_parts(
    stage: PartStage,
    cfg: CurateConfig,
    stage_dir: Location,
    plan: PartPlan,
    previous: tuple[Path | None, tuple[str, ...]],
) -> tuple[int, set[str]]:
    n_parts = plan.n_parts
    _set_aside_untrusted(stage, stage_dir)
    done = {p.name for p in part_files(stage_dir)}
    pending = [i for i in range(n_parts) if part_name(i) not in done]
    if done:
        log(f"{stage.name}: {len(done)} of {n_parts} parts already done, {len(pending)} to go")
    if pending:
        actors = stage.actors(cfg) if stage.actors is not None else None
        work = stage.work(cfg, stage_dir / schema.LISTING, plan)
        if previous[0] is not None:
            log(f"{stage.name}: reusing {', '.join(previous[1])} from {previous[0]}")
            work.reuse(previous[0], previous[1])
        run = PartRun(
            stage=stage.name,
            work=work,
            stage_dir=str(stage_dir),
            hooks=faults.Hooks.for_stage(stage.name),
            retries=max(0, cfg.ray.max_task_retries),
            on_error=cfg.on_part_error,
            threads=actor_threads(actors) if actors is not None else 1,
        )
        nodes = map_parts(run, pending, actors, cfg.progress)
    else:
        nodes = set()
    written = {p.name for p in part_files(stage_dir)}  # one listing, not a request per part on object storage
    missing = [i for i in range(n_parts) if part_name(i) not in written]
    if missing:
        raise StageError(f"{stage.name}: parts {missing[:10]} produced no output")
    return sum(_parquet_rows(p) for p in part_files(stage_dir)), nodes


TORN = "_torn"  # parts that could not be read back (torn, or not lvdkit's), moved aside and redone


def _set_aside_untrusted(stage: Stage, stage_dir: Location) -> None:
    """Move aside every part (with its part in each sub-folder) that does not match its commit record (torn,
    changed, or not lvdkit's), so the part is redone instead of wedging every later read."""
    for part in part_files(stage_dir):
        files = [part, *(stage_dir / sub / part.name for sub in stage.subparts)]
        bad = {f: why for f in files if f.exists() and (why := untrusted(f)) is not None}
        if not bad:
            continue
        for f in files:
            if f.exists():
                aside = stage_dir / TORN / f.relative_to(stage_dir).as_posix().replace("/", "__")
                aside.parent.mkdir(exist_ok=True)
                replace(f, aside)
        named = ", ".join(f"{f} ({why})" for f, why in bad.items())
        log(f"{stage.name}: {named}: not as committed (torn or not lvdkit's): moved to {stage_dir / TORN}/, redone")


def _run_whole(stage: WholeStage, cfg: CurateConfig, out: Location) -> tuple[int, dict[str, Any], str]:
    task = ray.remote(num_cpus=1, max_retries=cfg.ray.max_task_retries)(_whole_task)
    hooks = faults.Hooks.for_stage(stage.name)
    try:
        return ray.get(task.remote(stage.name, cfg, str(out), hooks))  # type: ignore[no-any-return]
    except Exception as exc:
        raise_own(exc)
        raise


def _whole_task(name: str, cfg: CurateConfig, out: str, hooks: faults.Hooks) -> tuple[int, dict[str, Any], str]:
    stage = STAGES[name]
    assert isinstance(stage, WholeStage)
    result = stage.run(cfg, stage.inputs(location(out), declared_sides()))
    stage_dir = location(out) / name
    write_sides(stage.name, stage.sides, result, stage_dir)
    table = result.table
    for k, start in enumerate(range(0, max(table.num_rows, 1), WHOLE_STAGE_PART_ROWS)):
        commit_part(table.slice(start, WHOLE_STAGE_PART_ROWS), stage_dir / part_name(k), hooks)
    hooks.pause()  # a test kills the run here: parts written, no _SUCCESS yet
    return table.num_rows, result.stats, node_id()


def _parquet_rows(path: Location) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def run(cfg: CurateConfig, stages: tuple[str, ...] = CURATE_ORDER, force: bool = False) -> dict[str, Any]:
    """Run ``stages`` in order in one Ray session; write ``config.yaml``, ``status.parquet`` and ``summary.json``."""
    check_embedding_keys(cfg, stages)
    absolute_paths(cfg)
    out = location(cfg.out)
    _check_inputs(cfg, out)
    with disk_errors(out / "config.yaml"):
        claim(out)
    with locked(out):
        save_config(cfg, out / "config.yaml")
        return _run_locked(cfg, out, stages, force)


def absolute_paths(cfg: CurateConfig) -> None:
    """Make the local paths of ``cfg`` (OUT, inputs, protected and seed sets, model files) absolute, here on the
    driver: tasks on a cluster run in other working folders, where a relative path names something else."""

    def local(entries: list[str]) -> list[str]:
        return [e if "://" in e else os.path.abspath(os.path.expanduser(e)) for e in entries]

    if not is_uri(cfg.out):
        cfg.out = os.path.abspath(os.path.expanduser(str(cfg.out).removeprefix("file://")))
    cfg.ingest.inputs = local(cfg.ingest.inputs)
    cfg.dedup_relative.protected = local(cfg.dedup_relative.protected)
    for seed_set in cfg.retrieve.seed_sets.values():
        seed_set.inputs = local(seed_set.inputs)
    cfg.embed.models = {k: os.path.abspath(v) if os.path.isfile(v) else v for k, v in cfg.embed.models.items()}


def _check_inputs(cfg: CurateConfig, out: Location) -> None:
    """OUT may overlap no input folder (pool, protected images, seeds)."""
    check_not_inside_inputs(out, cfg.ingest.inputs)
    check_not_inside_inputs(out, cfg.dedup_relative.protected, "dedup_relative.protected")
    for name, seed_set in cfg.retrieve.seed_sets.items():
        check_not_inside_inputs(out, seed_set.inputs, f"retrieve.seed_sets.{name}.inputs")


def _run_locked(cfg: CurateConfig, out: Location, stages: tuple[str, ...], force: bool) -> dict[str, Any]:
    with ray_session(out, cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory_mb) as lazy:
        ran = [not run_stage(name, cfg, lazy, force=force)["skipped"] for name in stages]
        previous = read_json(out / SUMMARY_FILE)
        current = previous is not None and previous.get("fingerprint") == summary_fingerprint(out)
        if previous is not None and current and not any(ran) and (out / STATUS_FILE).exists():
            return previous  # nothing changed: the status table and summary on disk are current
        hooks = faults.Hooks.for_stage("summary")
        if lazy.started_here:
            try:
                return _summarise(out, hooks, cfg.ray.max_task_retries)
            except Exception as exc:
                raise_own(exc)
                raise
    # no stage ran: no Ray started for it (one part in memory at a time all the same)
    return write_summary(out, after_status=hooks.pause)


def _summarise(out: Location, hooks: faults.Hooks, retries: int) -> dict[str, Any]:
    """The status table part by part in Ray tasks (one per ingest part, spread over the nodes), sharing the
    duplicates resolved once in a task; joined into ``status.parquet`` by one streaming task. The driver holds the
    parts' counts only."""
    options: dict[str, Any] = {"num_cpus": 1, "max_retries": retries}
    refs: Any = ray.remote(num_returns=2, **options)(removed_in).remote(out)  # (duplicates, how many per stage)
    dups, named = refs
    n_parts = n_status_parts(out)
    part = ray.remote(scheduling_strategy="SPREAD", **options)(write_status_part)
    counts = ray.get([part.remote(out, dups, i) for i in range(n_parts)])
    ray.get(ray.remote(**options)(join_status_parts).remote(out, n_parts))
    hooks.pause()  # LVDKIT_TEST_STAGE_DELAY=summary:S: a test kills the run with the status written, the funnel not
    return write_funnel(out, counts, dict(ray.get(named)))


def check_embedding_keys(cfg: CurateConfig, stages: tuple[str, ...]) -> None:
    """Fail before any work when a stage reads an embedding that embed.models does not produce."""
    wanted = {
        "dedup_copy": cfg.dedup_copy.embedding,
        "dedup_relative": cfg.dedup_relative.embedding if cfg.dedup_relative.protected else None,
        "cluster": cfg.cluster.embedding,
        "retrieve": cfg.retrieve.embedding if cfg.retrieve.seed_sets else None,
        "curated": cfg.curated.embedding,
    }
    bad = {s: k for s, k in wanted.items() if s in stages and k is not None and k not in cfg.embed.models}
    if bad:
        listing = ", ".join(f"{s}.embedding={k!r}" for s, k in bad.items())
        raise ValueError(
            f"{listing}: not a key of embed.models ({', '.join(cfg.embed.models) or 'none'}); "
            "add the model to embed.models or point these keys at one that is there"
        )
