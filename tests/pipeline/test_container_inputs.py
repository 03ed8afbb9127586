"""The same pool as loose files, as WebDataset tars and as a Parquet table of image bytes: the same decisions."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.io import part_files
from lvdkit.core.settings import load_config
from lvdkit.demo_containers import write_image_table, write_webdataset
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run

from ..conftest import TINY_EMBED

STAGES = ("ingest", "dedup_exact", "dedup_phash", "embed", "dedup_copy")


def _curate(out: Path, inputs: Path) -> None:
    # The settings of the session's pool_run (ingest parts of 40 files: a container is one part whatever its size).
    overrides = [f"out={out}", f"ingest.inputs=[{inputs}]", "ingest.files_per_part=40", "progress=false", *TINY_EMBED]
    run(load_config(CurateConfig, None, [*overrides, "dedup_copy.threshold=0.9"]), STAGES)


def _decisions(out: Path, name_of: dict[str, str] | None = None) -> dict[str, list[tuple]]:
    """Per content (identical files are interchangeable: which copy is kept may follow the id), the sorted
    (status, reason, content of the image it duplicates) of its images; per name for files never read."""
    ingest = pa.concat_tables([pq.read_table(p) for p in part_files(out / "ingest")]).to_pylist()
    content = {r[schema.IMAGE_ID]: r[schema.CONTENT_HASH] for r in ingest}
    names = {r[schema.IMAGE_ID]: _name(r, name_of) for r in ingest}
    groups: dict[str, list[tuple]] = defaultdict(list)
    for r in pq.read_table(out / "status.parquet").to_pylist():
        key = content[r[schema.IMAGE_ID]] or names[r[schema.IMAGE_ID]]
        dup = content.get(r[schema.DUP_OF]) if r[schema.DUP_OF] else None
        groups[key].append((r[schema.STATUS_COL], r[schema.REASON], dup))
    return {k: sorted(v, key=str) for k, v in groups.items()}


def _name(row: dict, name_of: dict[str, str] | None) -> str:
    uri = row[schema.URI]
    if row[schema.METADATA]:
        meta = json.loads(row[schema.METADATA])
        if "path" in meta:
            return str(meta["path"])
        return str(meta["json"]["path"]) if "json" in meta else uri
    return name_of[uri] if name_of else uri


@pytest.mark.usefixtures("ray_local")
def test_tars_and_tables_decide_as_loose_files(pool_run: tuple[Path, dict], small_demo: Path, tmp_path: Path) -> None:
    raw = small_demo / "raw"
    write_webdataset(raw, tmp_path / "tars", per_shard=40)
    write_image_table(raw, tmp_path / "table" / "pool.parquet", rows_per_group=50)
    loose_names = {str(p): p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()}
    # The loose files: the session's curation of the same pool with the same settings up to embed (those stages are
    # up to date, dedup_copy runs with this test's fixed threshold).
    for stage in STAGES[:-1]:
        shutil.copytree(pool_run[0] / stage, tmp_path / "loose" / stage)
    _curate(tmp_path / "loose", raw)
    record = json.loads((tmp_path / "loose" / "dedup_copy" / "_SUCCESS").read_text())
    assert record["config"]["threshold"] == 0.9
    _curate(tmp_path / "tars_out", tmp_path / "tars")
    _curate(tmp_path / "table_out", tmp_path / "table")
    loose = _decisions(tmp_path / "loose", loose_names)
    assert _decisions(tmp_path / "tars_out") == loose
    assert _decisions(tmp_path / "table_out") == loose
    statuses = [s for rows in loose.values() for s, _, _ in rows]
    n_files = len(loose_names)
    assert len(statuses) == n_files  # every file is one record in each layout
    assert {schema.FINAL_KEPT, schema.FINAL_DUPLICATE, schema.STATUS_QUARANTINED} <= set(statuses)
    summary = json.loads((tmp_path / "tars_out" / "summary.json").read_text())
    assert summary["images_in"] == n_files
    assert len(part_files(tmp_path / "tars_out" / "ingest")) == len(list((tmp_path / "tars").glob("*.tar")))
