"""Driver-side planning of a pretraining run: paths, steps, the per-epoch row-group stream."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.run import absolute_paths, plan
from lvdkit.pretrain.stream import ReadRowGroups, RowGroups, stream_indices, stream_size


def test_relative_paths_become_absolute_for_the_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray Train workers run in their own working folders: a relative out= or teacher path would point elsewhere.
    monkeypatch.chdir(tmp_path)
    cfg = PretrainConfig(out="out/run", data="out/demo/curated")
    cfg.distill.teacher = "models/vit.safetensors"
    cfg.distill.teacher_checkpoint = "weights.pth"
    cfg.eval.data = "out/demo-data/heldout"
    fixed = absolute_paths(cfg)
    assert fixed.out == str(tmp_path / "out/run") and fixed.data == str(tmp_path / "out/demo/curated")
    assert fixed.distill.teacher == str(tmp_path / "models/vit.safetensors")
    assert fixed.distill.teacher_checkpoint == str(tmp_path / "weights.pth")
    assert fixed.eval.data == str(tmp_path / "out/demo-data/heldout")  # the learning curve's labeled set
    assert cfg.out == "out/run"  # the caller's config is untouched
    hub = PretrainConfig()
    assert absolute_paths(hub).distill.teacher == "timm:vit_base_patch14_dinov2"  # names stay names
    assert os.path.isabs(absolute_paths(PretrainConfig(data="s3://bucket/curated")).out)
    assert absolute_paths(PretrainConfig(data="s3://bucket/curated")).data == "s3://bucket/curated"


def test_plan_counts_full_batches_per_worker_and_refuses_none() -> None:
    cfg = PretrainConfig(num_workers=2)
    cfg.optim.batch_size, cfg.optim.epochs = 10, 3
    assert plan(cfg, 105) == (5, 15)  # 52 rows per worker -> 5 full batches per epoch
    with pytest.raises(ValueError, match="no full batch"):
        plan(cfg, 19)


def test_the_stream_reads_every_row_group_once_per_epoch_in_its_own_seeded_order(tmp_path: Path) -> None:
    paths = []
    for i, rows in enumerate((5, 3, 7)):  # 2 rows per row group: 3 + 2 + 4 units
        path = tmp_path / f"part-{i}.parquet"
        pq.write_table(pa.table({"image": [f"{i}:{r}".encode() for r in range(rows)]}), path, row_group_size=2)
        paths.append(str(path))
    groups = RowGroups.of(paths, None)
    assert (groups.groups, groups.rows, groups.per_epoch) == ((3, 2, 4), 15, 9)
    read = ReadRowGroups(groups, "image", None, seed=0, start_epoch=0)
    n = stream_size(groups, 0, 3)
    epochs = [[read.unit(i) for i in range(e * 9, (e + 1) * 9)] for e in range(n // 9)]
    assert len(epochs) == 3 and all(len(set(e)) == 9 for e in epochs)  # every unit once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch
    resumed = ReadRowGroups(groups, "image", None, seed=0, start_epoch=2)
    assert [resumed.unit(i) for i in range(stream_size(groups, 2, 3))] == epochs[2]  # a resumed run continues
    other = ReadRowGroups(groups, "image", None, seed=1, start_epoch=0)
    assert [other.unit(i) for i in range(9)] != epochs[0]
    images = [bytes(v) for batch in read({"data": np.arange(9)}) for v in batch["image"]]
    assert sorted(images) == sorted(f"{i}:{r}".encode() for i, rows in enumerate((5, 3, 7)) for r in range(rows))
    chunks = stream_indices(groups, 0, 3)
    assert np.concatenate(chunks).tolist() == list(range(n)) and len(chunks) == n  # one unit per task here


def test_the_stream_transforms_row_groups_in_batches_and_drops_empty_ones(tmp_path: Path) -> None:
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"image": [b"bad"] * 3 + [b"ok"] * 5}), path, row_group_size=8)
    seen: list[int] = []

    def keep_good(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(len(batch["image"]))
        good = [x for x in batch["image"] if x == b"ok"]
        return {"image": np.array(good, dtype=object)} if good else {}

    read = ReadRowGroups(RowGroups.of([str(path)], None), "image", None, 0, 0, transform=keep_good, batch_rows=3)
    out = list(read({"data": np.array([0])}))
    assert seen == [3, 3, 2] and [len(b["image"]) for b in out] == [3, 2]  # the all-bad first batch is dropped


def test_only_checkpoints_ray_registered_count(tmp_path: Path) -> None:
    """A folder uploaded but not registered when the run was killed is not where Ray resumes: ignore it."""
    import json

    from lvdkit.pretrain.run import RAY_SNAPSHOT, checkpoints
    from lvdkit.pretrain.train import META_FILE, STATE_FILE

    for name, step in (("checkpoint_a", 2), ("checkpoint_b", 4), ("checkpoint_c", 6)):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_bytes(b"x")
        (tmp_path / name / META_FILE).write_text(json.dumps({"step": step}))
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint_a", "checkpoint_b", "checkpoint_c"]  # no snapshot
    snapshot = {
        "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_b"}, {"checkpoint_dir_name": "checkpoint_a"}]
    }
    (tmp_path / RAY_SNAPSHOT).write_text(json.dumps(snapshot))
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint_a", "checkpoint_b"]


def test_a_finished_curated_folder_is_read_as_its_success_record_lists_it(tmp_path: Path) -> None:
    """Pretraining reads the parts the curated stage committed, not a stray part left by a killed run."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lvdkit.pretrain.run import parquet_files

    curated = tmp_path / "run" / "curated"
    (curated / "quarantined").mkdir(parents=True)
    table = pa.table({"image_id": ["a"], "image": [b"png"]})
    for name in ("part-000000.parquet", "part-000001.parquet", "quarantined/part-000000.parquet"):
        pq.write_table(table, curated / name)
    size = (curated / "part-000000.parquet").stat().st_size
    record = {"stage": "curated", "part_bytes": {"part-000000.parquet": size, "quarantined/part-000000.parquet": 1}}
    (curated / "_SUCCESS").write_text(json.dumps(record))
    assert parquet_files(curated, "image") == [curated / "part-000000.parquet"]
    (curated / "_SUCCESS").unlink()  # any other folder of Parquet files: its part-*.parquet
    assert parquet_files(curated, "image") == [curated / "part-000000.parquet", curated / "part-000001.parquet"]
