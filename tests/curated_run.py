"""One small finished curation run, shared by the report and notebook tests (built once per test session).

Every stage runs on the small demo with the tiny random-init model: exact, PHash, copy and relative dedup (the
held-out digits protected), a two-level clustering with a balanced sample, one sample-based and one cluster-based
seed set, and the curated set. Needs the session's Ray (the ``ray_local`` fixture); its stages up to embed are
those of the session's ``pool_run`` (the same settings).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .conftest import TINY_EMBED

_RUNS: dict[str, Path] = {}


def small_curated_run(small_demo: Path, tmp_path_factory: pytest.TempPathFactory, pool: Path) -> Path:
    """OUT of a finished ``curate`` over ``small_demo`` (run on first use, then reused).

    Its ingest, exact and PHash dedup and embed have the settings of ``pool`` (OUT of the session's ``pool_run``):
    they are taken from there, up to date, and the stages from dedup_copy on run with this run's settings."""
    if "curate" not in _RUNS:
        from lvdkit.core.settings import load_config
        from lvdkit.pipeline.config import CurateConfig
        from lvdkit.pipeline.runner import run

        out = tmp_path_factory.mktemp("report_run")
        for stage in ("ingest", "dedup_exact", "dedup_phash", "embed"):
            shutil.copytree(pool / stage, out / stage)
        seeds = small_demo / "seeds"
        overrides = [
            f"out={out}",
            f"ingest.inputs=[{small_demo / 'raw'}]",
            "ingest.files_per_part=40",  # pool_run's
            "progress=false",
            *TINY_EMBED,
            "dedup_copy.threshold=0.99",
            f"dedup_relative.protected=[{small_demo / 'heldout'}]",
            "cluster.hierarchy.levels=[6, 2]",
            "cluster.target_size=15",
            f"retrieve.seed_sets={{two: {{inputs: [{seeds / 'digit_2'}], mode: sample, k: 3}}, "
            f"five: {{inputs: [{seeds / 'digit_5'}], mode: cluster}}}}",
            "retrieve.min_seeds_per_cluster=0",
            "retrieve.per_cluster=4",
        ]
        run(load_config(CurateConfig, None, overrides))
        _RUNS["curate"] = out
    return _RUNS["curate"]
