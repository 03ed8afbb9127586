"""A pretraining run's log: rank 0's ``metrics.jsonl`` (and TensorBoard) in the run folder, staged locally for a run
on object storage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lvdkit.core.io import disk_errors
from lvdkit.core.storage import ObjectPath, is_uri
from lvdkit.pretrain.config import PretrainConfig

METRICS_FILE = "metrics.jsonl"


def local_run_folder(out: str) -> Path:
    """The run's local folder: the run folder itself, or, for a run on object storage, a local staging folder. Rank 0
    writes ``metrics.jsonl`` and TensorBoard there as they grow (an object cannot be appended to; they are copied to
    the run at every checkpoint) and the driver keeps Ray's temporary files there."""
    if not is_uri(out):
        return Path(out)
    key = hashlib.blake2b(out.encode(), digest_size=8).hexdigest()
    return Path(tempfile.gettempdir()) / "lvdkit-pretrain" / key


class Metrics:
    """Rank 0's JSONL log (and TensorBoard when installed) in the run folder (see :func:`local_run_folder`)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        out, tensorboard = cfg.out, cfg.tensorboard
        self.folder = local_run_folder(out)
        self.remote = ObjectPath(out) if is_uri(out) else None
        if self.remote is not None:  # start from the run's own log (a resumed run appends to it), not a stale copy
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.folder / "tensorboard", ignore_errors=True)
            earlier = self.remote / METRICS_FILE
            (self.folder / METRICS_FILE).write_bytes(earlier.read_bytes() if earlier.is_file() else b"")
        self.file = (self.folder / METRICS_FILE).open("a")
        self.writer = None
        if tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.folder / "tensorboard"))

    def publish(self) -> None:
        """Copy the staged log to a run on object storage (each object written whole)."""
        if self.remote is None:
            return
        self.file.flush()
        if self.writer is not None:
            self.writer.flush()
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            (self.remote / path.relative_to(self.folder).as_posix()).write_bytes(path.read_bytes())

    def log(self, row: dict[str, Any]) -> None:
        with disk_errors(self.file.name):
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.publish()
        self.file.close()
