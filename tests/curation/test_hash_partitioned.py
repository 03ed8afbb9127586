"""dedup_exact and dedup_phash partitioned by hash buckets decide as their single-task paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.io import part_files, read_json
from lvdkit.core.settings import load_config
from lvdkit.curation.hash_partitioned import band_buckets
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run


def test_hashes_within_the_distance_share_a_bucket() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 2000, dtype=np.int64).astype(np.uint64)
    for d in (0, 1, 2, 3):
        flips = np.zeros(len(base), np.uint64)
        for _ in range(d):  # d random bits flipped (possibly the same bit twice: distance <= d)
            flips ^= np.left_shift(np.uint64(1), rng.integers(0, 64, len(base)).astype(np.uint64))
        a, b = band_buckets(base, d, 97), band_buckets(base ^ flips, d, 97)
        assert a.shape == (len(base), d + 1)
        assert (a == b).any(axis=1).all(), d


def _cfg(out: Path, demo: Path, *extra: str) -> CurateConfig:
    overrides = [f"out={out}", f"ingest.inputs=[{demo / 'raw'}]", "progress=false", "ingest.files_per_part=30", *extra]
    return load_config(CurateConfig, None, overrides)


@pytest.fixture(scope="module")
def ingested(small_demo: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    out = tmp_path_factory.mktemp("hash_paths") / "out"
    run(_cfg(out, small_demo), ("ingest",))
    return out


def _decisions(out: Path, stage: str) -> dict[str, tuple[bool, str | None, float]]:
    rows = pa.concat_tables([pq.read_table(p) for p in part_files(out / stage)]).to_pylist()
    return {r[schema.IMAGE_ID]: (r[schema.KEEP], r[schema.DUP_OF], r[schema.DISTANCE]) for r in rows}


@pytest.mark.parametrize(("distance", "confirm"), [(0, 3), (3, 3), (3, 0)])
def test_exact_and_phash_decide_the_same_on_both_paths(
    ingested: Path, small_demo: Path, tmp_path: Path, distance: int, confirm: int
) -> None:
    found = {}
    for path in ("single", "partitioned", "unconfirmed"):
        out = tmp_path / path
        shutil.copytree(ingested, out)
        extra = [f"dedup_exact.path={path}", f"dedup_phash.path={path}", f"dedup_phash.max_distance={distance}"]
        extra += [f"dedup_phash.confirm_dhash={confirm}"]
        if path == "unconfirmed":  # PHash alone, one task
            extra = [*extra[2:-1], "dedup_phash.confirm_dhash=null", "dedup_exact.path=single"]
            extra += ["dedup_phash.path=single"]
        extra += ["dedup_exact.partition_rows=20", "dedup_phash.partition_rows=40"]  # several partitions
        run(_cfg(out, small_demo, *extra), ("dedup_exact", "dedup_phash"))
        found[path] = {stage: _decisions(out, stage) for stage in ("dedup_exact", "dedup_phash")}
        for stage in ("dedup_exact", "dedup_phash"):
            record = read_json(out / stage / "_SUCCESS") or {}
            assert record["stats"]["path"] == (path if path != "unconfirmed" else "single")
    for stage in ("dedup_exact", "dedup_phash"):
        assert any(not keep for keep, _, _ in found["single"][stage].values()), stage  # something to decide
        assert found["partitioned"][stage] == found["single"][stage], stage

    def removed(path: str) -> int:
        return sum(not keep for keep, _, _ in found[path]["dedup_phash"].values())

    assert removed("single") <= removed("unconfirmed")  # DHashes only ever veto PHash pairs
    if confirm == 0:
        assert removed("single") < removed("unconfirmed")  # the small demo has PHash pairs with other gradients
    record = read_json(tmp_path / "partitioned" / "dedup_exact" / "_SUCCESS") or {}
    assert len(record["parts"]) == len(part_files(ingested / "ingest"))  # part i holds ingest part i's images


def test_partitioned_phash_beyond_three_bits_is_refused_by_name(
    ingested: Path, small_demo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(ingested, out)
    run(_cfg(out, small_demo), ("dedup_exact",))
    with pytest.raises(ValueError, match=r"dedup_phash\.max_distance=3"):
        run(_cfg(out, small_demo, "dedup_phash.path=partitioned", "dedup_phash.max_distance=5"), ("dedup_phash",))
