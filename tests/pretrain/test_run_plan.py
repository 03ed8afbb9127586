"""Driver-side planning of a pretraining run: paths, steps, the per-epoch file stream."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.run import absolute_paths, epoch_files, plan


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


def test_each_epoch_lists_every_file_once_in_its_own_seeded_order() -> None:
    files = [f"part-{i}.parquet" for i in range(6)]
    stream = epoch_files(files, 0, 4, seed=0)
    assert len(stream) == 4 and all(sorted(e) == files for e in stream)
    assert len({tuple(e) for e in stream}) > 1  # reshuffled per epoch
    assert epoch_files(files, 2, 4, seed=0) == stream[2:]  # a resumed run continues the same orders
    assert epoch_files(files, 0, 4, seed=1) != stream


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
