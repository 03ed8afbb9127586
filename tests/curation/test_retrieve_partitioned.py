"""retrieve partitioned (seed neighbours per embed part, cluster candidates per cluster part, merged per seed set)
finds what the single task finds."""

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
def clustered(small_demo: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    return copy_of_base(small_demo, tmp_path_factory, tmp_path_factory.mktemp("base") / "out")


def _hits(clustered: Path, demo: Path, where: Path, path: str) -> dict[tuple[str, str], tuple[str | None, str, float]]:
    shutil.copytree(clustered, where)
    run(_cfg(where, demo, f"retrieve.path={path}"), ("retrieve",))
    rows = pa.concat_tables([pq.read_table(p) for p in part_files(where / "retrieve")]).to_pylist()
    return {
        (r[schema.SEED_SET], r[schema.IMAGE_ID]): (r[schema.SEED_ID], r[schema.METHOD], round(r[schema.SCORE], 4))
        for r in rows
    }


def test_both_paths_retrieve_the_same_images(clustered: Path, small_demo: Path, tmp_path: Path) -> None:
    single = _hits(clustered, small_demo, tmp_path / "single", "single")
    parted = _hits(clustered, small_demo, tmp_path / "parted", "partitioned")
    assert {s for s, _ in single} == {"two", "five"}  # both modes retrieved something
    assert parted == single
    a = read_json(tmp_path / "single" / "retrieve" / "_SUCCESS") or {}
    b = read_json(tmp_path / "parted" / "retrieve" / "_SUCCESS") or {}
    assert b["stats"]["path"] == "partitioned"
    assert {k: {**v} for k, v in b["stats"]["seed_sets"].items()} == a["stats"]["seed_sets"]
    seeds = tmp_path / "parted" / "retrieve" / schema.SEEDS_FILE
    assert pq.read_table(seeds).num_rows == pq.read_table(tmp_path / "single" / "retrieve" / schema.SEEDS_FILE).num_rows
