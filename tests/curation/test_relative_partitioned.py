"""dedup_relative partitioned (the protected set broadcast to one task per embed part) against its single task."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.io import part_files, read_json
from lvdkit.core.settings import load_config
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run

from ..partitioned_run import base_args, copy_of_base


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
    # both draw the same decoys and probes and apply the same rule: the same threshold and estimates
    for key in ("threshold", "score", "estimated_recall", "estimated_clean_removed", "probes"):
        assert a.get(key) == b.get(key), key
    # and the same background set (the small pool's every image but the first draw's decoys) for the margin's pool
    # reference
    assert a["background"] == b["background"] > 0 and a["background_weight"] == b["background_weight"] > 0
    # the pool's bound, from the same probes scored against the protected set
    assert a.get("threshold_for_budget_pool") == b.get("threshold_for_budget_pool")
    if rule == "rule=recall":
        assert -1.0 < b["threshold_for_budget_pool"] < 2.0  # computed from the pool, not the no-budget default
        # every decoy draw, each image's draws carried through the scatter: the same shares per draw
        assert a["decoy_draws"] == b["decoy_draws"] > 1
        assert a["estimated_clean_removed_by_draw"] == b["estimated_clean_removed_by_draw"]
        assert a["threshold_for_budget_decoys"] == b["threshold_for_budget_decoys"]
    assert (tmp_path / "parted" / "dedup_relative" / schema.PROTECTED_FILE).is_file()
