"""A Ray Train worker loop for the multi-worker tests: lvdkit's own training step (``train_step``, DDP over gloo via
``ray.train.torch.prepare_model``) on a fixed global batch per step, each rank taking its contiguous slice of it;
every rank saves its student's weights at the end. Kept free of relative imports: Ray ships it to the workers by
value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lvdkit.core.settings import from_dict
from lvdkit.pretrain.augment import GLOBAL_KEYS, LOCAL_KEY, VIEW_KEY
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.train import build_method, build_optimizer, build_schedules, train_step


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


def worker_loop(config: dict[str, Any]) -> None:
    """``config``: ``runs`` (a list of resolved config dicts, trained one after the other), ``steps``, ``folder``."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    steps = int(config["steps"])
    for index, cfg_dict in enumerate(config["runs"]):
        cfg = from_dict(PretrainConfig, cfg_dict)
        torch.manual_seed(cfg.seed)
        method = build_method(cfg, 1000).train()
        student = ray.train.torch.prepare_model(method.student, move_to_device=False, parallel_strategy="ddp")
        optimizer = build_optimizer(method, cfg)
        schedules = build_schedules(cfg, steps, steps, world)
        per_rank = cfg.optim.batch_size
        for step in range(steps):
            batch = global_batch(cfg, step, per_rank * world)
            mine = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
            train_step(method, student, optimizer, mine, schedules, cfg, rank, step, False)
        weights = {k: v.detach().clone() for k, v in method.student.state_dict().items()}
        torch.save(weights, Path(config["folder"]) / f"run{index}-rank{rank}.pt")
    ray.train.report({"done": 1})
