"""The driver side of ``lvdkit pretrain``: data, Ray Train's ``TorchTrainer``, progress, resume, final record.

The run folder ``OUT`` is Ray Train's run directory too (``storage_path=OUT/..``, ``name=OUT.name``): Ray keeps the
last ``keep_checkpoints`` checkpoints there, and a second start with the same ``OUT`` continues from the latest.
lvdkit refuses that unless ``resume=true``, so an old run is never continued by accident.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from lvdkit.core.io import DiskFullError, is_disk_full
from lvdkit.core.settings import save_config, to_dict
from lvdkit.core.stage import SUCCESS, StageInputs
from lvdkit.core.storage import Location, ObjectPath, fs_paths, is_uri, location
from lvdkit.pretrain.augment import AugmentBatch, decodes_on_device
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.init_weights import init_path, is_hub
from lvdkit.pretrain.sharding import SHARDED_DIR
from lvdkit.pretrain.stream import ReadRowGroups, RowGroups, stream_indices
from lvdkit.pretrain.train import META_FILE, METRICS_FILE, STATE_FILE, local_run_folder, train_loop_per_worker

FINAL_FILE = "final.json"


def parquet_files(data: str | Path, image_column: str) -> list[Location]:
    """The Parquet files of ``data`` (a file, or a folder's ``part-*.parquet`` / ``*.parquet``; local or a URI),
    checked for the image-bytes column."""
    path = location(data)
    files: list[Location] = [path] if path.is_file() else _committed_parts(path)
    files = files or sorted(path.glob("part-*.parquet"), key=str) or sorted(path.rglob("*.parquet"), key=str)
    if not files and not path.exists():
        raise FileNotFoundError(f"pretraining data not found: {path} (run `make curate`, or point data= at Parquet)")
    if not files:
        raise FileNotFoundError(f"no Parquet files in {path}")
    fs, paths = fs_paths(files[:1])
    names = pq.read_schema(paths[0], filesystem=fs).names
    if image_column not in names:
        raise ValueError(f"{files[0]} has no {image_column!r} column (columns: {names}); set image_column=")
    return files


def _committed_parts(folder: Location) -> list[Location]:
    """A finished lvdkit stage folder's parts as its ``_SUCCESS`` lists them (no part left by a killed run, none
    of its sub-folders' tables); [] for any other folder."""
    if not (folder / SUCCESS).is_file():
        return []
    return StageInputs(str(folder.parent), (folder.name,)).parts(folder.name)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it has registered


def _has_state(folder: Location) -> bool:
    """A full state (DDP, one worker) or a sharded one's metadata (FSDP: written once every rank's part is in)."""
    return (folder / STATE_FILE).is_file() or (folder / SHARDED_DIR / ".metadata").is_file()


def checkpoints(out: Location) -> list[Location]:
    """The run's checkpoints that Ray Train registered (what it resumes from), oldest step first.

    A folder Ray uploaded but had not registered when the run was killed is left out: Ray would not resume from it,
    and its copy may be incomplete. Without a readable snapshot, every complete-looking folder counts.
    """
    found = [p for p in out.glob("checkpoint_*") if _has_state(p) and (p / META_FILE).is_file()]
    try:
        results = json.loads((out / RAY_SNAPSHOT).read_text())["checkpoint_results"]
        registered = {r["checkpoint_dir_name"] for r in results}
    except (OSError, ValueError, KeyError, TypeError):
        registered = None
    if registered is not None:
        found = [p for p in found if p.name in registered]
    return sorted(found, key=lambda p: (json.loads((p / META_FILE).read_text())["step"], p.name))


def latest_checkpoint(out: str | Location) -> Location:
    found = checkpoints(location(str(out)))
    if not found:
        raise FileNotFoundError(f"no checkpoint in {out} (a finished or interrupted `lvdkit pretrain` run folder)")
    return found[-1]


def plan(cfg: PretrainConfig, n_images: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps): every worker takes ``n_images / num_workers`` rows in full
    optimizer-step batches of ``batch_size * accumulate_steps`` images."""
    per_worker = n_images // cfg.num_workers
    o = cfg.optim
    steps_per_epoch = per_worker // o.step_batch
    if steps_per_epoch < 1:
        what = f"{o.batch_size}" if o.accumulate_steps == 1 else f"{o.batch_size} x {o.accumulate_steps} accumulated"
        raise ValueError(
            f"{n_images} images over {cfg.num_workers} worker(s) make no full batch of {what}: "
            "lower optim.batch_size, optim.accumulate_steps or num_workers"
        )
    return steps_per_epoch, steps_per_epoch * o.epochs


def absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """A copy of ``cfg`` with its local paths made absolute: Ray Train workers run in their own working folders."""
    cfg = copy.deepcopy(cfg)
    cfg.out = cfg.out if is_uri(cfg.out) else str(Path(cfg.out).expanduser().resolve())
    cfg.data = cfg.data if is_uri(cfg.data) else str(Path(cfg.data).expanduser().resolve())
    teacher = cfg.distill.teacher
    local = teacher.removeprefix("lvdkit:")
    if local.endswith(".safetensors") and "://" not in local:
        cfg.distill.teacher = str(Path(local).expanduser().resolve())
    if cfg.distill.teacher_checkpoint:
        cfg.distill.teacher_checkpoint = str(Path(cfg.distill.teacher_checkpoint).expanduser().resolve())
    if cfg.eval.data and not is_uri(cfg.eval.data):
        cfg.eval.data = str(Path(cfg.eval.data).expanduser().resolve())
    if cfg.init and not is_hub(cfg.init) and "://" not in cfg.init:
        cfg.init = str(Path(cfg.init.removeprefix("lvdkit:")).expanduser().resolve())
    return cfg


def _resume_epoch(cfg: PretrainConfig, out: Location, steps_per_epoch: int) -> int:
    """The epoch the latest checkpoint is in (0 for a fresh run): where the data stream starts."""
    found = checkpoints(out) if cfg.resume else []
    return json.loads((found[-1] / META_FILE).read_text())["step"] // steps_per_epoch if found else 0


def _check_out(cfg: PretrainConfig, out: Location) -> dict[str, Any] | None:
    """The finished record if this exact run is done; raises if OUT holds another run and resume is off."""
    final = out / FINAL_FILE
    if final.is_file():
        record = json.loads(final.read_text())
        if record.get("config_hash") == _identity(cfg):
            return record
    found = checkpoints(out)
    if found and not cfg.resume:
        raise FileExistsError(
            f"{out} already holds a pretraining run (checkpoints up to step "
            f"{json.loads((found[-1] / META_FILE).read_text())['step']}): pass resume=true to continue "
            "it, or choose another out="
        )
    return None


def _identity(cfg: PretrainConfig) -> str:
    """A hash of what defines a run's result (not where or how fast it runs)."""
    data = to_dict(cfg)
    for key in ("resume", "progress", "ray", "max_failures", "cpus_per_worker", "tensorboard", "torch_threads", "eval"):
        data.pop(key)
    return hashlib.blake2b(json.dumps(data, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume, or skip when finished) the pretraining described by ``cfg``; returns the final record."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from lvdkit.core.ray_env import ray_session

    cfg = absolute_paths(cfg)
    out = location(cfg.out)
    done = _check_out(cfg, out)
    if done is not None:
        print(f"pretraining in {out} already finished at step {done['step']} (same config): skipped")
        return done
    files = parquet_files(cfg.data, cfg.image_column)
    if cfg.init and not is_hub(cfg.init):
        init_path(cfg.init)  # a missing init file fails here, not inside a Ray Train worker
    if cfg.eval.data and not Path(cfg.eval.data).exists():
        raise FileNotFoundError(f"eval.data not found: {cfg.eval.data} (a labeled folder or Parquet, as eval knn)")
    fs, paths = fs_paths(files)
    groups = RowGroups.of(paths, fs)
    n_images = groups.rows
    steps_per_epoch, total_steps = plan(cfg, n_images)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    local = local_run_folder(cfg.out)  # Ray's temporary files stay on local disk when OUT is on object storage
    with ray_session(local, cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory_mb) as lazy:
        lazy.ensure()
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
        cpus = cfg.cpus_per_worker or (1.0 if use_gpu else 0.5)  # fractional: Ray Data needs CPU to decode
        start_epoch = _resume_epoch(cfg, out, steps_per_epoch)
        views = AugmentBatch(cfg.method, cfg.crops, cfg.image_column, decodes_on_device(cfg.crops, use_gpu))
        read = ReadRowGroups(groups, cfg.image_column, fs, cfg.seed, start_epoch, transform=views)
        indices = stream_indices(groups, start_epoch, cfg.optim.epochs)
        dataset = ray.data.from_numpy(indices).map_batches(read, batch_size=1)  # one block of indices per task
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": to_dict(cfg),
                "n_images": n_images,
                "total_steps": total_steps,
                "steps_per_epoch": steps_per_epoch,
                "first_step": start_epoch * steps_per_epoch,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.num_workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})},
            ),
            run_config=_run_config(cfg, out),
            datasets={"train": dataset},
        )
        accumulate = f", {cfg.optim.accumulate_steps} micro-batches a step" if cfg.optim.accumulate_steps > 1 else ""
        print(
            f"pretraining {cfg.method} {cfg.model} on {n_images} images: {total_steps} steps "
            f"({cfg.optim.epochs} epochs x {steps_per_epoch}{accumulate}), {cfg.num_workers} worker(s), "
            f"{'GPU' if use_gpu else 'CPU'}; run folder {out}",
            flush=True,
        )
        progress = _Progress(local / METRICS_FILE, total_steps, cfg.progress)
        with progress, _disk_full_names_the_file(out):
            result = trainer.fit()
    last = latest_checkpoint(out)
    meta = json.loads((last / META_FILE).read_text())
    record = {
        "step": meta["step"],
        "total_steps": total_steps,
        "checkpoint": str(last),
        "method": cfg.method,
        "model": cfg.model,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
        "config_hash": _identity(cfg),
    }
    (out / FINAL_FILE).write_text(json.dumps(record, indent=2))
    return record


def _run_config(cfg: PretrainConfig, out: Location) -> Any:
    """Ray Train's run folder is ``out`` (its parent as the storage path, its name as the run name), on local or
    shared disk or on object storage (then through lvdkit's filesystem for the bucket, endpoint included)."""
    import ray.train

    return ray.train.RunConfig(
        name=out.name,
        storage_path=out.parent.path if isinstance(out, ObjectPath) else str(out.parent),
        storage_filesystem=out.fs if isinstance(out, ObjectPath) else None,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
    )


@contextlib.contextmanager
def _disk_full_names_the_file(out: Location) -> Iterator[None]:
    """A worker that ran out of disk fails the run with Ray Train's wrapper around its error: say which file could
    not be written and which checkpoint a resume starts from, as ``lvdkit: error:``."""
    try:
        yield
    except Exception as exc:
        found = re.search(r"disk full: no space left on device while writing (.+?)(?: \(|$)", str(exc), re.M)
        if found is None and not is_disk_full(exc):
            raise
        where = found.group(1) if found else str(out)
        kept = checkpoints(out)
        resume = f"the checkpoint at step {_step_of(kept[-1])} is kept" if kept else "no checkpoint was written yet"
        raise DiskFullError(
            f"disk full: no space left on device while writing {where}; {resume}. Free space (or move out=) and "
            "rerun with resume=true"
        ) from None


def _step_of(checkpoint: Location) -> int:
    return int(json.loads((checkpoint / META_FILE).read_text())["step"])


class _Progress:
    """A driver-side progress bar fed by rank 0's metrics file (Ray Train's workers run in other processes)."""

    def __init__(self, metrics: Path, total: int, enabled: bool) -> None:
        self.metrics, self.total, self.enabled = metrics, total, enabled
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> _Progress:
        if self.enabled:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.enabled:
            self.thread.join(timeout=5)

    def _follow(self) -> None:
        from tqdm import tqdm

        offset = self.metrics.stat().st_size if self.metrics.exists() else 0
        with tqdm(total=self.total, desc="pretrain", unit="step", dynamic_ncols=True) as bar:
            while not self.stop.is_set():
                time.sleep(1.0)
                if not self.metrics.exists():
                    continue
                with self.metrics.open() as f:
                    f.seek(offset)
                    lines = f.readlines()
                    offset = f.tell()
                for line in lines:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    bar.n = int(row["step"])
                    bar.set_postfix(loss=f"{row['loss']:.3f}", ips=f"{row['images_per_s']:.0f}")
                bar.refresh()
