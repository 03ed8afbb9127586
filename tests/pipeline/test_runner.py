"""The stage runner on a real local Ray over the real small demo: outputs, invariant, skip and redo rules."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.io import part_files
from lvdkit.core.settings import load_config
from lvdkit.core.stage import StageInputs
from lvdkit.core.views import DEDUP_STAGES, alive, alive_by_part, dedups_before, final_status
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.names import CURATE_ORDER
from lvdkit.pipeline.runner import run, write_summary
from lvdkit.pipeline.summary import STATUS_PARTS
from lvdkit.truth import load_truth, score_status

from ..conftest import TINY_EMBED, copy_run, pool_run_args

pytestmark = pytest.mark.usefixtures("ray_local")


def _config(out: Path, demo: Path, *overrides: str) -> CurateConfig:
    return load_config(CurateConfig, None, pool_run_args(out, demo, *overrides))


@pytest.fixture(scope="module")
def curated(pool_run: tuple[Path, dict]) -> tuple[Path, dict]:
    """The session's whole curation of the small demo (:func:`~tests.conftest.pool_run`): ``_config`` without
    overrides, ingest parts of 40 files."""
    return pool_run


def test_every_input_file_ends_in_exactly_one_state(curated: tuple[Path, dict], small_demo: Path) -> None:
    out, summary = curated
    raw_files = sorted(str(p) for p in (small_demo / "raw").rglob("*") if p.is_file())
    status = pq.read_table(out / "status.parquet")
    assert sorted(status[schema.URI].to_pylist()) == raw_files  # one row per file, none lost, none twice
    assert summary["images_in"] == len(raw_files)
    assert summary["images_in"] == summary["kept"] + summary["duplicates"] + summary["quarantined"]
    assert summary == json.loads((out / "summary.json").read_text())
    counts = pc.value_counts(status["status"]).to_pylist()
    assert {c["values"]: c["counts"] for c in counts} == {
        k: v
        for k, v in {
            "kept": summary["kept"],
            "duplicate": summary["duplicates"],
            "quarantined": summary["quarantined"],
        }.items()
        if v
    }


def test_the_status_table_built_part_by_part_equals_the_whole_table_and_a_rebuild(
    curated: tuple[Path, dict], tmp_path: Path
) -> None:
    out, summary = curated
    finished = tuple(s for s in CURATE_ORDER if (out / s / "_SUCCESS").exists())
    whole = final_status(StageInputs(str(out), finished), tuple(s for s in DEDUP_STAGES if s in finished))
    status = pq.read_table(out / "status.parquet")
    assert status.equals(whole)
    assert status.num_rows > 0 and pc.sum(pc.equal(status["status"], "duplicate")).as_py() > 0
    assert not (out / STATUS_PARTS).exists()  # the per-part tables are gone once joined

    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("status.parquet", "summary.json"))
    rebuilt = write_summary(copy)  # no Ray: the same steps, in this process
    assert pq.read_table(copy / "status.parquet").equals(status)
    assert {k: v for k, v in rebuilt.items() if k not in ("outputs", "fingerprint")} == {
        k: v for k, v in summary.items() if k not in ("outputs", "fingerprint")
    }


def test_alive_images_part_by_part_and_the_embed_work_list_match_the_whole_table(curated: tuple[Path, dict]) -> None:
    out, _ = curated
    inputs = StageInputs(str(out), tuple(s for s in CURATE_ORDER if (out / s / "_SUCCESS").exists()))
    columns = [schema.URI, schema.CONTENT_HASH]
    for after in ((), dedups_before("dedup_copy"), DEDUP_STAGES):
        whole = alive(inputs, after, columns)
        assert pa.concat_tables(alive_by_part(inputs, after, columns)).equals(whole), after
    listing = pq.ParquetFile(out / "embed" / schema.LISTING)
    sizes = [listing.metadata.row_group(i).num_rows for i in range(listing.num_row_groups)]
    per_part = int(next(a.split("=")[1] for a in TINY_EMBED if a.startswith("embed.images_per_part")))
    assert len(sizes) > 1 and set(sizes[:-1]) == {per_part} and 0 < sizes[-1] <= per_part  # a row group per part
    table = listing.read()
    assert table[schema.IMAGE_ID].equals(alive(inputs, dedups_before("dedup_copy"), [])[schema.IMAGE_ID])
    assert table[schema.PART].to_pylist() == [i // per_part for i in range(table.num_rows)]


def test_broken_files_are_quarantined_with_a_reason(curated: tuple[Path, dict], small_demo: Path) -> None:
    out, _ = curated
    truth = load_truth(small_demo)
    broken = set(truth.filter(pc.equal(truth["kind"], schema.TRUTH_BROKEN))[schema.URI].to_pylist())
    status = pq.read_table(out / "status.parquet").to_pylist()
    quarantined = {r[schema.URI]: r["reason"] for r in status if r["status"] == schema.STATUS_QUARANTINED}
    assert broken and set(quarantined) == broken
    assert all(reason in schema.REASONS for reason in quarantined.values())
    by_transform = dict(zip(truth[schema.URI].to_pylist(), truth["transform"].to_pylist(), strict=True))
    expected = {
        "empty": schema.REASON_EMPTY,
        "truncated": schema.REASON_TRUNCATED,
        "text": schema.REASON_NOT_IMAGE,
        "huge_header": schema.REASON_TOO_MANY_PIXELS,
    }
    assert {u: expected[by_transform[u]] for u in broken} == quarantined


def test_exact_copies_found_and_duplicates_name_a_kept_image(curated: tuple[Path, dict], small_demo: Path) -> None:
    out, _ = curated
    score = score_status(load_truth(small_demo), pq.read_table(out / "status.parquet"))
    assert score.exact_total > 0 and score.exact_found == score.exact_total
    status = pq.read_table(out / "status.parquet").to_pylist()
    kept = {r[schema.IMAGE_ID] for r in status if r["status"] == schema.FINAL_KEPT}
    dups = [r for r in status if r["status"] == schema.FINAL_DUPLICATE]
    assert dups and all(r[schema.DUP_OF] in kept for r in dups)
    assert all(r["reason"] in ("dedup_exact", "dedup_phash", "dedup_copy", "dedup_relative") for r in dups)


def test_outputs_have_the_documented_schemas_and_manifests(curated: tuple[Path, dict]) -> None:
    out, summary = curated
    expected = {
        "ingest": schema.INGEST,
        "dedup_exact": schema.DEDUP,
        "dedup_phash": schema.DEDUP,
        "dedup_copy": schema.DEDUP,
        "dedup_relative": schema.DEDUP,
    }
    for stage, sch in expected.items():
        parts = part_files(out / stage)
        assert parts and all(pq.read_schema(p).equals(sch, check_metadata=False) for p in parts)
        record = json.loads((out / stage / "_SUCCESS").read_text())
        assert record["rows"] == sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        assert record["parts"] == [p.name for p in parts]
        assert {"config", "config_hash", "fingerprint", "lvdkit_version", "seconds"} <= set(record)
        assert summary["stages"][stage]["rows"] == record["rows"]
        assert not list((out / stage).glob(".*tmp*")) and not (out / stage / "_RUNNING").exists()
    assert len(part_files(out / "ingest")) > 1  # files_per_part=40 split the small demo into several parts
    assert load_config(CurateConfig, out / "config.yaml").ingest.files_per_part == 40


def test_rerun_skips_and_changes_redo_only_what_they_affect(
    curated: tuple[Path, dict], small_demo: Path, tmp_path: Path
) -> None:
    out = copy_run(curated[0], tmp_path / "out")  # a finished run of _config(out, small_demo)
    mtimes = {s: (out / s / "_SUCCESS").stat().st_mtime_ns for s in ("ingest", "dedup_exact", "dedup_phash")}
    run(_config(out, small_demo))  # same config, same inputs: nothing rewritten
    assert mtimes == {s: (out / s / "_SUCCESS").stat().st_mtime_ns for s in mtimes}

    run(_config(out, small_demo, "dedup_phash.max_distance=2"))  # a dedup_phash key: only that stage redone
    after = {s: (out / s / "_SUCCESS").stat().st_mtime_ns for s in mtimes}
    assert after["ingest"] == mtimes["ingest"] and after["dedup_exact"] == mtimes["dedup_exact"]
    assert after["dedup_phash"] != mtimes["dedup_phash"]
    assert json.loads((out / "dedup_phash" / "_SUCCESS").read_text())["config"]["max_distance"] == 2

    # a model added for clustering only: the dedup stages, which read the copy model, are not redone, and embed
    # copies the copy model's columns from its earlier output instead of computing them again
    views = json.loads((out / "embed" / "_SUCCESS").read_text())["views"]
    copy_col = schema.embedding_column("copy")
    copies_before = {sub: _column(out / "embed" / sub, copy_col) for sub in ("", schema.CALIBRATION)}
    later = ("embed", "dedup_copy", "dedup_relative", "cluster", "retrieve", "curated")
    before = {s: (out / s / "_SUCCESS").stat().st_mtime_ns for s in later}
    two_models = "embed.models={copy: 'timm:resnet10t', semantic: 'timm:resnet10t'}"
    run(_config(out, small_demo, "dedup_phash.max_distance=2", two_models, "cluster.embedding=semantic"))
    redone = {s for s in later if (out / s / "_SUCCESS").stat().st_mtime_ns != before[s]}
    assert redone == {"embed", "cluster", "retrieve", "curated"}
    record = json.loads((out / "embed" / "_SUCCESS").read_text())
    assert record["views"]["copy"] == views["copy"] and set(record["views"]) == {"copy", "semantic"}
    assert record["stats"]["reused_views"] == ["copy"] and not (out / "_previous").exists()
    for sub, before_col in copies_before.items():
        assert _column(out / "embed" / sub, copy_col) == before_col  # the same values, row for row
    assert _column(out / "embed", schema.embedding_column("semantic"))  # the new model's columns computed
    run(_config(out, small_demo, "dedup_phash.max_distance=2"))  # back to one model: embed and its readers redone
    assert json.loads((out / "embed" / "_SUCCESS").read_text())["views"] == views
    assert after == {s: (out / s / "_SUCCESS").stat().st_mtime_ns for s in mtimes}

    extra = small_demo / "raw" / "zz_added_later.txt"  # a new input file changes the ingest fingerprint
    extra.write_text("not an image")
    try:  # (the stages that read ingest's output directly: what follows them is redone as the embed case shows)
        summary = run(_config(out, small_demo, "dedup_phash.max_distance=2"), stages=tuple(mtimes))
        assert all((out / s / "_SUCCESS").stat().st_mtime_ns != after[s] for s in after)
        assert summary["quarantined_by_reason"].get(schema.REASON_NOT_IMAGE, 0) >= 1
    finally:
        os.remove(extra)

    before_force = {s: (out / s / "_SUCCESS").stat().st_mtime_ns for s in ("dedup_exact", "dedup_phash")}
    run(_config(out, small_demo, "dedup_phash.max_distance=2"), stages=("dedup_exact",), force=True)
    assert (out / "dedup_exact" / "_SUCCESS").stat().st_mtime_ns != before_force["dedup_exact"]
    # what read the forced stage's output is redone too (a forced rerun may decide otherwise under the same config)
    run(_config(out, small_demo, "dedup_phash.max_distance=2"), stages=("dedup_phash",))
    assert (out / "dedup_phash" / "_SUCCESS").stat().st_mtime_ns != before_force["dedup_phash"]


def _column(folder: Path, col: str) -> list:
    parts = [pq.read_table(p, columns=[schema.IMAGE_ID, col]) for p in part_files(folder)]
    return pa.concat_tables(parts).to_pylist()


def test_a_stage_refuses_to_run_before_its_inputs_exist(tmp_path: Path, small_demo: Path) -> None:
    with pytest.raises(RuntimeError, match="needs the output of 'ingest'"):
        run(_config(tmp_path / "empty", small_demo), stages=("dedup_exact",))
