"""cluster -> retrieve -> part on a real local Ray over the small demo: curated set anyone can read."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

import lvdkit
from lvdkit.core import schema
from lvdkit.core.io import part_name, read_parts
from lvdkit.core.settings import load_config
from lvdkit.curation.curated import SELECTION, merge_selections, selections
from lvdkit.pipeline.commits import commit_part
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run

from ..partitioned_run import base_args, copy_of_base

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def curated(small_demo: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    """The shared small run (tests/partitioned_run.py: finished up to a partitioned cluster of several parts, seed
    sets configured), carried through retrieve and curated."""
    out = copy_of_base(small_demo, tmp_path_factory, tmp_path_factory.mktemp("curated_set") / "out")
    run(_config(out, small_demo))
    return out


def _config(out: Path, small_demo: Path) -> CurateConfig:
    return load_config(CurateConfig, None, [*base_args(out, small_demo), f"curated.rows_per_part={ROWS_PER_PART}"])


ROWS_PER_PART = 16


def test_curated_shards_hold_every_selected_image_once_with_bytes(curated: Path) -> None:
    table = read_parts(curated / "curated")
    ids = table[schema.IMAGE_ID].to_pylist()
    assert len(ids) == len(set(ids)) and len(list((curated / "curated").glob("part-*.parquet"))) >= 2
    reasons = set(table["reason"].to_pylist())
    assert {schema.REASON_SAMPLE, schema.REASON_BALANCED, schema.REASON_SEED} <= reasons
    for row in table.slice(0, 10).to_pylist():
        assert row["image"] == Path(row[schema.URI]).read_bytes()  # stored as the file was
        shown = ImageOps.exif_transpose(Image.open(io.BytesIO(row["image"])))  # sizes are after EXIF orientation
        assert shown.size == (row["width"], row["height"])
    summary = json.loads((curated / "summary.json").read_text())
    assert summary["curated"] == table.num_rows
    assert summary["images_in"] == summary["kept"] + summary["duplicates"] + summary["quarantined"]
    clusters = read_parts(curated / "cluster")
    target = load_config(CurateConfig, curated / "config.yaml").cluster.target_size
    assert clusters[schema.IMAGE_ID].to_pylist() and clusters["balanced"].to_pylist().count(True) == target
    assert all(len(c) == 2 for c in clusters[schema.CLUSTER_IDS].to_pylist())


def test_sample_retrieval_in_the_pipeline_matches_brute_force(curated: Path) -> None:
    seeds = pq.read_table(curated / "retrieve" / "seeds.parquet")
    seeds = seeds.filter(seeds.column("seed_set").to_numpy(zero_copy_only=False) == "two")
    emb = read_parts(curated / "embed")
    pool = read_parts(curated / "cluster")[schema.IMAGE_ID].to_pylist()
    all_ids = emb[schema.IMAGE_ID].to_pylist()
    x = emb[schema.embedding_column("copy")].combine_chunks().flatten().to_numpy().reshape(len(all_ids), -1)
    keep = np.isin(all_ids, pool)
    x, ids = x[keep], np.asarray(all_ids)[keep]
    s = seeds["embedding"].combine_chunks().flatten().to_numpy().reshape(seeds.num_rows, -1)
    want = set(ids[np.argsort(-(s @ x.T), axis=1)[:, :3].ravel()])
    hits = read_parts(curated / "retrieve")
    got = {r["image_id"] for r in hits.to_pylist() if r["seed_set"] == "two"}
    assert got == want


def test_curated_set_opens_in_pandas_polars_duckdb_and_load_curated(curated: Path) -> None:
    import duckdb
    import pandas as pd
    import polars as pl

    n = read_parts(curated / "curated").num_rows
    assert len(pd.read_parquet(curated / "curated")) == n
    assert pl.read_parquet(str(curated / "curated" / "*.parquet")).height == n
    glob = str(curated / "curated" / "*.parquet")
    assert duckdb.sql(f"SELECT count(*) FROM '{glob}'").fetchall()[0][0] == n
    frame = lvdkit.load_curated(curated, as_="pandas")
    assert len(frame) == n and lvdkit.decode(frame.iloc[0]).mode == "RGB"
    assert lvdkit.load_curated(curated).count_rows() == n


def test_cluster_retrieval_in_the_pipeline_takes_the_closest_members_of_the_seeds_clusters(curated: Path) -> None:
    """Set 'five' (cluster mode, min_seeds_per_cluster=0, per_cluster=4): every level-1 cluster nearest to one of its
    seeds gives its 4 members closest to the centroid, scored 1 - distance; recomputed here from the cluster table."""
    seeds = pq.read_table(curated / "retrieve" / schema.SEEDS_FILE)
    seeds = seeds.filter(seeds.column(schema.SEED_SET).to_numpy(zero_copy_only=False) == "five")
    s = seeds[schema.EMBEDDING].combine_chunks().flatten().to_numpy().reshape(seeds.num_rows, -1)
    centroids = np.load(curated / "cluster" / schema.centroids_file(1))
    chosen = set(np.argmax(s @ centroids.T, axis=1).tolist())
    clusters = read_parts(curated / "cluster").to_pylist()
    want: dict[str, float] = {}
    for c in chosen:
        members = sorted((r[schema.DISTANCE], r[schema.IMAGE_ID]) for r in clusters if r[schema.CLUSTER_IDS][0] == c)
        want.update({i: 1.0 - d for d, i in members[:4]})
    hits = [r for r in read_parts(curated / "retrieve").to_pylist() if r[schema.SEED_SET] == "five"]
    assert {r[schema.IMAGE_ID] for r in hits} == set(want) and len(want) > 0
    assert all(r[schema.METHOD] == schema.METHOD_CLUSTER and r[schema.SEED_ID] is None for r in hits)
    assert all(abs(r[schema.SCORE] - want[r[schema.IMAGE_ID]]) < 1e-5 for r in hits)


def test_curated_rows_are_the_whole_tables_selections_merged_with_their_metadata_and_embeddings(curated: Path) -> None:
    """The plan runs where the rows are (a scatter per cluster part, a join per embed part); what it lists is what
    merging the whole retrieve, cluster and seed tables gives, with each image's ingest metadata and embedding."""
    retrieved = read_parts(curated / "retrieve")
    clusters = read_parts(curated / "cluster")
    seeds = pq.read_table(curated / "retrieve" / schema.SEEDS_FILE)
    want = merge_selections(selections(retrieved, clusters, seeds)).to_pylist()
    table = read_parts(curated / "curated")
    got = table.select(SELECTION.names).to_pylist()
    key = lambda r: r[schema.IMAGE_ID]  # noqa: E731
    assert sorted(got, key=key) == sorted(want, key=key)
    ingest = {r[schema.IMAGE_ID]: r for r in read_parts(curated / "ingest").to_pylist()}
    ingest.update({r[schema.IMAGE_ID]: r for r in seeds.to_pylist()})
    col = schema.embedding_column("copy")
    emb = {r[schema.IMAGE_ID]: r[col] for r in read_parts(curated / "embed").to_pylist()}
    emb.update({r[schema.IMAGE_ID]: r[schema.EMBEDDING] for r in seeds.to_pylist()})
    level = {r[schema.IMAGE_ID]: r[schema.CLUSTER_IDS] for r in clusters.to_pylist()}
    for row in table.to_pylist():
        image = row[schema.IMAGE_ID]
        assert all(row[c] == ingest[image][c] for c in (schema.URI, schema.FORMAT, schema.WIDTH))
        assert np.allclose(row[schema.EMBEDDING], emb[image]) and row[schema.CLUSTER_IDS] == level.get(image)


def test_the_plan_writes_one_listing_file_per_embed_part_with_picks_and_one_for_the_seeds(curated: Path) -> None:
    clusters = read_parts(curated / "cluster")
    embed_parts = sorted((curated / "embed").glob("part-*.parquet"))
    for part, members in enumerate(pq.read_table(p, columns=[schema.IMAGE_ID]) for p in embed_parts):
        in_part = clusters.filter(pc.equal(clusters[schema.EMBED_PART], part))[schema.IMAGE_ID].to_pylist()
        assert set(in_part) <= set(members[schema.IMAGE_ID].to_pylist())  # the column names the right part
    assert clusters[schema.EMBED_PART].null_count == 0 and len(embed_parts) >= 2
    listing = sorted((curated / "curated" / schema.LISTING).glob("part-*.parquet"))
    picked = read_parts(curated / "curated")[schema.IMAGE_ID].to_pylist()
    parts_of = dict(zip(clusters[schema.IMAGE_ID].to_pylist(), clusters[schema.EMBED_PART].to_pylist(), strict=True))
    with_picks = sorted({parts_of[i] for i in picked if i in parts_of})
    assert len(listing) == len(with_picks) + 1  # the last: seeds that are not pool images
    for file, part in zip(listing, with_picks, strict=False):
        ids = pq.read_table(file)[schema.IMAGE_ID].to_pylist()
        assert ids == sorted(ids) and {parts_of[i] for i in ids} == {part}
        assert pq.ParquetFile(file).metadata.num_row_groups == -(-len(ids) // ROWS_PER_PART)  # a part per group
    assert not (curated / "curated" / schema.LISTING / "_scratch").exists()


def test_a_run_cut_off_under_a_one_file_work_list_redoes_its_parts(
    curated: Path, small_demo: Path, tmp_path: Path
) -> None:
    """An lvdkit that planned curated in one file (``_listing``, one row group per part) was cut off; this one plans
    listing files whose parts follow another layout: the finished parts are redone, not taken as done."""
    out = tmp_path / "out"
    shutil.copytree(curated, out)
    stage = out / "curated"
    record = json.loads((stage / "_SUCCESS").read_text())
    (stage / "_SUCCESS").unlink()
    (stage / "_RUNNING").write_text(json.dumps({k: record[k] for k in ("config_hash", "fingerprint")}))
    shutil.rmtree(stage / schema.LISTING)
    first = pq.read_table(stage / part_name(0))
    pq.write_table(first, stage / schema.LISTING)  # the old work list, a file
    commit_part(read_parts(stage).slice(5, first.num_rows), stage / part_name(0), None)  # its part 0: not ours
    run(_config(out, small_demo), stages=("curated",))
    got, want = read_parts(stage), read_parts(curated / "curated")
    assert got[schema.IMAGE_ID].to_pylist() == want[schema.IMAGE_ID].to_pylist()
    assert (stage / schema.LISTING).is_dir()
