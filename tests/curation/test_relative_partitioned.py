"""dedup_relative partitioned (the protected set broadcast to one task per embed part) against its single task."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.io import part_files, read_json
from lvdkit.core.settings import load_config
from lvdkit.curation.relative_partitioned import BINS, histogram_quantile
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run

from ..partitioned_run import base_args, copy_of_base


def test_the_histogram_quantile_removes_what_the_exact_one_removes_but_within_a_bin() -> None:
    rng = np.random.default_rng(0)
    for values in (rng.normal(0.2, 0.1, 20_000).clip(-1, 1), rng.uniform(-1, 1, 997), np.full(50, 0.3)):
        hist = np.histogram(values, bins=BINS, range=(-1.0, 1.0))[0]
        for q in (0.5, 0.9, 0.99, 0.999):
            exact, estimate = np.quantile(values, q), histogram_quantile(hist, q)
            differ = values[(values > exact) != (values > estimate)]
            assert np.all(np.abs(differ - exact) <= 2.0 / BINS + 1e-9), (q, differ, exact, estimate)


def _cfg(out: Path, demo: Path, *extra: str) -> CurateConfig:
    return load_config(CurateConfig, None, [*base_args(out, demo), *extra])


@pytest.fixture(scope="module")
def copied(small_demo: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    return copy_of_base(small_demo, tmp_path_factory, tmp_path_factory.mktemp("base") / "out")


def _relative(copied: Path, demo: Path, where: Path, *extra: str) -> dict[str, tuple[bool, str | None]]:
    shutil.copytree(copied, where)
    run(_cfg(where, demo, *extra), ("dedup_relative",))
    rows = pa.concat_tables([pq.read_table(p) for p in part_files(where / "dedup_relative")]).to_pylist()
    return {r[schema.IMAGE_ID]: (r[schema.KEEP], r[schema.DUP_OF]) for r in rows}


@pytest.mark.parametrize("rule", ["threshold=0.9", "rule=recall"])
def test_both_paths_remove_the_same_images(copied: Path, small_demo: Path, tmp_path: Path, rule: str) -> None:
    single = _relative(copied, small_demo, tmp_path / "single", "dedup_relative.path=single", f"dedup_relative.{rule}")
    parted = _relative(
        copied, small_demo, tmp_path / "parted", "dedup_relative.path=partitioned", f"dedup_relative.{rule}"
    )
    assert parted == single
    a = (read_json(tmp_path / "single" / "dedup_relative" / "_SUCCESS") or {})["stats"]
    b = (read_json(tmp_path / "parted" / "dedup_relative" / "_SUCCESS") or {})["stats"]
    assert b["path"] == "partitioned"
    for key in ("in", "kept", "duplicates", "protected", "protected_unusable"):
        assert a[key] == b[key], key
    if rule.startswith("threshold"):
        assert b["threshold"] == a["threshold"]
    # the recall rule's budget: the same removals (above); its value may sit anywhere between the two similarities
    # around the exact quantile
    assert (tmp_path / "parted" / "dedup_relative" / schema.PROTECTED_FILE).is_file()
