"""Runs that select nothing, or have nothing left to select: every stage finishes and the report renders.

Without seed sets and without a balanced sample the curated set is the whole deduplicated pool (reason
``deduplicated_pool``), so a user who only wants a deduplicated pool gets one; a pool with no usable image at all
gives empty outputs, never a crash.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.io import read_parts
from lvdkit.core.settings import load_config
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run
from lvdkit.report import build_report

from ..conftest import TINY_EMBED, copy_run, pool_run_args

pytestmark = pytest.mark.usefixtures("ray_local")


def _curate(pool: Path, out: Path, *extra: str) -> dict[str, object]:
    args = [f"out={out}", f"ingest.inputs=[{pool}]", "progress=false", *TINY_EMBED, *extra]
    return run(load_config(CurateConfig, None, args))


def test_without_seeds_or_a_balanced_sample_the_curated_set_is_the_deduplicated_pool(
    pool_run: tuple[Path, dict[str, object]],
) -> None:
    out, summary = pool_run  # the small demo's raw pool curated with TINY_EMBED, nothing else configured
    cfg = load_config(CurateConfig, out / "config.yaml")
    assert not cfg.retrieve.seed_sets and cfg.cluster.target_size is None  # no seeds, no balanced sample asked for
    curated = read_parts(out / "curated", columns=[schema.IMAGE_ID, schema.REASON])
    kept = pq.read_table(out / "status.parquet").filter(
        pc.equal(pq.read_table(out / "status.parquet")[schema.STATUS_COL], schema.FINAL_KEPT)
    )
    assert summary["curated"] == summary["kept"] == curated.num_rows > 50
    assert set(curated[schema.IMAGE_ID].to_pylist()) == set(kept[schema.IMAGE_ID].to_pylist())
    assert set(curated[schema.REASON].to_pylist()) == {schema.REASON_POOL}
    assert "deduplicated_pool" in build_report(out)


def test_a_balanced_sample_of_zero_selects_nothing_and_the_report_says_so(
    pool_run: tuple[Path, dict[str, object]], small_demo: Path, tmp_path: Path
) -> None:
    # A copy of the whole run above, rerun with the balanced sample configured: the stages from cluster on run again.
    out = copy_run(pool_run[0], tmp_path / "out")
    summary = run(load_config(CurateConfig, None, pool_run_args(out, small_demo, "cluster.target_size=0")))
    assert json.loads((out / "cluster" / "_SUCCESS").read_text())["config"]["target_size"] == 0
    assert summary["curated"] == 0 and summary["kept"] > 50
    assert read_parts(out / "curated", schema=schema.curated_schema(None)).num_rows == 0
    page = build_report(out)
    assert "curated" in page and "Traceback" not in page


PARTITIONED = tuple(
    f"{stage}.path=partitioned" for stage in ("dedup_exact", "dedup_phash", "dedup_copy", "dedup_relative", "cluster")
)


@pytest.mark.parametrize("paths", [(), PARTITIONED], ids=["auto", "partitioned"])
def test_a_pool_with_no_usable_image_runs_every_stage_to_empty_outputs(tmp_path: Path, paths: tuple[str, ...]) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    for k in range(4):
        (pool / f"notes_{k}.txt").write_text(f"not an image {k}")
    (pool / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    summary = _curate(pool, out, *paths)
    assert summary["images_in"] == summary["quarantined"] == 5
    assert summary["kept"] == summary["duplicates"] == summary["curated"] == 0
    assert "not_an_image" in build_report(out)
