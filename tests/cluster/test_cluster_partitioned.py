"""The cluster stage partitioned (level 1 fitted per partition of coarse cells) against its single task."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit.cluster.partitioned import at_most_k_ranges, split_k
from lvdkit.core import schema
from lvdkit.core.io import part_files, read_json
from lvdkit.core.settings import load_config
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run

from ..partitioned_run import base_args, copy_of_base


def _cfg(out: Path, demo: Path, *extra: str) -> CurateConfig:
    return load_config(CurateConfig, None, [*base_args(out, demo), *extra])


@pytest.fixture(scope="module")
def deduped(small_demo: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    return copy_of_base(small_demo, tmp_path_factory, tmp_path_factory.mktemp("base") / "out")


def _cluster(deduped: Path, demo: Path, where: Path, *extra: str) -> dict[str, tuple[list[int], float, bool]]:
    shutil.copytree(deduped, where)
    run(_cfg(where, demo, *extra), ("cluster",))
    rows = pa.concat_tables([pq.read_table(p) for p in part_files(where / "cluster")]).to_pylist()
    embedded = [pq.read_table(p, columns=[schema.IMAGE_ID]) for p in part_files(where / "embed")]
    part_of = {i: part for part, t in enumerate(embedded) for i in t[schema.IMAGE_ID].to_pylist()}
    assert all(r[schema.EMBED_PART] == part_of[r[schema.IMAGE_ID]] for r in rows)  # where its embeddings are
    return {r[schema.IMAGE_ID]: (r[schema.CLUSTER_IDS], r[schema.DISTANCE], r[schema.BALANCED]) for r in rows}


def test_one_partition_clusters_and_samples_as_the_single_task(deduped: Path, small_demo: Path, tmp_path: Path) -> None:
    single = _cluster(deduped, small_demo, tmp_path / "single", "cluster.path=single")
    one = _cluster(deduped, small_demo, tmp_path / "one", "cluster.path=partitioned", "cluster.partition_rows=100000")
    assert one.keys() == single.keys()
    for image, (levels, distance, balanced) in single.items():
        assert one[image][0] == levels and one[image][2] == balanced
        assert one[image][1] == pytest.approx(distance, abs=1e-5)
    for level in (1, 2):
        name = schema.centroids_file(level)
        np.testing.assert_allclose(
            np.load(tmp_path / "one" / "cluster" / name), np.load(tmp_path / "single" / "cluster" / name), atol=1e-5
        )
    record = read_json(tmp_path / "one" / "cluster" / "_SUCCESS") or {}
    assert record["stats"]["path"] == "partitioned" and record["stats"]["balanced"] == 30


def test_many_partitions_keep_the_tree_and_the_sample_whole(deduped: Path, small_demo: Path, tmp_path: Path) -> None:
    found = _cluster(deduped, small_demo, tmp_path / "many", "cluster.path=partitioned", "cluster.partition_rows=30")
    parts = part_files(tmp_path / "many" / "cluster")
    assert len(parts) > 1  # one output part per partition
    level1 = np.array([levels[0] for levels, _, _ in found.values()])
    level2 = np.array([levels[1] for levels, _, _ in found.values()])
    assert set(level1) == set(range(6)) and set(level2) <= {0, 1}
    for cluster in range(6):  # a level-1 cluster has one parent
        assert len(set(level2[level1 == cluster])) == 1
    assert sum(balanced for _, _, balanced in found.values()) == 30
    assert all(d >= 0 for _, d, _ in found.values())
    centroids = np.load(tmp_path / "many" / "cluster" / schema.centroids_file(1))
    assert centroids.shape[0] == 6


def test_more_partitions_than_level1_clusters_merge_so_level1_keeps_exactly_k() -> None:
    ranges, rows = [(0, 2), (2, 3), (3, 5), (5, 6), (6, 9)], np.array([5, 0, 3, 4, 9])
    assert at_most_k_ranges(ranges, rows, 4)[0] == ranges  # one cluster fits each partition with rows: unchanged
    for k in (1, 2, 3):
        merged, n = at_most_k_ranges(ranges, rows, k)
        assert len(merged) == k and n.sum() == rows.sum() and split_k(k, n).sum() == k
        assert merged[0][0] == 0 and merged[-1][1] == 9
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(merged))  # consecutive, disjoint
    assert at_most_k_ranges(ranges, rows, 2)[0] == [(0, 6), (6, 9)]  # lightest neighbours first: 3+4, then 5+7


def test_split_k_gives_exactly_k_when_small_partitions_each_need_one() -> None:
    # one large partition and five tiny ones: each tiny one needs a cluster, which the large one gives back
    assert split_k(6, np.array([100, 1, 1, 1, 1, 1])).tolist() == [1, 1, 1, 1, 1, 1]
    assert split_k(8, np.array([100, 1, 1, 1])).tolist() == [5, 1, 1, 1]
    rng = np.random.default_rng(0)
    for _ in range(500):
        rows = rng.integers(0, 50, rng.integers(1, 9)) * (rng.random() < 0.5) + rng.integers(0, 3)
        k = int(rng.integers(max(1, int((rows > 0).sum())), 40))
        ks = split_k(k, rows)
        assert (ks <= rows).all() and ((ks >= 1) | (rows == 0)).all()
        assert ks.sum() == min(k, rows.sum())
