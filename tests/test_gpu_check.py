"""bench/gpu_check.py: its tiny CPU run on a machine without Ray or Faiss, and its torch k-NN / k-means against exact
numpy references (the GPU run uses the same functions at 1M rows).

The tiny run goes through every section; its train and distill sections import ``lvdkit.pretrain.train`` (and
``dinov2``, ``distill``), so passing here also checks that those modules import with Ray and Faiss unimportable,
as on the GPU machine.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
# Loaded first by the subprocess (sitecustomize on PYTHONPATH): Ray and Faiss become unimportable, as on a bare
# GPU machine, and a marker file proves the block was in place.
BLOCK = """import os, sys
sys.modules["ray"] = None
sys.modules["faiss"] = None
open(os.environ["GPU_CHECK_MARKER"], "w").write("blocked")
"""
FIGURES = {  # per section: what must be a positive number in a tiny run
    "embed": (
        "model_img_per_s",
        "pil_decode_img_per_s",
        "end_to_end_img_per_s",
        "jpeg_kb_mean",
        "gpu_decode_img_per_s",
    ),
    "views": ("pillow_views_img_per_s", "plan_img_per_s", "device_views_img_per_s"),
    "train": ("img_per_s", "s_per_step", "flops_per_step", "loss"),
    "distill": ("img_per_s", "s_per_step", "flops_per_step"),
    "knn": ("seconds_knn", "self_first"),
    "kmeans": ("seconds_kmeans", "inertia_first", "inertia_last"),
    "fsdp": ("s_per_step", "img_per_s", "params_m"),
}


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def test_tiny_run_writes_every_section_without_ray_or_faiss(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK)
    marker, out = tmp_path / "marker", tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")]), "GPU_CHECK_MARKER": str(marker)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert marker.read_text() == "blocked"
    report = json.loads(out.read_text())
    assert report["size"] == "tiny" and report["hardware"]["cpu_count"] >= 1
    assert report["versions"]["torch"] == torch.__version__
    sections = report["sections"]
    assert set(sections) == set(FIGURES)
    for name, section in sections.items():
        assert section["error"] is None, (name, section.get("traceback"))
        assert section["seconds"] > 0
        if name == "fsdp" and not _has_fully_shard():
            assert section["available"] is False
            continue
        for key in FIGURES[name]:
            assert isinstance(section[key], (int, float)) and section[key] > 0, (name, key, section[key])
    embed = sections["embed"]  # the device path ran on the CPU: the same decoder as Pillow's, resize within 1 level
    assert embed["device_vs_pillow_max_grey"] <= 1 and embed["device_vs_pillow_min_cosine"] > 0.9999
    assert sections["knn"]["backend"] == "torch (faiss-gpu not installed)"
    assert sections["kmeans"]["inertia_last"] < sections["kmeans"]["inertia_first"]
    assert sections["train"]["method"] == "dinov2" and sections["distill"]["method"] == "distillation"
    assert "gpu_check tiny" in proc.stdout  # the human-readable summary


def test_knn_returns_the_exact_neighbours() -> None:
    gc = _script()
    x = gc.clustered(500, 16, torch.device("cpu"), centres=20)
    sims, idx = gc.knn(x, 10, chunk=128)  # 500 rows: the last chunk is short
    exact = x.double().numpy() @ x.double().numpy().T  # (N, N)
    top = -np.sort(-exact, axis=1)[:, :10]
    found = np.take_along_axis(exact, idx.numpy(), axis=1)
    np.testing.assert_allclose(found, top, atol=1e-5)  # the returned rows are a true top-10, in order
    np.testing.assert_allclose(sims.numpy(), top, atol=1e-5)
    assert (idx[:, 0].numpy() == np.arange(500)).all()  # each row finds itself first
    ref = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    assert (np.sort(idx.numpy(), axis=1) == np.sort(ref, axis=1)).mean() > 0.99  # ties aside, the same indices


def test_lloyd_step_matches_numpy_and_kmeans_inertia_decreases() -> None:
    gc = _script()
    x = gc.clustered(600, 8, torch.device("cpu"), centres=20)
    start = torch.cat([x[:11], torch.full((1, 8), 100.0)])  # the last centroid is far away: its cluster is empty
    moved, labels, inertia = gc.lloyd_step(x, start, chunk=256)
    xs, cs = x.double().numpy(), start.double().numpy()
    dist = ((xs[:, None, :] - cs[None, :, :]) ** 2).sum(-1)  # (N, K)
    ref_labels = dist.argmin(1)
    assert (labels.numpy() == ref_labels).all()
    ref = np.stack([xs[ref_labels == j].mean(0) if (ref_labels == j).any() else cs[j] for j in range(12)])
    np.testing.assert_allclose(moved.numpy(), ref, atol=1e-5)
    assert moved[-1].tolist() == [100.0] * 8  # an empty cluster keeps its centroid
    assert inertia == pytest.approx(dist.min(1).sum(), rel=1e-5)
    _, history = gc.kmeans(x, 12, iters=6, chunk=256)
    assert len(history) == 7
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(history))
    assert history[-1] < history[0]


def test_mfu_peaks_by_gpu_name() -> None:
    gc = _script()
    assert gc.peak_bf16_flops("NVIDIA H200") == 989e12
    assert gc.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gc.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert gc.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gc.peak_bf16_flops("Some Future GPU") is None
    assert gc.peak_bf16_flops(None) is None
