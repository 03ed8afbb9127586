"""Retrieval against seed sets (checked against brute force) and merging selections into curated rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.knn import l2_normalize
from lvdkit.curation.curated import CuratedConfig, fetch_images, merge_selections
from lvdkit.curation.retrieve import (
    CLUSTER,
    SAMPLE,
    RetrieveConfig,
    SeedSet,
    cluster_retrieval,
    resolve_mode,
    retrieve_stats,
    sample_retrieval,
)


def test_sample_retrieval_returns_the_true_nearest_neighbours_of_each_seed() -> None:
    rng = np.random.default_rng(0)
    pool = l2_normalize(rng.standard_normal((2000, 24)))
    seeds = l2_normalize(rng.standard_normal((30, 24)))
    ids = np.array([f"p{i}" for i in range(2000)], dtype=object)
    table = sample_retrieval(ids, pool, [f"s{i}" for i in range(30)], seeds, 4, "set")
    sims = seeds @ pool.T
    want = set(ids[np.argsort(-sims, axis=1)[:, :4].ravel()])
    assert set(table["image_id"].to_pylist()) == want
    assert table.num_rows == len(want)  # merged across seeds: each image once
    for row in table.to_pylist():  # credited to its most similar seed, with that similarity
        i = int(row["image_id"][1:])
        best_seed = max((s for s in range(30) if i in np.argsort(-sims[s])[:4]), key=lambda s: sims[s, i])
        assert row["seed_id"] == f"s{best_seed}" and row["score"] == pytest.approx(sims[best_seed, i], abs=1e-5)
        assert row["method"] == SAMPLE and row["seed_set"] == "set"


def test_cluster_retrieval_takes_closest_images_of_clusters_with_enough_seeds() -> None:
    rng = np.random.default_rng(1)
    n = 300
    cluster = rng.integers(0, 6, n)
    distance = rng.random(n).astype(np.float32)
    ids = np.array([f"p{i}" for i in range(n)], dtype=object)
    seeds = np.array([2] * 5 + [4] * 4 + [1] * 3)  # clusters 2 and 4 hold more than 3 seeds; cluster 1 exactly 3
    cfg = RetrieveConfig(min_seeds_per_cluster=3, per_cluster=7, max_per_set=100)
    table = cluster_retrieval(ids, cluster, distance, seeds, "s", cfg)
    want = set()
    for c in (2, 4):
        members = np.nonzero(cluster == c)[0]
        want |= set(ids[members[np.argsort(distance[members])][:7]])
    assert set(table["image_id"].to_pylist()) == want and table.num_rows == 14
    assert set(table["method"].to_pylist()) == {CLUSTER}
    capped = cluster_retrieval(ids, cluster, distance, seeds, "s", RetrieveConfig(per_cluster=7, max_per_set=5))
    assert capped.num_rows == 5 and set(capped["image_id"].to_pylist()) <= want
    assert cluster_retrieval(ids, cluster, distance, np.array([0, 0]), "s", cfg).num_rows == 0


def test_a_seed_set_that_retrieves_nothing_by_clusters_is_named_in_a_warning() -> None:
    cfg = RetrieveConfig(min_seeds_per_cluster=3)
    per_set = {
        "spread": {"seeds": 20, "mode": CLUSTER, "retrieved": 0},  # the seeds spread over many clusters
        "fine": {"seeds": 20, "mode": CLUSTER, "retrieved": 40},
        "sampled": {"seeds": 20, "mode": SAMPLE, "retrieved": 0},  # a sample-based set retrieves its neighbours
        "empty": {"seeds": 0, "mode": CLUSTER, "retrieved": 0},  # no usable seeds: said by seeds_unusable
    }
    stats = retrieve_stats(per_set, cfg)
    assert stats["seed_sets"] == per_set
    assert len(stats["warnings"]) == 1 and "'spread'" in stats["warnings"][0]
    assert "min_seeds_per_cluster=3" in stats["warnings"][0]


def test_mode_follows_the_paper_rule_unless_set() -> None:
    cfg = RetrieveConfig(sample_min_seeds=100)
    assert resolve_mode(SeedSet(), 500, cfg) == SAMPLE
    assert resolve_mode(SeedSet(), 20, cfg) == CLUSTER
    assert resolve_mode(SeedSet(mode="sample"), 2, cfg) == SAMPLE
    assert resolve_mode(SeedSet(mode="cluster"), 10_000, cfg) == CLUSTER


def test_merge_keeps_each_image_once_with_its_strongest_reason() -> None:
    def sel(rows: list[tuple[str, str, str | None, float]]) -> pa.Table:
        return pa.table(
            {
                "image_id": [r[0] for r in rows],
                "reason": [r[1] for r in rows],
                "seed_set": pa.array([r[2] for r in rows], pa.string()),
                "score": pa.array([r[3] for r in rows], pa.float32()),
            }
        )

    merged = merge_selections(
        [
            sel([("a", schema.REASON_CLUSTER, "x", 0.9), ("b", schema.REASON_SAMPLE, "x", 0.5)]),
            sel(
                [
                    ("a", schema.REASON_SAMPLE, "y", 0.7),
                    ("a", schema.REASON_SAMPLE, "z", 0.8),
                    ("c", schema.REASON_BALANCED, None, 0.1),
                ]
            ),
        ]
    )
    rows = {r["image_id"]: r for r in merged.to_pylist()}
    assert set(rows) == {"a", "b", "c"} and merged.num_rows == 3
    assert rows["a"]["reason"] == schema.REASON_SAMPLE and rows["a"]["seed_set"] == "z"  # sample beats cluster
    assert rows["c"]["reason"] == schema.REASON_BALANCED


def test_fetch_images_stores_bytes_as_is_or_downsized(tmp_path: Path) -> None:
    paths = []
    for i, size in enumerate([(40, 30), (300, 200)]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", size, (i * 50, 10, 10)).save(p)
        paths.append(p)
    rows = pa.table(
        {
            "image_id": ["a", "b"],
            "uri": [str(p) for p in paths],
            "format": ["PNG", "PNG"],
            "width": [40, 300],
            "height": [30, 200],
            "reason": [schema.REASON_SAMPLE] * 2,
            "seed_set": ["s", "s"],
            "score": pa.array([1.0, 0.5], pa.float32()),
            schema.CLUSTER_IDS: pa.array([[1, 0], [2, 0]], pa.list_(pa.int32())),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(8, np.float32)), 4),
            schema.METADATA: [json.dumps({"txt": "a caption"}), None],  # a WebDataset sample's caption; a loose file
        }
    )
    as_is = fetch_images(rows, CuratedConfig(), 4)
    assert as_is.schema.equals(schema.curated_schema(4))
    assert as_is["image"].to_pylist()[0] == paths[0].read_bytes()
    assert as_is[schema.METADATA].to_pylist() == [json.dumps({"txt": "a caption"}), None]  # carried to the shards
    older = fetch_images(rows.drop_columns([schema.METADATA]), CuratedConfig(), 4)  # a work list without the column
    assert older.schema.equals(schema.curated_schema(4)) and older[schema.METADATA].null_count == 2
    small = fetch_images(rows, CuratedConfig(max_side=100), 4).to_pylist()
    assert small[0]["image"] == paths[0].read_bytes()  # already small: untouched
    big = small[1]
    assert big["format"] == "JPEG" and max(big["width"], big["height"]) == 100
    import io

    assert Image.open(io.BytesIO(big["image"])).size == (big["width"], big["height"])
