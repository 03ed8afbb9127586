"""The same pool and config give the same decisions wherever the pool lies (issue: decisions drifted between clones).

``image_id`` hashes the absolute path, so anything decided by it (which copy of a group is kept on a tie, which images
get a synthetic calibration copy and which edit) changed when the same data sat in another folder. Decisions are now
keyed by content; these tests curate one pool from two folders and compare every decision by relative path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.settings import load_config
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run

from ..conftest import TINY_EMBED

pytestmark = pytest.mark.usefixtures("ray_local")


def _tied_pool(folder: Path, n: int = 16) -> Path:
    """``n`` images, each stored twice with the same pixels (PNG and BMP): different bytes, equal PHash and size, so
    every pair is a PHash duplicate whose kept image only the tie-break decides."""
    rng = np.random.default_rng(0)
    for k in range(n):
        pixels = np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
        Image.fromarray(pixels).save(folder / f"img_{k:02d}.png")
        Image.fromarray(pixels).save(folder / f"img_{k:02d}.bmp")
    return folder


def _curate(pool: Path, out: Path, stages: tuple[str, ...] | None = None, *extra: str) -> None:
    cfg = load_config(
        CurateConfig,
        None,
        [f"out={out}", f"ingest.inputs=[{pool}]", "progress=false", *TINY_EMBED, *extra],
    )
    run(cfg, stages) if stages else run(cfg)


def _relative(out: Path, root: Path) -> dict[str, str]:
    ingest = pq.read_table(out / "ingest", columns=[schema.IMAGE_ID, schema.URI]).to_pylist()
    return {r[schema.IMAGE_ID]: os.path.relpath(r[schema.URI], root) for r in ingest}


def _phash_and_calibration(out: Path, root: Path) -> tuple[list[tuple[str, bool, str | None]], list[tuple[str, str]]]:
    rel = _relative(out, root)
    dedup = pq.read_table(out / "dedup_phash").to_pylist()
    kept = sorted((rel[r[schema.IMAGE_ID]], r[schema.KEEP], rel.get(r[schema.DUP_OF] or "")) for r in dedup)
    copies = pq.read_table(out / "embed" / schema.CALIBRATION, columns=[schema.IMAGE_ID, schema.EDIT]).to_pylist()
    return kept, sorted((rel[r[schema.IMAGE_ID]], r[schema.EDIT]) for r in copies)


def test_tie_breaks_and_the_calibration_sample_do_not_depend_on_the_folder(tmp_path: Path) -> None:
    first = tmp_path / "a" / "pool"
    first.mkdir(parents=True)
    _tied_pool(first)
    second = tmp_path / "elsewhere" / "deeper" / "pool"
    shutil.copytree(first, second)
    stages = ("ingest", "dedup_exact", "dedup_phash", "embed")
    extra = ("embed.calibration_copies=8",)  # a sample of half the survivors
    _curate(first, tmp_path / "out_a", stages, *extra)
    _curate(second, tmp_path / "out_b", stages, *extra)
    kept_a, copies_a = _phash_and_calibration(tmp_path / "out_a", first)
    kept_b, copies_b = _phash_and_calibration(tmp_path / "out_b", second)
    assert sum(not keep for _, keep, _ in kept_a) == 16  # one of each pair removed: all 16 were ties
    assert kept_a == kept_b
    assert 0 < len(copies_a) < 16 and copies_a == copies_b


def _decisions(out: Path, demo: Path) -> tuple[list[tuple[str, str, str | None, str | None]], list[str]]:
    """status.parquet and the curated images, with every id replaced by the file's path relative to ``demo``."""
    status = pq.read_table(out / "status.parquet").to_pylist()
    rel = {r[schema.IMAGE_ID]: os.path.relpath(r[schema.URI], demo) for r in status}
    protected = pq.read_table(out / "dedup_relative" / schema.PROTECTED_FILE).to_pylist()
    rel.update({r[schema.IMAGE_ID]: os.path.relpath(r[schema.URI], demo) for r in protected})
    rows = sorted(
        (rel[r[schema.IMAGE_ID]], r[schema.STATUS_COL], r[schema.REASON], rel.get(r[schema.DUP_OF] or ""))
        for r in status
    )
    curated = pq.read_table(out / "curated", columns=[schema.IMAGE_ID])[schema.IMAGE_ID].to_pylist()
    return rows, sorted(rel[i] for i in curated)


@pytest.mark.slow  # two whole curations (about 2.5 min): make test-all
def test_the_whole_run_on_the_demo_in_another_folder_gives_the_same_decisions(small_demo: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "elsewhere" / "deeper" / "b"
    shutil.copytree(small_demo, first)
    shutil.copytree(small_demo, second)
    extra = (f"dedup_relative.protected=[{first / 'heldout'}]", "ingest.files_per_part=40", "cluster.target_size=40")
    _curate(first / "raw", tmp_path / "out_a", None, *extra)
    extra_b = (f"dedup_relative.protected=[{second / 'heldout'}]", *extra[1:])
    _curate(second / "raw", tmp_path / "out_b", None, *extra_b)
    assert _decisions(tmp_path / "out_a", first) == _decisions(tmp_path / "out_b", second)
