"""A Ray Train worker loop for the multi-worker tests: lvdkit's own training step (``train_step``; DDP over gloo via
``ray.train.torch.prepare_model``, or FSDP via lvdkit's ``shard``) on a fixed global batch per step, each rank taking
its contiguous slice of it; sharded checkpoints written and resumed with lvdkit's own functions. Kept free of
relative imports: Ray ships it to the workers by value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lvdkit.core.settings import from_dict
from lvdkit.pretrain.augment import GLOBAL_KEYS, LOCAL_KEY, VIEW_KEY
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.method import Method
from lvdkit.pretrain.sharding import is_sharded, load_sharded, shard
from lvdkit.pretrain.train import build_method, build_optimizer, build_schedules, train_step, write_checkpoint


def global_batch(cfg: PretrainConfig, step: int, n_images: int) -> dict[str, torch.Tensor]:
    """Step ``step``'s views of ``n_images`` images (uint8, as the augmentation makes them), the same whatever the
    number of workers."""
    g = torch.Generator().manual_seed(1000 + step)
    c = cfg.crops

    def views(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, (n_images, *shape), dtype=torch.uint8, generator=g)

    if cfg.method == "distillation":
        return {VIEW_KEY: views(3, c.global_size, c.global_size)}
    batch = {key: views(3, c.global_size, c.global_size) for key in GLOBAL_KEYS}
    if c.n_local:
        batch[LOCAL_KEY] = views(c.n_local, 3, c.local_size, c.local_size)
    return batch


def _full_weights(method: Method) -> dict[str, torch.Tensor]:
    """The student's whole weights: this rank's replica (DDP), or gathered to rank 0 (FSDP; other ranks get {})."""
    if not is_sharded(method):
        return {k: v.detach().clone() for k, v in method.student.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(method.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def worker_loop(config: dict[str, Any]) -> None:
    """``config``: ``runs`` (trained one after the other: ``cfg``, a resolved config dict; optionally ``save`` and
    ``save_at``, a checkpoint folder written after that many steps; ``load`` and ``start``, one to resume from at
    that step), ``steps``, ``folder``. Writes ``run{i}-rank{r}.pt`` (the student's whole weights) per rank that has
    them."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    steps = int(config["steps"])
    for index, job in enumerate(config["runs"]):
        cfg = from_dict(PretrainConfig, job["cfg"])
        torch.manual_seed(cfg.seed)
        method = build_method(cfg, 1000).train()
        student: Any
        if cfg.strategy == "fsdp":
            shard(method)
            student = method.student
        else:
            student = ray.train.torch.prepare_model(method.student, move_to_device=False, parallel_strategy="ddp")
        optimizer = build_optimizer(method, cfg)
        schedules = build_schedules(cfg, steps, steps, world)
        start = 0
        if job.get("load"):
            load_sharded(Path(job["load"]), method, optimizer)
            start = int(job["start"])
        per_rank = cfg.optim.batch_size
        for step in range(start, steps):
            batch = global_batch(cfg, step, per_rank * world)
            mine = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
            train_step(method, student, optimizer, mine, schedules, cfg, rank, step, False)
            if job.get("save") and step + 1 == job["save_at"]:
                meta = {"step": step + 1, "method": cfg.method, "model": cfg.model, "identity": method.identity}
                write_checkpoint(Path(job["save"]), method, optimizer, meta if rank == 0 else None)
        weights = _full_weights(method)
        if weights:
            torch.save(weights, Path(config["folder"]) / f"run{index}-rank{rank}.pt")
    ray.train.report({"done": 1})
