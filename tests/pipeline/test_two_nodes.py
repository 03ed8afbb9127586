"""A real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: two raylets on loopback).

``lvdkit curate`` joins it with ``--address``, every partitioned stage runs tasks on both nodes (its ``_SUCCESS``
lists them), and the decisions equal a single-node run's. Then the second node is killed in the middle of
``dedup_copy``'s partitions: its tasks rerun on the head and the output is the same.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.io import part_files, read_json
from lvdkit.pipeline.names import CURATE_ORDER

from ..conftest import TINY_EMBED, run_cli

# Two Ray nodes on loopback and three curations (about 4 min on 2 cores): `make test-all`, as `make test` must stay
# under 20 minutes.
pytestmark = pytest.mark.slow

PARTITIONED = CURATE_ORDER  # every stage's work is split over the cluster
LATER = CURATE_ORDER[CURATE_ORDER.index("dedup_copy") :]  # redone after the node loss


def _args(out: Path, demo: Path) -> list[str]:
    return [
        f"out={out}",
        f"ingest.inputs=[{demo / 'raw'}]",
        "progress=false",
        *TINY_EMBED,
        "ingest.files_per_part=20",
        "embed.num_actors=2",
        # one model thread per actor in both runs: by default the actors' threads follow the node's CPUs (4 over 2
        # actors here, 2 over 2 on one node), the embeddings then differ by ~3e-8 and a near-tie in retrieval (two
        # scores 6e-8 apart at per_cluster's cut) once picked another image
        "embed.threads_per_actor=1",
        "embed.images_per_part=10",  # more embed parts than ingest parts: part i of one is not part i of the other
        "dedup_exact.path=partitioned",
        "dedup_exact.partition_rows=20",
        "dedup_phash.path=partitioned",
        "dedup_phash.partition_rows=20",
        "dedup_copy.path=partitioned",
        "dedup_copy.cell_rows=10",
        "dedup_copy.partition_rows=14",
        f"dedup_relative.protected=[{demo / 'heldout'}]",
        "dedup_relative.path=partitioned",
        "cluster.path=partitioned",
        "cluster.hierarchy.levels=[6, 2]",
        "cluster.partition_rows=30",
        "cluster.target_size=20",
        f"retrieve.seed_sets={{two: {{inputs: [{demo / 'seeds' / 'digit_2'}], mode: sample, k: 3}}, "
        f"five: {{inputs: [{demo / 'seeds' / 'digit_5'}], mode: cluster}}}}",
        "retrieve.min_seeds_per_cluster=0",
        "retrieve.per_cluster=4",
        "retrieve.path=partitioned",
        "curated.rows_per_part=20",
    ]


def _cluster() -> tuple[object, object]:
    from ray.cluster_utils import Cluster

    store = 150 * 2**20
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 2, "object_store_memory": store, "include_dashboard": False},
    )
    worker = cluster.add_node(num_cpus=2, object_store_memory=store)
    cluster.wait_for_nodes()
    return cluster, worker


@pytest.fixture(scope="module")
def runs(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The same curation on the two-node cluster and on a single-node local Ray."""
    base = tmp_path_factory.mktemp("two_nodes")
    cluster, _ = _cluster()
    try:
        on_two = run_cli("curate", "--address", cluster.address, *_args(base / "two", small_demo))  # type: ignore[attr-defined]
    finally:
        cluster.shutdown()  # type: ignore[attr-defined]
    assert on_two.returncode == 0, on_two.stderr[-3000:]
    on_one = run_cli("curate", "ray.num_cpus=2", *_args(base / "one", small_demo))
    assert on_one.returncode == 0, on_one.stderr[-3000:]
    yield {"two": base / "two", "one": base / "one"}


def _dedup(out: Path, stage: str) -> dict[str, tuple[bool, str | None]]:
    rows = pa.concat_tables([pq.read_table(p) for p in part_files(out / stage)]).to_pylist()
    return {r[schema.IMAGE_ID]: (r[schema.KEEP], r[schema.DUP_OF]) for r in rows}


def _status(out: Path) -> dict[str, tuple[str, str | None, str | None]]:
    rows = pq.read_table(out / "status.parquet").to_pylist()
    return {r[schema.IMAGE_ID]: (r[schema.STATUS_COL], r[schema.REASON], r[schema.DUP_OF]) for r in rows}


def _rows(out: Path, stage: str) -> tuple[list[tuple[object, ...]], list[float]]:
    """A stage's rows by image: the decisions (every non-float value) exactly, and the floats apart.

    With other thread counts in the embed actors the embeddings differ by about 3e-8 and k-means can carry that into a
    centroid (a one-member cluster's point is its centroid exactly in one run, 0.003 from it in the other) without
    changing any assignment; the runs pin the threads, the floats are still compared with a tolerance."""
    rows = pa.concat_tables([pq.read_table(p) for p in part_files(out / stage)]).to_pylist()
    rows.sort(key=lambda r: tuple(str(v) for v in r.values() if not isinstance(v, float)))
    decisions = [tuple(str(v) for v in r.values() if not isinstance(v, float)) for r in rows]
    return decisions, [v for r in rows for v in r.values() if isinstance(v, float)]


def _curated(out: Path) -> list[str]:
    return sorted(pq.read_table(out / "curated", columns=[schema.IMAGE_ID])[schema.IMAGE_ID].to_pylist())


def test_curate_on_two_nodes_uses_both_and_decides_as_one_node(runs: dict[str, Path]) -> None:
    two, one = runs["two"], runs["one"]
    nodes = {stage: (read_json(two / stage / "_SUCCESS") or {}).get("nodes", []) for stage in PARTITIONED}
    assert all(len(n) == 2 for n in nodes.values()), nodes
    assert len({node for n in nodes.values() for node in n}) == 2
    assert (read_json(two / "dedup_copy" / "_SUCCESS") or {})["stats"]["cells"] > 1
    for stage in ("dedup_exact", "dedup_phash", "dedup_copy", "dedup_relative", "cluster", "retrieve"):
        assert (read_json(two / stage / "_SUCCESS") or {})["stats"]["path"] == "partitioned", stage
    for stage in ("dedup_exact", "dedup_phash", "dedup_copy", "dedup_relative"):
        assert _dedup(two, stage) == _dedup(one, stage), stage
    assert _status(two) == _status(one)
    assert _curated(two) == _curated(one)
    for stage in ("cluster", "retrieve"):
        (decided_two, floats_two), (decided_one, floats_one) = _rows(two, stage), _rows(one, stage)
        assert decided_two == decided_one, stage
        assert np.allclose(floats_two, floats_one, atol=0.01), stage
    assert any(status == schema.FINAL_DUPLICATE for status, _, _ in _status(two).values())


def test_losing_a_node_in_the_middle_of_dedup_copy_changes_nothing(
    runs: dict[str, Path], small_demo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(runs["two"], out)
    for stage in LATER:
        shutil.rmtree(out / stage)
    cluster, worker = _cluster()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lvdkit.cli",
                "run",
                "dedup_copy",
                "--address",
                cluster.address,
                *_args(out, small_demo),
            ],  # type: ignore[attr-defined]
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "LVDKIT_TEST_STAGE_DELAY": "dedup_copy:2"},
        )
        solved = out / "dedup_copy" / "_scratch" / "solve"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not part_files(solved):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert part_files(solved), "no partition was solved in time"
        cluster.remove_node(worker)  # type: ignore[attr-defined]  # SIGKILLs its raylet and workers
        _, stderr = proc.communicate(timeout=300)
    finally:
        cluster.shutdown()  # type: ignore[attr-defined]
    assert proc.returncode == 0, stderr[-3000:]
    assert _dedup(out, "dedup_copy") == _dedup(runs["one"], "dedup_copy")
    record = read_json(out / "dedup_copy" / "_SUCCESS") or {}
    assert (
        record["stats"]["duplicates"]
        == (read_json(runs["one"] / "dedup_copy" / "_SUCCESS") or {})["stats"]["duplicates"]
    )
