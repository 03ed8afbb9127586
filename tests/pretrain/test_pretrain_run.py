"""Real pretraining runs (Ray Train + Ray Data, CPU): kill and resume, a worker killed mid-run, export, distillation.

One tiny DINOv2 run is killed with SIGKILL after a checkpoint and resumed; its export then teaches a CNN by
distillation. Sizes are the smallest that still exercise every part (2-block ViT, 32 px crops, 48 images).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lvdkit.cli import main
from lvdkit.core.settings import load_config
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.run import checkpoints
from lvdkit.pretrain.train import read_checkpoint

from ..conftest import kill_tree, run_cli
from .test_monitor import labeled_colours

N_IMAGES, BATCH, EPOCHS = 48, 8, 2
TOTAL_STEPS = N_IMAGES // BATCH * EPOCHS
TINY_MODEL = (  # a 2-block ViT on 32 px crops: the smallest that exercises every part (shared with other tests)
    "model=timm:vit_tiny_patch16_224",
    "model_kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}",
    "crops.global_size=32",
    "crops.local_size=16",
    "crops.n_local=2",
    "crops.blur_kernel=3",
)
TINY_VIT = (
    *TINY_MODEL,
    "dinov2.head_out_dim=64",
    "dinov2.head_hidden_dim=32",
    "dinov2.head_bottleneck_dim=16",
    f"optim.batch_size={BATCH}",
    f"optim.epochs={EPOCHS}",
    "optim.warmup_epochs=1",
    "checkpoint_every=2",
    "progress=false",
    "ray.num_cpus=2",
    "torch_threads=1",
)


def _shapes(i: int, rng: np.random.Generator) -> bytes:
    """A 40x40 image of a few coloured rectangles (PNG bytes)."""
    pixels = np.full((40, 40, 3), rng.integers(0, 255), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, 30, 2)
        pixels[y : y + rng.integers(5, 12), x : x + rng.integers(5, 12)] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("curated")
    rng = np.random.default_rng(0)
    images = [_shapes(i, rng) for i in range(N_IMAGES)]
    table = pa.table({"image_id": [f"{i:04d}" for i in range(N_IMAGES)], "image": images})
    pq.write_table(table.slice(0, 30), folder / "part-00000.parquet")
    pq.write_table(table.slice(30), folder / "part-00001.parquet")
    return folder


def _rows(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _registered_step(out: Path) -> int:
    """The step of the latest checkpoint Ray Train has registered (0 if none yet)."""
    snapshot = out / "checkpoint_manager_snapshot.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        return int(latest["metrics"]["step"]) if latest else 0
    return 0


def _start(out: Path, data: Path, *extra: str, delay: float) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "lvdkit.cli", "pretrain", f"out={out}", f"data={data}", *TINY_VIT, *extra]
    env = {**os.environ, "LVDKIT_TEST_STEP_DELAY_S": str(delay)}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen[bytes], timeout: float = 240) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def resumed_run(
    parts: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None
) -> tuple[Path, int, list[dict[str, float]]]:
    """A DINOv2 run SIGKILLed (driver and all of Ray) after its checkpoint at step >= 4, then resumed to the end by
    ``lvdkit pretrain ... resume=true`` run in this process, on the session's Ray (no Ray start-up for it)."""
    out = tmp_path_factory.mktemp("runs") / "dinov2"
    proc = _start(out, parts, delay=1.0)
    _wait_for(lambda: _registered_step(out) >= 4, proc)
    kill_tree(proc)
    killed_at = max(int(r["step"]) for r in _rows(out))
    rows_before = len(_rows(out))
    assert killed_at < TOTAL_STEPS, "the run finished before it could be killed"
    assert main(["pretrain", f"out={out}", f"data={parts}", *TINY_VIT, "resume=true"]) == 0
    return out, rows_before, _rows(out)


def test_rerun_without_resume_is_refused(
    resumed_run: tuple[Path, int, list[dict[str, float]]], parts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _, _ = resumed_run
    capsys.readouterr()
    # `lvdkit pretrain` in this process: it refuses before it starts Ray or loads any data
    assert main(["pretrain", f"out={out}", f"data={parts}", *TINY_VIT, "optim.epochs=3"]) == 2
    assert "resume=true" in capsys.readouterr().err


def _recipe_lr(cfg: PretrainConfig, step: int) -> float:
    """DINOv2's lr at (1-based) ``step`` of this one-worker run: peak ``lr * sqrt(batch / 1024)`` reached by a linear
    warm-up from 0 over ``warmup_epochs`` (its last step at the peak), then a half cosine towards ``min_lr``."""
    i, per_epoch = step - 1, TOTAL_STEPS // EPOCHS
    peak = cfg.optim.lr * math.sqrt(cfg.optim.batch_size / 1024)
    warm = int(cfg.optim.warmup_epochs * per_epoch)
    if i < warm:
        return peak * i / (warm - 1)
    return (
        cfg.optim.min_lr + (peak - cfg.optim.min_lr) * (1 + math.cos(math.pi * (i - warm) / (TOTAL_STEPS - warm))) / 2
    )


def _recipe_teacher_temp(cfg: PretrainConfig, step: int) -> float:
    """Linear from ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_epochs``, then constant."""
    i, warm = step - 1, int(cfg.dinov2.warmup_teacher_temp_epochs * (TOTAL_STEPS // EPOCHS))
    start, end = cfg.dinov2.warmup_teacher_temp, cfg.dinov2.teacher_temp
    return end if i >= warm else start + (end - start) * i / (warm - 1)


def test_killed_run_resumes_step_optimizer_and_schedule(resumed_run: tuple[Path, int, list[dict[str, float]]]) -> None:
    out, rows_before, rows = resumed_run
    before, after = rows[:rows_before], rows[rows_before:]
    cfg = load_config(PretrainConfig, out / "config.yaml")
    # The resumed run starts right after a checkpoint the first run wrote (not at step 1, not past the kill).
    first = int(after[0]["step"])
    assert 4 < first <= int(before[-1]["step"]) + 1
    assert (first - 1) % cfg.checkpoint_every == 0
    assert [int(r["step"]) for r in after] == list(range(first, TOTAL_STEPS + 1))
    # Schedules continue: the lr and teacher temperature logged at each resumed step are DINOv2's recipe at that
    # step, written out here from the paper's formulas (not from lvdkit's schedule code).
    for row in after:
        assert row["lr"] == pytest.approx(_recipe_lr(cfg, int(row["step"])))
        assert row["teacher_temp"] == pytest.approx(_recipe_teacher_temp(cfg, int(row["step"])))
    assert all(np.isfinite(r["loss"]) for r in rows)
    # The optimizer state came back: AdamW's per-parameter step count is the run's total, not the steps since resume
    # (the prototype layer, frozen for the first epoch, has one epoch fewer).
    state, meta = read_checkpoint(checkpoints(out)[-1])
    assert meta["step"] == TOTAL_STEPS
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {float(TOTAL_STEPS), float(TOTAL_STEPS - TOTAL_STEPS // EPOCHS)}
    # The same step logged before the kill and after the resume (work redone since the checkpoint) used the same lr.
    redone = {int(r["step"]): r for r in before}.keys() & {int(r["step"]) for r in after}
    for step in redone:
        assert next(r for r in before if r["step"] == step)["lr"] == next(r for r in after if r["step"] == step)["lr"]
    assert len(checkpoints(out)) <= 3  # keep_checkpoints
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # the metrics go to TensorBoard too


@pytest.mark.usefixtures("ray_local")
def test_export_loads_in_timm_and_teaches_a_cnn(
    resumed_run: tuple[Path, int, list[dict[str, float]]],
    parts: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import timm

    from lvdkit.embeddings import create_embedder

    out, _, _ = resumed_run
    model_file = tmp_path / "vit.safetensors"
    assert main(["export", str(out), "--out", str(model_file)]) == 0, capsys.readouterr().err  # in this process
    sidecar = json.loads(model_file.with_suffix(".json").read_text())
    kwargs = dict(sidecar["kwargs"])
    # timm loads the file directly (its own key names), and gives what lvdkit's embedder gives.
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, checkpoint_path=str(model_file), **kwargs).eval()
    state, _ = read_checkpoint(checkpoints(out)[-1])
    teacher_pos = state["method"]["teacher.backbone.pos_embed"]
    assert torch.equal(vit.pos_embed.detach(), teacher_pos)
    embedder = create_embedder(str(model_file), device="cpu")
    pixels = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(embedder.preprocess.mean), torch.tensor(embedder.preprocess.std)
    with torch.no_grad():
        direct = torch.nn.functional.normalize(vit((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)), dim=1)
    assert np.allclose(embedder.embed(pixels), direct.numpy(), atol=1e-4)

    # Distillation: the exported ViT teaches a CNN (any timm/torchvision architecture).
    student_out = tmp_path / "distill"
    distilled = main(  # `lvdkit pretrain` in this process, on the session's Ray (no Ray start-up for it)
        [
            "pretrain",
            f"out={student_out}",
            f"data={parts}",
            "method=distillation",
            "model=timm:resnet10t",
            f"distill.teacher={model_file}",
            "crops.global_size=32",
            f"optim.batch_size={BATCH}",
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            "progress=false",
            "ray.num_cpus=2",
            "torch_threads=1",
            f"eval.data={labeled_colours(tmp_path / 'labeled')}",  # the learning curve, every 4 steps and at the end
            "eval.every=4",
        ]
    )
    assert distilled == 0, capsys.readouterr().err[-3000:]
    rows = _rows(student_out)
    assert [int(r["step"]) for r in rows] == list(range(1, N_IMAGES // BATCH + 1))
    assert all(np.isfinite(r["distill"]) and r["distill"] >= -1e-6 for r in rows)  # a KL divergence
    assert [int(r["step"]) for r in rows if "knn_top1" in r] == [4, N_IMAGES // BATCH]
    assert all(r["knn_top1"] == 1.0 and r["embedding_std"] > 0 for r in rows if "knn_top1" in r)
    cnn_file = tmp_path / "cnn.safetensors"
    assert main(["export", str(student_out), "--out", str(cnn_file)]) == 0, capsys.readouterr().err
    cnn = timm.create_model("resnet10t", num_classes=0, checkpoint_path=str(cnn_file))
    assert cnn.num_features == 512
    student_state, _ = read_checkpoint(checkpoints(student_out)[-1])
    assert not any(k.startswith("teacher.") for k in student_state["method"])  # the frozen teacher is not copied


@pytest.mark.slow  # ~2 min on 2 cores: `make test-all`
def test_worker_killed_mid_run_recovers_from_checkpoint(parts: Path, tmp_path: Path) -> None:
    out = tmp_path / "failover"
    proc = _start(out, parts, "max_failures=1", delay=1.0)
    _wait_for(lambda: _registered_step(out) >= 4, proc)
    workers = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "RayTrainWorker" in " ".join(p.cmdline()) and "Controller" not in " ".join(p.cmdline())
    ]
    assert workers, "no Ray Train worker process found"
    killed = {w.pid for w in workers}
    for w in workers:
        w.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    steps = [int(r["step"]) for r in _rows(out)]
    assert set(steps) == set(range(1, TOTAL_STEPS + 1))  # every step trained, the run completed
    # Restarted from the checkpoint, not from scratch: once past step 4 the log never goes back to the start.
    assert min(steps[steps.index(5) :]) >= 5
    meta = read_checkpoint(checkpoints(out)[-1])[1]
    assert meta["step"] == TOTAL_STEPS
    assert meta["pid"] not in killed  # a new worker process finished the run


@contextlib.contextmanager
def _small_disk(folder: Path, mb: int) -> Iterator[Path]:
    """A real filesystem that can fill up: a tmpfs of ``mb`` MiB mounted on ``folder`` (needs root, as CI has)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Write a file that leaves ``leave`` bytes free on ``disk``, as another job filling the disk would.

    The training run keeps writing meanwhile (a checkpoint may land between the ``statvfs`` and the last write): when
    the disk fills first, the filler gives ``leave`` bytes back."""
    st = os.statvfs(disk)
    filler = disk / "filler.bin"
    with filler.open("wb", buffering=0) as fh:
        remaining = st.f_bavail * st.f_frsize - leave
        try:
            while remaining > 0:
                remaining -= fh.write(b"\0" * min(remaining, 2**22)) or 0
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            fh.truncate(max(0, fh.tell() - leave))
    return filler


@pytest.mark.slow  # two trainings on a small tmpfs, about 160 s: `make test-all` (keeps `make test` under 20 minutes)
def test_disk_full_while_a_checkpoint_is_written_fails_naming_it_then_resume_works(parts: Path, tmp_path: Path) -> None:
    """The disk fills after the first checkpoint, leaving room for the metrics log but not for a checkpoint: the
    run fails as ``lvdkit: error:`` naming the checkpoint, the earlier checkpoint stays usable, and once space is
    freed ``resume=true`` finishes the run."""
    with _small_disk(tmp_path / "disk", 64) as disk:
        out = disk / "run"
        proc = _start(out, parts, delay=1.0)
        _wait_for(lambda: _registered_step(out) >= 2, proc)
        size = sum(f.stat().st_size for f in checkpoints(out)[-1].iterdir())
        filler = _fill(disk, leave=size // 2)
        _, stderr = proc.communicate(timeout=300)
        message = stderr.decode()
        assert proc.returncode == 2, message[-3000:]
        assert "lvdkit: error: disk full" in message and "checkpoint_* (step" in message, message[-3000:]
        assert "resume=true" in message
        kept = checkpoints(out)
        state, meta = read_checkpoint(kept[-1])  # the last complete checkpoint loads
        assert meta["step"] >= 2 and state["method"]
        filler.unlink()
        done = run_cli("pretrain", f"out={out}", f"data={parts}", *TINY_VIT, "resume=true", timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert read_checkpoint(checkpoints(out)[-1])[1]["step"] == TOTAL_STEPS
