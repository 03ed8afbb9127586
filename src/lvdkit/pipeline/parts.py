"""Running a per-part stage: one Ray Data task (or one call on an actor pool) per pending part.

Each part is loaded, processed (retried in its task; then row by row to find the rows that fail on their own, which
fail the stage or are quarantined per ``on_part_error``) and written atomically: first one file per declared
sub-folder, then the part itself, whose existence marks the part done. A worker that dies is retried by Ray
(``ray.max_task_retries``). Failed parts are reported after the others have finished (and are kept).
"""

from __future__ import annotations

import math
import pickle
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from lvdkit.core import schema
from lvdkit.core.files import image_id
from lvdkit.core.io import DiskFullError, is_disk_full, part_name
from lvdkit.core.stage import PartWork
from lvdkit.core.storage import Location, location
from lvdkit.pipeline import faults
from lvdkit.pipeline.commits import commit_part
from lvdkit.pipeline.errors import (
    INFLIGHT,
    StageError,
    crash_message,
    describe,
    failed_parts_message,
    is_own,
    own_text,
    raise_own,
    raise_own_text,
)
from lvdkit.pipeline.kinds import Actors


@dataclass(frozen=True)
class PartRun:
    """What every part task of one stage run needs (picklable, handed to the tasks)."""

    stage: str
    work: PartWork
    stage_dir: str
    hooks: faults.Hooks
    retries: int
    on_error: str
    threads: int = 1


def map_parts(run: PartRun, pending: list[int], actors: Actors | None, progress: bool) -> set[str]:
    """Process and write every pending part; raise :class:`StageError` naming the parts that failed. Returns the
    Ray nodes the parts ran on."""
    ds: ray.data.Dataset = ray.data.from_items([{"part": i} for i in pending], override_num_blocks=len(pending))
    if actors is not None and run.work.decodes:
        check_decode_room(actors)
        ds = ds.map_batches(
            _decode_parts,  # type: ignore[arg-type]
            fn_kwargs={"run": run},
            batch_size=1,
            num_cpus=actors.decode_cpus,
            max_retries=run.retries,
        )
    if actors is None:
        results = ds.map_batches(
            _write_parts,  # type: ignore[arg-type]
            fn_kwargs={"run": run},
            batch_size=1,
            num_cpus=1,
            max_retries=run.retries,  # Ray Data's default retries a dying worker forever
        )
    else:
        # the run travels inside the class (pickled by value), not as constructor arguments in the object store,
        # which a restarted actor could not get back once they are gone (ray-project/ray#53727)
        actor = type("_PartActor", (_PartActor,), {"RUN": run})
        results = ds.map_batches(
            actor,  # type: ignore[arg-type]
            batch_size=1,
            concurrency=(actors.min_replicas, actors.replicas) if actors.min_replicas else actors.replicas,
            num_cpus=actors.num_cpus,
            num_gpus=actors.num_gpus,
            max_restarts=run.retries,
            max_task_retries=run.retries,
        )
    failures: list[str] = []
    nodes: set[str] = set()
    try:
        with tqdm(total=len(pending), desc=run.stage, unit="part", disable=not progress, file=sys.stderr) as bar:
            for row in results.iter_rows():
                if row["disk_full"]:
                    raise DiskFullError(str(row["disk_full"]))
                if row["raised"]:
                    raise_own_text(str(row["raised"]))
                if row["error"]:
                    failures.append(str(row["error"]))
                nodes.update(str(n) for n in (row["node"], row["decode_node"]) if n)
                bar.update(1)
                bar.set_postfix(rows=int(row["rows"]), refresh=False)
    except Exception as exc:
        if is_own(exc):
            raise
        raise_own(exc)
        raise StageError(crash_message(run.stage, location(run.stage_dir), run.work, run.retries, exc)) from exc
    if failures:
        raise StageError(failed_parts_message(run.stage, failures, len(pending), run.retries, run.on_error))
    return nodes


def actor_threads(actors: Actors) -> int:
    """Intra-op threads per replica: configured, or its own CPU reservation (rounded up: a model on 1.5 CPUs
    uses two threads while a half-CPU decode task shares the node)."""
    if actors.threads:
        return actors.threads
    return max(1, math.ceil(actors.num_cpus))


def cpu_actor_share(actors: int, decode_cpus: float) -> float:
    """CPUs per model actor on CPU nodes: the smallest node's CPUs, less one decode task's, shared among the
    actors it holds when the actors are spread evenly over the nodes (a one-CPU node: half for each)."""
    cpus = _node_cpus()
    if not cpus:
        return 1.0
    per_node = math.ceil(actors / len(cpus))
    return max(min(cpus) / (per_node + 1), (min(cpus) - decode_cpus) / per_node)


def check_decode_room(actors: Actors) -> None:
    """Fail at once, naming the keys, where the cluster cannot hold the model actors and a decode task at the same
    time (Ray would wait for the CPUs forever)."""
    total = sum(_node_cpus())
    need = (actors.min_replicas or actors.replicas) * actors.num_cpus + actors.decode_cpus
    if total and need > total:
        raise ValueError(
            f"embed: {actors.min_replicas or actors.replicas} model actor(s) of embed.actor_cpus={actors.num_cpus:g} "
            f"and a decode task of embed.decode_cpus={actors.decode_cpus:g} need {need:g} CPUs; the Ray cluster has "
            f"{total:g}. Lower them, or leave embed.actor_cpus null (sized from the nodes)"
        )


def _node_cpus() -> list[float]:
    return [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0.0) > 0]


class _PartActor:
    """Ray Data actor for stages whose work holds models: set up once, then write parts like a task."""

    RUN: PartRun  # set on a subclass made per stage run

    def __init__(self) -> None:
        self.run = self.RUN
        self.run.work.setup(self.run.threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _write_parts(batch, self.run)


DECODED = "decoded"  # a decode task's output per part: its rows and what PartWork.decode made of them, pickled


def _decode_parts(batch: dict[str, np.ndarray], run: PartRun) -> dict[str, np.ndarray]:
    """Ray Data UDF, a CPU task: load and decode each part in the batch, so the actors holding models only run them.

    A part that fails here goes on undecoded: the actor redoes it with the retries, row isolation and error reports
    every part gets, instead of this task failing the whole dataset.
    """
    payloads = []
    for index in map(int, batch["part"]):
        try:
            rows = run.work.load(index)
            payloads.append(pickle.dumps((rows, run.work.decode(rows)), protocol=5))
        except Exception:
            payloads.append(b"")
    node = ray.get_runtime_context().get_node_id()
    return {"part": batch["part"], DECODED: np.asarray(payloads, dtype=object), "decode_node": _same(node, payloads)}


def _same(value: str, like: list[Any]) -> np.ndarray:
    return np.asarray([value] * len(like), dtype=object)


def _write_parts(batch: dict[str, np.ndarray], run: PartRun) -> dict[str, np.ndarray]:
    """Ray Data UDF: process each part index in the batch and write its files atomically (idempotent).

    Returns per part its rows, and an error message instead when it failed (``on_error=fail``) or the disk is full.
    """
    rows, errors, disk, raised = [], [], [], []
    decoded = batch.get(DECODED)
    for k, index in enumerate(map(int, batch["part"])):
        n, error, full, own = 0, "", "", ""
        target = location(run.stage_dir) / part_name(index)
        marker = target.parent / f".{target.name}{INFLIGHT}"
        try:
            marker.touch()
            run.hooks.before_part()
            n, error = _write_part(run, index, target, bytes(decoded[k]) if decoded is not None else b"")
        except DiskFullError as exc:
            full = str(exc)
        except Exception as exc:
            own = own_text(exc)
            if not own:
                raise
        finally:
            marker.unlink(missing_ok=True)
        rows.append(n)
        errors.append(error)
        disk.append(full)
        raised.append(own)
    return {
        "part": batch["part"],
        "rows": np.asarray(rows, dtype=np.int64),
        "error": np.asarray(errors, dtype=object),
        "disk_full": np.asarray(disk, dtype=object),
        "raised": np.asarray(raised, dtype=object),
        "node": _same(ray.get_runtime_context().get_node_id(), rows),
        "decode_node": batch["decode_node"] if "decode_node" in batch else _same("", rows),
    }


def _write_part(run: PartRun, index: int, target: Location, decoded: bytes) -> tuple[int, str]:
    """Process part ``index`` (``decoded``: a decode task's payload, or empty) and write its files, sub-folders
    first; (rows, error message)."""
    outputs, left_out, error = _process_part(run, index, decoded)
    if outputs is None:
        return 0, error
    if left_out is not None:  # before the part: the part's committed existence marks the part done
        commit_part(left_out, target.parent / schema.QUARANTINED / target.name, run.hooks)
    for sub, table in outputs.items():
        if sub:
            commit_part(table, target.parent / sub / target.name, run.hooks)
    commit_part(outputs[""], target, run.hooks)
    run.hooks.pause()  # a test kills the run here, between parts
    return outputs[""].num_rows, ""


Outputs = dict[str, pa.Table]


def _as_outputs(result: pa.Table | dict[str, pa.Table]) -> Outputs:
    return result if isinstance(result, dict) else {"": result}


def _process_part(run: PartRun, index: int, payload: bytes) -> tuple[Outputs | None, pa.Table | None, str]:
    """(outputs, rows left out, error): the whole part, retried; then, if it keeps failing, row by row to find
    the rows that fail on their own, which fail the part or are quarantined."""
    work, last = run.work, None
    rows, decoded = pickle.loads(payload) if payload else (None, None)  # written by our own decode task
    for _ in range(run.retries + 1):
        try:
            rows = work.load(index) if rows is None else rows
            run.hooks.check(index, work.uris(rows))
            return _as_outputs(work.process(rows, decoded)), None, ""
        except Exception as exc:
            if is_disk_full(exc):
                raise DiskFullError.writing(getattr(exc, "filename", None) or f"part {index}", exc) from exc
            last, decoded = exc, None  # a retry reads the part again, here
    if rows is None:
        return None, None, f"part {index}: cannot read its work list: {describe(last)}"
    if not work.may_quarantine and last is not None:
        raise last  # the work's own error says what is wrong and what to do
    return _isolate(run, index, rows, last)


def _isolate(run: PartRun, index: int, rows: pa.Table, last: BaseException | None) -> tuple[Any, Any, str]:
    """Process a failing part row by row: rows that fail on their own fail the part or are quarantined."""
    work = run.work
    pieces: list[Outputs] = []
    bad: list[tuple[str, BaseException]] = []
    left_out: list[tuple[str, str, str]] = []
    for k in range(rows.num_rows):
        item = rows.slice(k, 1)
        try:
            run.hooks.check(index, work.uris(item))
            pieces.append(_as_outputs(work.process(item)))
        except Exception as exc:
            if is_disk_full(exc):
                raise DiskFullError.writing(getattr(exc, "filename", None) or f"part {index}", exc) from exc
            bad.append((work.uris(item)[0], exc))
            if run.on_error == "quarantine":
                reason = str(getattr(exc, "reason", schema.REASON_PROCESSING))
                stand_in = work.quarantined(item, reason, describe(exc))
                if stand_in is not None:
                    pieces.append({"": stand_in})
                else:
                    left_out.append((bad[-1][0], reason, describe(exc)))
    if bad and run.on_error != "quarantine":
        named = "; ".join(f"{uri}: {describe(exc)}" for uri, exc in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        return None, None, f"part {index}: {named}{more}"
    if not bad and not pieces:  # an empty part that fails: nothing to blame on a row
        return None, None, f"part {index}: {describe(last)}"
    outputs = _concat(pieces) if pieces else _as_outputs(work.process(rows.slice(0, 0)))
    return outputs, _left_out_table(left_out), ""


def _concat(pieces: list[Outputs]) -> Outputs:
    keys = dict.fromkeys(k for p in pieces for k in p)
    return {k: pa.concat_tables([p[k] for p in pieces if k in p]) for k in keys}


def _left_out_table(left_out: list[tuple[str, str, str]]) -> pa.Table | None:
    if not left_out:
        return None
    uris, reasons, details = (list(col) for col in zip(*left_out, strict=True))
    ids = [image_id(u) for u in uris]
    return pa.table({schema.IMAGE_ID: ids, schema.URI: uris, schema.ERROR: reasons, schema.ERROR_DETAIL: details})
