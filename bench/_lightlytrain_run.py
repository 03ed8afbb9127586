"""Runs ``lightly_train.pretrain`` in LightlyTrain's own environment and times its training steps.

Started by ``bench/lightlytrain_compare.py`` with the separate venv's Python; imports nothing of lvdkit (LightlyTrain
is a baseline, never a dependency). SPEC.json holds ``lightly_train.pretrain``'s keyword arguments; RESULT.json gets
the version, the optimizer steps, the time (seconds from this script's start) at which ``fit`` began and each
training batch ended, the optimizer LightlyTrain chose with its base learning rate, and the data loader's workers.
A Lightning callback appended in ``Trainer.fit`` does the timing; LightlyTrain itself is unchanged.

Usage: LT_PYTHON bench/_lightlytrain_run.py SPEC.json RESULT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

START = time.perf_counter()

import lightly_train  # noqa: E402 (after START: imports are start-up too)
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402


class StepClock(pl.Callback):
    """When ``fit`` started and each training batch ended (seconds since START), and what the trainer resolved."""

    def __init__(self) -> None:
        self.fit_start = 0.0
        self.ends: list[float] = []
        self.steps = 0
        self.info: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.fit_start = time.perf_counter() - START
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0]
        loader = trainer.train_dataloader
        self.info = {
            "optimizer": type(optimizer).__name__,
            "lr": float(group.get("initial_lr", group["lr"])),
            "weight_decay": float(group.get("weight_decay", 0.0)),
            "num_workers": getattr(loader, "num_workers", None),
            "max_epochs": trainer.max_epochs,
            "precision": str(trainer.precision),
            "device": str(module.device),
        }

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.ends.append(time.perf_counter() - START)
        self.steps = trainer.global_step


def main() -> None:
    spec_file, result_file = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_file.read_text())
    clock = StepClock()
    fit = pl.Trainer.fit

    def timed_fit(self: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
        self.callbacks.append(clock)
        return fit(self, *args, **kwargs)

    pl.Trainer.fit = timed_fit  # type: ignore[method-assign]
    lightly_train.pretrain(**spec)
    exported = Path(spec["out"]) / "exported_models" / "exported_last.pt"
    result = {
        "version": lightly_train.__version__,
        "torch": torch.__version__,
        "steps": clock.steps,
        "fit_start_s": clock.fit_start,
        "step_ends_s": clock.ends,
        "total_s": time.perf_counter() - START,
        "exported": str(exported) if exported.exists() else None,
        **clock.info,
    }
    result_file.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
