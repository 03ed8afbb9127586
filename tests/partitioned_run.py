"""One small finished run up to ``cluster``, shared by the tests that compare a stage's single and partitioned paths
(built once per test session, then copied by each test).

The small demo with the tiny random-init model, several embed parts (16 images each), the held-out digits protected,
a two-level clustering run partitioned (several cluster parts). Needs the session's Ray (``ray_local``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .conftest import TINY_EMBED

UPSTREAM = ("ingest", "dedup_exact", "dedup_phash", "embed", "dedup_copy", "dedup_relative", "cluster")
_RUNS: dict[str, Path] = {}


def base_args(out: Path, demo: Path) -> list[str]:
    seeds = demo / "seeds"
    return [
        f"out={out}",
        f"ingest.inputs=[{demo / 'raw'}]",
        "progress=false",
        *TINY_EMBED,
        "embed.images_per_part=16",
        f"dedup_relative.protected=[{demo / 'heldout'}]",
        "cluster.hierarchy.levels=[6, 2]",
        "cluster.target_size=30",
        "cluster.path=partitioned",
        "cluster.partition_rows=30",  # clusters spread over several parts
        f"retrieve.seed_sets={{two: {{inputs: [{seeds / 'digit_2'}], mode: sample, k: 3}}, "
        f"five: {{inputs: [{seeds / 'digit_5'}], mode: cluster}}}}",
        "retrieve.min_seeds_per_cluster=0",
        "retrieve.per_cluster=4",
    ]


def copy_of_base(demo: Path, tmp_path_factory: pytest.TempPathFactory, where: Path) -> Path:
    """A copy (at ``where``) of the shared run, made on first use."""
    if "base" not in _RUNS:
        from lvdkit.core.settings import load_config
        from lvdkit.pipeline.config import CurateConfig
        from lvdkit.pipeline.runner import run

        out = tmp_path_factory.mktemp("partitioned_base") / "out"
        run(load_config(CurateConfig, None, base_args(out, demo)), UPSTREAM)
        _RUNS["base"] = out
    shutil.copytree(_RUNS["base"], where)
    return where
