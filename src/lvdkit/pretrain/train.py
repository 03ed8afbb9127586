"""The per-worker training loop that Ray Train runs (``train_loop_per_worker``), and its checkpoints.

A step is one optimizer step: ``optim.batch_size * optim.accumulate_steps`` images per worker, forwarded and
back-propagated in ``accumulate_steps`` micro-batches whose gradients add up before one optimizer step; schedules,
checkpoints, the EMA teacher, the centre and the queue all count and move per optimizer step. A step's randomness
(iBOT masks, mixup, drop path) is drawn from generators seeded by (seed, rank, step, micro-batch), so a run resumed
from a checkpoint at step s draws what the uninterrupted run drew at step s. The data is one stream over all
remaining epochs; the data position is (epoch, batches consumed in it). A resumed run's driver starts the stream at
the checkpoint's epoch and the worker skips the batches of that epoch already consumed (they are still read and
augmented: Ray Data streams cannot seek).

Checkpoint folder: ``state.pt`` (model, teacher/EMA, queue or centre, optimizer: tensors only, loaded with
``torch.load(weights_only=True)``) and ``meta.json`` (step, data position, model identity).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lvdkit.core.io import disk_errors
from lvdkit.core.settings import from_dict
from lvdkit.pretrain.augment import decodes_on_device, views_of
from lvdkit.pretrain.checkpoint import (  # noqa: F401  (re-exported: run, export and tests import them from here)
    META_FILE,
    STATE_FILE,
    load_method_state,
    read_checkpoint,
    saved_state,
    write_checkpoint,
)
from lvdkit.pretrain.config import DEFAULT_WHICH, METHODS, PretrainConfig
from lvdkit.pretrain.device_views import DeviceViews
from lvdkit.pretrain.heads import cancel_last_layer_gradients
from lvdkit.pretrain.method import Method, StudentFn
from lvdkit.pretrain.monitor import KnnProbe
from lvdkit.pretrain.param_groups import apply_schedules, param_groups
from lvdkit.pretrain.ranks import check_replicas
from lvdkit.pretrain.run_log import METRICS_FILE, Metrics, local_run_folder  # noqa: F401  (re-exported)
from lvdkit.pretrain.schedules import Schedules, sqrt_scaled_lr
from lvdkit.pretrain.sharding import (
    SHARDED_DIR,
    gathered,
    init_adamw_state,
    is_sharded,
    load_sharded,
    shard,
)

# Test hook (unset in normal use): seconds each step sleeps, so a test can kill a run between checkpoints.
_STEP_DELAY_S = float(os.environ.get("LVDKIT_TEST_STEP_DELAY_S") or 0)


def build_method(cfg: PretrainConfig, n_images: int) -> Method:
    """The method module (student, teacher and their state) for ``cfg.method``."""
    if cfg.method == "dinov2":
        from lvdkit.pretrain.dinov2 import DINOv2Method

        return DINOv2Method(cfg)
    if cfg.method == "dino":
        from lvdkit.pretrain.dino import DINOMethod

        return DINOMethod(cfg)
    if cfg.method == "simclr":
        from lvdkit.pretrain.simclr import SimCLRMethod

        return SimCLRMethod(cfg)
    if cfg.method == "distillation":
        from lvdkit.pretrain.distill import DistillMethod

        return DistillMethod(cfg, n_images)
    raise ValueError(f"unknown method {cfg.method!r}; valid: {', '.join(METHODS)}")


def build_schedules(cfg: PretrainConfig, total_steps: int, steps_per_epoch: int, world: int) -> Schedules:
    """The per-optimizer-step schedules; the teacher's (momentum, temperature, frozen last layer) from ``dino`` or
    ``dinov2`` (SimCLR and distillation log them but use none). The lr is scaled by the images of one optimizer
    step over all workers, ``batch_size * accumulate_steps * world``."""
    o = cfg.optim
    t = cfg.dino if cfg.method == "dino" else cfg.dinov2
    return Schedules.dinov2(
        total_steps,
        steps_per_epoch,
        sqrt_scaled_lr(o.lr, o.step_batch * world),
        min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum_teacher,
        final_momentum_teacher=t.final_momentum_teacher,
        teacher_temp=t.teacher_temp,
        warmup_teacher_temp=t.warmup_teacher_temp,
        warmup_teacher_temp_epochs=t.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=t.freeze_last_layer_epochs if cfg.method in ("dino", "dinov2") else 0,
    )


def build_optimizer(method: Method, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW over the student with per-group lr/wd multipliers (layer decay, patch embed, no decay on norms)."""
    o = cfg.optim
    groups = param_groups(method.student, o.weight_decay, o.layer_decay, o.patch_embed_lr_mult)
    optimizer = torch.optim.AdamW(groups, betas=(o.betas[0], o.betas[1]))
    if is_sharded(method):
        init_adamw_state(optimizer)
    return optimizer


class _Curve:
    """The learning curve: k-NN of the exported network every ``eval.every`` steps when ``eval.data`` is set. Rank 0
    evaluates; with sharded weights every rank takes part (the weights are gathered for it) and rank 0 keeps the
    figures."""

    def __init__(self, cfg: PretrainConfig, method: Method, total_steps: int, rank: int) -> None:
        which = DEFAULT_WHICH[cfg.method]
        self.evaluated = method.export_module(which)[0]
        self.root: nn.Module = method.teacher if which == "teacher" else method.student  # type: ignore[assignment]
        takes_part = rank == 0 or is_sharded(method)
        self.probe = KnnProbe(cfg.eval, method.preprocess) if cfg.eval.data and takes_part else None
        self.every, self.total = cfg.eval.every or cfg.checkpoint_every, total_steps

    def __call__(self, step: int) -> dict[str, float]:
        if self.probe is None or not (step % self.every == 0 or step == self.total):
            return {}
        with gathered(self.root):
            return self.probe(self.evaluated)


def _seed_step(cfg: PretrainConfig, rank: int, step: int, micro: int = 0) -> np.random.Generator:
    """Seed torch and return a numpy generator for micro-batch ``micro`` of ``step`` (micro 0 draws what a run
    without accumulation draws)."""
    key = (cfg.seed, rank, step) if micro == 0 else (cfg.seed, rank, step, micro)
    torch.manual_seed(hash(key) % 2**62)  # tuple-of-ints hashes are stable across processes
    return np.random.default_rng(list(key))


def _resume(method: Method, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Load Ray Train's latest checkpoint into the method and optimizer, if there is one; returns its step."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        if is_sharded(method) != (Path(folder) / SHARDED_DIR).is_dir():
            raise ValueError(f"{folder}: written with another strategy than this run's; resume with the same strategy")
        if is_sharded(method):
            load_sharded(Path(folder), method, optimizer)
            return int(json.loads((Path(folder) / META_FILE).read_text())["step"])
        state, meta = read_checkpoint(Path(folder), device)
    load_method_state(method, state["method"])
    optimizer.load_state_dict(state["optimizer"])
    return int(meta["step"])


def _parallel(method: Method, cfg: PretrainConfig) -> StudentFn:
    """The student as the step calls it: sharded in place (FSDP, before the optimizer: it holds the shards) or
    wrapped by Ray Train's DDP."""
    import ray.train.torch

    if cfg.strategy == "fsdp":
        shard(method)
        return method.student
    return ray.train.torch.prepare_model(method.student, move_to_device=False, parallel_strategy="ddp")


def _stream(cfg: PretrainConfig, first_step: int, device: torch.device) -> Any:
    """This worker's batches: one optimizer step's images each (train_step splits them into micro-batches); views
    cut here on the device when the views are planned for it (crops.decode)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    common: dict[str, Any] = {
        "batch_size": cfg.optim.step_batch,
        "drop_last": True,
        "local_shuffle_buffer_size": cfg.shuffle_buffer or None,
        "local_shuffle_seed": cfg.seed + first_step,
        "prefetch_batches": 2,
    }
    if not decodes_on_device(cfg.crops, device.type == "cuda"):
        return shard.iter_torch_batches(**common)
    cut = DeviceViews(views_of(cfg.method, cfg.crops), device)
    views = (cut(batch) for batch in shard.iter_batches(batch_format="numpy", **common))
    return (batch for batch in views if batch)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: the resolved ``cfg`` dict, ``n_images``, ``total_steps``,
    ``steps_per_epoch`` (computed by the driver from the data)."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(PretrainConfig, config["cfg"])
    total_steps, steps_per_epoch = int(config["total_steps"]), int(config["steps_per_epoch"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP broadcasts rank 0's anyway)
    cfg.init = None if ray.train.get_checkpoint() is not None else cfg.init  # resuming: weights from the checkpoint
    method = build_method(cfg, int(config["n_images"])).to(device)
    student = _parallel(method, cfg)
    if cfg.compile:
        student = torch.compile(student)
    o = cfg.optim
    optimizer = build_optimizer(method, cfg)
    schedules = build_schedules(cfg, total_steps, steps_per_epoch, world)
    step = _resume(method, optimizer, device)
    bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
    metrics = Metrics(cfg) if rank == 0 else None
    curve = _Curve(cfg, method, total_steps, rank)
    # One stream over every remaining epoch (row groups in a seeded order per epoch): no pipeline restart and no
    # empty queue at epoch boundaries. Batch i of the stream is step first_step + i; a worker restarted from a
    # checkpoint inside this run skips the batches before it.
    first_step = int(config.get("first_step", 0))
    if step < first_step:
        raise RuntimeError(f"resumed at step {step} but the data stream starts at step {first_step}: rerun to resume")
    batches = _stream(cfg, first_step, device)
    method.train()
    last_report = step
    row: dict[str, Any] = {}
    try:
        waited, tick = 0.0, time.perf_counter()
        for index, batch in enumerate(batches):
            if first_step + index < step:  # trained on before the restart
                tick = time.perf_counter()
                continue
            if step >= total_steps:
                break
            waited = time.perf_counter() - tick
            row = train_step(method, student, optimizer, batch, schedules, cfg, rank, step, bf16)
            step += 1
            elapsed = time.perf_counter() - tick
            row.update(
                step=step,
                epoch=(step - 1) // steps_per_epoch,
                images_per_s=o.step_batch * world / max(elapsed, 1e-9),
                data_wait_pct=100.0 * waited / max(elapsed, 1e-9),
                time=time.time(),
            )
            checkpoint_now = step % cfg.checkpoint_every == 0 or step == total_steps
            if checkpoint_now and world > 1 and cfg.strategy == "ddp":  # before the log and the checkpoint
                row["replicas_equal"] = check_replicas(method.student, step)
            row.update(curve(step))
            if metrics is not None:
                metrics.log(row)
            if checkpoint_now:
                if metrics is not None:  # before the checkpoint: a resume never finds a log shorter than its step
                    metrics.publish()
                _report(row, method, optimizer, step, steps_per_epoch, cfg, rank)
                last_report = step
            if _STEP_DELAY_S:
                time.sleep(_STEP_DELAY_S)
            tick = time.perf_counter()
        if step == first_step and step < total_steps:
            raise RuntimeError("the training data yielded no batch: fewer images than one batch per worker?")
        if step != last_report:  # the stream ran dry early (images that failed to decode were skipped)
            _report(row, method, optimizer, step, steps_per_epoch, cfg, rank)
    finally:
        if metrics is not None:
            metrics.close()


def _n_images(batch: dict[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))


def micro_batches(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Split a step's batch (every value (B, ...)) into ``n`` micro-batches along the first axis, in order (sizes
    differ by at most one when n does not divide B; none is empty)."""
    if n == 1:
        return [batch]
    parts = {k: torch.tensor_split(v, n) for k, v in batch.items()}
    split = [{k: v[i] for k, v in parts.items()} for i in range(n)]
    return [part for part in split if _n_images(part)]


def _no_sync(student: StudentFn, last: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync`` for every micro-batch but the last: gradients are all-reduced once per optimizer step."""
    no_sync = getattr(student, "no_sync", None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


def train_step(
    method: Method,
    student: StudentFn,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    schedules: Schedules,
    cfg: PretrainConfig,
    rank: int,
    step: int,
    bf16: bool,
) -> dict[str, Any]:
    """One optimizer step on ``batch`` (``batch_size * accumulate_steps`` images): for each of the
    ``accumulate_steps`` micro-batches forward and backward of its loss weighted by its share of the images (the
    gradients sum to the whole batch's mean-loss gradient), then clip, (last layer frozen), optimizer step, and
    teacher/centre/queue update once. The log row's loss and terms are the image-weighted means over micro-batches."""
    sched = schedules.at(step)
    apply_schedules(optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])
    optimizer.zero_grad(set_to_none=True)
    parts = micro_batches(batch, cfg.optim.accumulate_steps)
    total = _n_images(batch)
    loss_value = 0.0
    terms: dict[str, float] = {}
    for micro, part in enumerate(parts):
        rng = _seed_step(cfg, rank, step, micro)
        share = _n_images(part) / total
        with _no_sync(student, micro == len(parts) - 1):
            with torch.autocast(method.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, part_terms = method.loss(part, sched, rng, student)
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {step}: lower optim.lr or check the data")
            (loss * share).backward()  # x 1.0 when not accumulating: the same gradient, bit for bit
        loss_value += share * value
        for key, term in part_terms.items():
            terms[key] = terms.get(key, 0.0) + share * term
    clip = cfg.optim.clip_grad
    grad_norm = _norm(nn.utils.clip_grad_norm_(method.student.parameters(), clip)) if clip else 0.0
    if sched["last_layer_lr"] == 0.0:
        cancel_last_layer_gradients(method.student)
    optimizer.step()
    method.after_step(sched)
    return {"loss": loss_value, **terms, **{k: float(v) for k, v in sched.items()}, "grad_norm": grad_norm}


def _norm(value: torch.Tensor) -> float:
    """A gradient norm as a float; sharded parameters give a DTensor, made whole first."""
    full = getattr(value, "full_tensor", None)
    return float(full() if callable(full) else value)


def _report(
    row: dict[str, Any],
    method: Method,
    optimizer: torch.optim.Optimizer,
    step: int,
    steps_per_epoch: int,
    cfg: PretrainConfig,
    rank: int,
) -> None:
    """Every rank reports (Ray Train's barrier); rank 0 attaches the checkpoint folder."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="lvdkit-ckpt-") as tmp:
        checkpoint, meta = None, None
        if rank == 0:
            identity = getattr(method, "identity", {})
            position = {"step": step, "epoch": step // steps_per_epoch, "position": step % steps_per_epoch}
            meta = {**position, "method": cfg.method, "model": cfg.model, "identity": identity, "pid": os.getpid()}
            meta["strategy"] = cfg.strategy
        if rank == 0 or is_sharded(method):  # sharded: every rank's part goes into the same checkpoint folder
            write_checkpoint(Path(tmp), method, optimizer, meta)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        with disk_errors(f"{cfg.out}/checkpoint_* (step {step})"):  # Ray Train copies the folder into the run
            ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))}, checkpoint=checkpoint)
