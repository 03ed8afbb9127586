"""One prepared GPU check (issue 13): what one accelerator machine does for lvdkit, written to one JSON file.

Runs on a bare machine with PyTorch, torchvision, timm, pyarrow and Pillow only (no Ray, no Faiss, no lvdkit
install, no internet): lvdkit's source comes on ``PYTHONPATH=src`` and only modules that import neither Ray nor
Faiss are used. Sections, each timed and wrapped (a failing one records its error and the others still run):

- ``embed``: ViT-S/14 (timm ``vit_small_patch14_dinov2``, random init, 224 px, bf16) model-only img/s; Pillow JPEG
  decode img/s on all cores (a process pool over in-memory JPEGs of about 500x375 px made from smooth noise and
  gradients); lvdkit's device decode (``embed.decode: device``: one batched ``decode_jpeg`` call, nvJPEG on the GPU,
  then ``prepare_tensor``, the embed stage's box and Pillow's filter on the GPU); end to end, JPEG bytes ->
  embeddings (that path + the model on CUDA; Pillow + model on CPU); and how far the device path's pixels and
  embeddings are from Pillow's on the same JPEGs (max grey levels, min cosine).
- ``views``: DINOv2's training views (2 x 224 + 8 x 98): Pillow's path on all cores against ``crops.decode:
  device`` (header read and crop plan on all cores, decode, crops and colour ops on the GPU), img/s.
- ``train``: lvdkit's own DINOv2 training step (:func:`lvdkit.pretrain.train.train_step`) with
  ``configs/pretrain_vits14.yaml`` (2 x 224 + 8 x 98 crops, 65,536 prototypes, bf16 autocast, SDPA) on pre-made
  crops: img/s, FLOPs per step (``torch.utils.flop_counter``), MFU against the GPU's dense bf16 peak, peak memory.
- ``distill``: the distillation step of ``configs/distill_vits14_resnet50.yaml`` (a frozen random-init ViT-S/14
  teacher -> timm ResNet-50): img/s and peak memory.
- ``knn``: exact k-NN of 1M x 256 vectors among themselves, k = 64 (Faiss GPU when installed, else plain torch:
  chunked matmul + topk); ``kmeans``: Lloyd k-means of 1M x 384 vectors, k = 10,000, 20 iterations (Faiss GPU, else
  torch: chunked argmin + index_add_).
- ``fsdp``: a single-rank FSDP2 (``torch.distributed.fsdp.fully_shard``) smoke run of a ViT-L/14: step time and peak
  memory; "unavailable" when this torch has no ``fully_shard``.

``--size full``: the sizes above, meant to finish within 6 minutes on one H200 (not yet run on one; k-NN and
k-means stop at ``max_section_s`` and extrapolate, timed loops at ``max_timed_s``). ``--size tiny``: CPU smoke
sizes, under a minute on 2 cores; ``tests/test_gpu_check.py`` runs it. ``--size auto``: full with CUDA, else tiny.

Usage: bench/gpu_check.sh [--json gpu_check.json] [--size auto|full|tiny] [--sections embed,train,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import multiprocessing
import multiprocessing.pool
import os
import platform
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("embed", "views", "train", "distill", "knn", "kmeans", "fsdp")
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as timm's DINOv2 ViTs use
STD = (0.229, 0.224, 0.225)
# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of the device name; the first match wins, so
# the more specific names come first. MFU is null for a GPU not listed.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


@dataclasses.dataclass(frozen=True)
class Size:
    """Every section's problem size; ``full`` is the issue's, ``tiny`` a CPU smoke run."""

    name: str
    embed_model: str
    embed_kwargs: tuple[tuple[str, Any], ...]
    embed_img: int
    embed_batch: int
    n_jpegs: int  # distinct JPEGs made (decoded ``decode_passes`` times over for the decode rates)
    jpeg_wh: tuple[int, int]
    decode_passes: int
    views_jpegs: int  # JPEGs made into DINOv2 training views by each path
    train_overrides: tuple[str, ...]  # over configs/pretrain_vits14.yaml
    distill_overrides: tuple[str, ...]  # over configs/distill_vits14_resnet50.yaml
    warmup: int  # untimed steps before each timed loop
    steps: int  # timed steps, unless max_timed_s runs out first
    max_timed_s: float
    max_section_s: float  # k-NN and k-means stop here and extrapolate (equal work per chunk / round)
    knn_n: int
    knn_d: int
    knn_k: int
    knn_chunk: int  # query rows per (chunk, N) similarity block
    kmeans_n: int
    kmeans_d: int
    kmeans_k: int
    kmeans_iters: int
    kmeans_chunk: int  # rows per (chunk, k) distance block
    fsdp_model: str
    fsdp_kwargs: tuple[tuple[str, Any], ...]
    fsdp_img: int
    fsdp_batch: int


_TEACHER = ("distill.teacher=timm:vit_small_patch14_dinov2", "distill.teacher_pretrained=false")
FULL = Size(
    name="full",
    embed_model="vit_small_patch14_dinov2",
    embed_kwargs=(),
    embed_img=224,
    embed_batch=256,
    n_jpegs=2048,
    jpeg_wh=(500, 375),
    decode_passes=2,
    views_jpegs=1024,
    train_overrides=(),
    distill_overrides=_TEACHER,  # random init: the check needs no trained export
    warmup=3,
    steps=15,
    max_timed_s=30.0,
    max_section_s=120.0,
    knn_n=1_000_000,
    knn_d=256,
    knn_k=64,
    knn_chunk=2048,  # a 2048 x 1M fp32 block is 8 GiB
    kmeans_n=1_000_000,
    kmeans_d=384,
    kmeans_k=10_000,
    kmeans_iters=20,
    kmeans_chunk=65_536,
    fsdp_model="vit_large_patch14_dinov2",
    fsdp_kwargs=(),
    fsdp_img=224,
    fsdp_batch=32,
)
TINY = Size(
    name="tiny",
    embed_model="vit_tiny_patch16_224",
    embed_kwargs=(("patch_size", 8), ("depth", 2)),
    embed_img=32,
    embed_batch=16,
    n_jpegs=64,
    jpeg_wh=(320, 240),
    decode_passes=1,
    views_jpegs=16,
    train_overrides=(
        "model=timm:vit_tiny_patch16_224",
        "model_kwargs={patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}",
        "crops.global_size=32",
        "crops.local_size=16",
        "crops.n_local=2",
        "dinov2.head_out_dim=256",
        "dinov2.head_hidden_dim=64",
        "dinov2.head_bottleneck_dim=32",
        "optim.batch_size=4",
    ),
    distill_overrides=(
        *_TEACHER[1:],
        "distill.teacher=timm:vit_tiny_patch16_224",
        "distill.teacher_kwargs={patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}",
        "model=timm:resnet10t",
        "crops.global_size=32",
        "optim.batch_size=4",
    ),
    warmup=1,
    steps=2,
    max_timed_s=5.0,
    max_section_s=30.0,
    knn_n=2000,
    knn_d=32,
    knn_k=16,
    knn_chunk=512,
    kmeans_n=2000,
    kmeans_d=16,
    kmeans_k=16,
    kmeans_iters=3,
    kmeans_chunk=512,
    fsdp_model="vit_tiny_patch16_224",
    fsdp_kwargs=(("patch_size", 8), ("depth", 2), ("embed_dim", 64), ("num_heads", 2)),
    fsdp_img=32,
    fsdp_batch=4,
)


# --- timing and the machine ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[int], object], device: torch.device, warmup: int, steps: int, max_s: float
) -> tuple[int, float]:
    """Run ``fn(i)`` ``warmup`` times untimed, then up to ``steps`` times (fewer when ``max_s`` runs out, at least
    one); returns (timed calls, their seconds)."""
    for i in range(warmup):
        fn(i)
    sync(device)
    start, done = time.perf_counter(), 0
    while done < steps and (done == 0 or time.perf_counter() - start < max_s):
        fn(warmup + done)
        done += 1
    sync(device)
    return done, time.perf_counter() - start


def peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors since the last reset, GiB; None on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bf16_flops(name: str | None) -> float | None:
    """The dense bf16 peak of a GPU by name (``PEAK_BF16``), None when not known."""
    return next((peak for key, peak in PEAK_BF16 if name and key in name), None)


def hardware() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "gpu_name": props.name if props else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_memory_gib": props.total_memory / 2**30 if props else None,
        "peak_bf16_flops": peak_bf16_flops(props.name) if props else None,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }


def versions() -> dict[str, Any]:
    import PIL
    import timm
    import torchvision

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


# --- JPEGs and decoding -------------------------------------------------------------------------------------------


def make_jpeg(args: tuple[int, int, int]) -> bytes:
    """(seed, width, height) -> JPEG bytes of a photo-like image about that size (x 0.8-1.2, a quarter of them in
    portrait): smooth colour blobs (low-resolution noise, bicubic upsampled), a brightness gradient in a random
    direction and fine grain, so it compresses like a photo rather than a flat or pure-noise picture, and a batch
    mixes sizes as real pools do."""
    seed, w, h = args
    rng = np.random.default_rng(seed)
    w, h = round(w * rng.uniform(0.8, 1.2)), round(h * rng.uniform(0.8, 1.2))
    w, h = (h, w) if rng.uniform() < 0.25 else (w, h)
    small = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(4, 12)), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (xx / w * np.cos(angle) + yy / h * np.sin(angle))[..., None] * rng.uniform(-80, 80, 3)
    pixels = base + ramp + rng.normal(0, 4, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue()


def pil_decode(data: bytes) -> tuple[int, int]:
    """Decode one JPEG with Pillow to RGB (the pool's unit of work); returns its size, not the pixels, so the rate
    is the decoder's and not pickling's."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").size


def preprocess(side: int) -> Any:
    """The embed stage's geometry for a ViT at ``side`` px: timm's resize of the shorter side and centre crop
    (crop_pct 1), bicubic."""
    from lvdkit.embeddings.preprocess import Preprocess

    return Preprocess((side, side), "center_crop", 1.0)


def pil_decode_resize(args: tuple[bytes, int]) -> np.ndarray:
    """(JPEG bytes, S) -> (S, S, 3) uint8: lvdkit's CPU path (``decode_rgb`` then ``Preprocess.prepare``)."""
    from lvdkit.core.image import decode_rgb

    data, side = args
    return preprocess(side).prepare(decode_rgb(data))


def device_decode(blobs: list[bytes], side: int, device: torch.device) -> Tensor:
    """A batch of JPEGs -> (B, S, S, 3) uint8 on ``device``: lvdkit's embed path with ``embed.decode: device``
    (one batched ``decode_jpeg`` call, nvJPEG on a GPU, then ``prepare_tensor``: Pillow's box and filter there)."""
    from lvdkit.core.device_jpeg import decode_jpegs
    from lvdkit.embeddings.device_decode import prepare_tensor

    pre = preprocess(side)
    images = decode_jpegs(blobs, device)
    return torch.stack([prepare_tensor(im, pre) for im in images if im is not None])


def normalize(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) ImageNet-normalised ``dtype``."""
    x = x.permute(0, 3, 1, 2).float()
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255
    return ((x - mean) / std).to(dtype)


def batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# --- sections -----------------------------------------------------------------------------------------------------


def embed_section(size: Size, device: torch.device, pool: multiprocessing.pool.Pool) -> dict[str, Any]:
    """Model-only, Pillow decode, GPU decode and end-to-end img/s of the ViT embedding path."""
    import timm

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 matmuls on CPU are slow, not representative
    kwargs = dict(size.embed_kwargs)
    model = timm.create_model(size.embed_model, pretrained=False, num_classes=0, img_size=size.embed_img, **kwargs)
    model = model.to(device, dtype).eval()
    out: dict[str, Any] = {"model": size.embed_model, "kwargs": kwargs, "img_size": size.embed_img, "dtype": str(dtype)}
    out["batch"], b, s = size.embed_batch, size.embed_batch, size.embed_img
    x = torch.randn(b, 3, s, s, device=device, dtype=dtype)
    with torch.inference_mode():
        n, secs = timed(lambda i: model(x), device, size.warmup, size.steps * 2, size.max_timed_s)
    out["model_img_per_s"] = n * b / secs

    jobs = [(seed, *size.jpeg_wh) for seed in range(size.n_jpegs)]
    blobs = pool.map(make_jpeg, jobs, chunksize=8)
    out.update(n_jpegs=len(blobs), jpeg_wh=list(size.jpeg_wh), jpeg_kb_mean=sum(map(len, blobs)) / len(blobs) / 1024)
    work = blobs * size.decode_passes
    start = time.perf_counter()
    pool.map(pil_decode, work, chunksize=16)
    out["pil_decode_img_per_s"] = len(work) / (time.perf_counter() - start)
    out["pil_processes"] = os.cpu_count()
    out.update(_device_decode_rates(blobs, size, device, model, dtype))
    out.update(_device_vs_pillow(blobs[: size.embed_batch], size, device, model, dtype, pool))
    if not cuda:
        out["gpu_note"] = "no CUDA: the device path ran on the CPU (libjpeg-turbo); end to end is Pillow + model"
        out["end_to_end_img_per_s"] = _cpu_end_to_end(blobs, size, pool, model, dtype)
    out["peak_gib"] = peak_gib(device)
    return out


def _device_decode_rates(
    blobs: list[bytes], size: Size, device: torch.device, model: torch.nn.Module, dtype: torch.dtype
) -> dict[str, float]:
    """lvdkit's device path: decode + resize img/s, and JPEG bytes -> embeddings img/s, both on ``device``."""
    groups = batches(blobs, size.embed_batch)
    device_decode(groups[0], size.embed_img, device)  # warm-up: nvJPEG handles and kernels
    sync(device)
    start = time.perf_counter()
    for _ in range(size.decode_passes):
        for group in groups:
            device_decode(group, size.embed_img, device)
    sync(device)
    decode_rate = len(blobs) * size.decode_passes / (time.perf_counter() - start)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(size.decode_passes):
            for group in groups:
                model(normalize(device_decode(group, size.embed_img, device), dtype))
    sync(device)
    end_rate = len(blobs) * size.decode_passes / (time.perf_counter() - start)
    out = {"gpu_decode_img_per_s": decode_rate, "device_end_to_end_img_per_s": end_rate}
    if device.type == "cuda":
        out["end_to_end_img_per_s"] = end_rate
    return out


def _device_vs_pillow(
    blobs: list[bytes],
    size: Size,
    device: torch.device,
    model: torch.nn.Module,
    dtype: torch.dtype,
    pool: multiprocessing.pool.Pool,
) -> dict[str, float]:
    """How far the device path's model input and embeddings are from the CPU path's on the same JPEGs (nvJPEG's
    IDCT differs from libjpeg-turbo's a little; on a CPU only the resize's rounding differs)."""
    on_device = device_decode(blobs, size.embed_img, device)
    pillow = torch.from_numpy(np.stack(pool.map(pil_decode_resize, [(b, size.embed_img) for b in blobs])))
    diff = (on_device.cpu().int() - pillow.int()).abs()
    with torch.inference_mode():
        a = F.normalize(model(normalize(on_device, dtype)).float(), dim=1)
        b = F.normalize(model(normalize(pillow.to(device), dtype)).float(), dim=1)
    return {
        "device_vs_pillow_max_grey": int(diff.max()),
        "device_vs_pillow_mean_grey": float(diff.float().mean()),
        "device_vs_pillow_min_cosine": float((a * b).sum(1).min()),
    }


def _cpu_end_to_end(
    blobs: list[bytes], size: Size, pool: multiprocessing.pool.Pool, model: torch.nn.Module, dtype: torch.dtype
) -> float:
    """JPEG bytes -> embeddings img/s on CPU: the pool decodes and resizes while this process runs the model."""
    start = time.perf_counter()
    decoded = pool.imap(pil_decode_resize, [(blob, size.embed_img) for blob in blobs], chunksize=8)
    with torch.inference_mode():
        group: list[np.ndarray] = []
        for image in decoded:
            group.append(image)
            if len(group) == size.embed_batch:
                model(normalize(torch.from_numpy(np.stack(group)), dtype))
                group = []
        if group:
            model(normalize(torch.from_numpy(np.stack(group)), dtype))
    return len(blobs) / (time.perf_counter() - start)


def views_section(size: Size, device: torch.device, pool: multiprocessing.pool.Pool) -> dict[str, Any]:
    """DINOv2's training views (the preset's 2 global + n local crops): Pillow's path (Ray Data's task: decode,
    crops, colour ops) on all cores, against ``crops.decode: device`` (the task's header read and crop plan on all
    cores, then decode, crops and colour ops on ``device``), img/s each."""
    from lvdkit.core.settings import load_config
    from lvdkit.pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, ROOT / "configs" / "pretrain_vits14.yaml", list(size.train_overrides))
    blobs = pool.map(make_jpeg, [(seed, *size.jpeg_wh) for seed in range(size.views_jpegs)], chunksize=8)
    chunks = [(cfg.crops, group) for group in batches(blobs, 8)]
    start = time.perf_counter()
    pool.map(_pillow_views, chunks)
    pillow_rate = len(blobs) / (time.perf_counter() - start)
    start = time.perf_counter()
    plans = pool.map(_plan_views, chunks)
    plan_rate = len(blobs) / (time.perf_counter() - start)
    from lvdkit.pretrain.augment import views_of
    from lvdkit.pretrain.device_views import DeviceViews

    cut = DeviceViews(views_of("dinov2", cfg.crops), device)
    cut(plans[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    for plan in plans:
        cut(plan)
    sync(device)
    cut_rate = len(blobs) / (time.perf_counter() - start)
    c = cfg.crops
    return {
        "crops": [c.global_size, c.local_size, c.n_local],
        "n_jpegs": len(blobs),
        "pillow_views_img_per_s": pillow_rate,
        "pillow_processes": os.cpu_count(),
        "plan_img_per_s": plan_rate,
        "device_views_img_per_s": cut_rate,
        "peak_gib": peak_gib(device),
    }


def _pillow_views(args: tuple[Any, list[bytes]]) -> int:
    from lvdkit.pretrain.augment import AugmentBatch

    crops, blobs = args
    return len(AugmentBatch("dinov2", crops, "image")({"image": np.asarray(blobs, dtype=object)})["global_0"])


def _plan_views(args: tuple[Any, list[bytes]]) -> dict[str, np.ndarray]:
    from lvdkit.pretrain.augment import AugmentBatch

    crops, blobs = args
    images = np.empty(len(blobs), dtype=object)
    images[:] = blobs
    return AugmentBatch("dinov2", crops, "image", on_device=True)({"image": images})


def fake_batch(cfg: Any, device: torch.device) -> dict[str, Tensor]:
    """One optimizer step's uint8 views as the method's augmentation hands them over, made on ``device``: DINOv2's
    two globals (B, 3, G, G) and locals (B, n, 3, L, L), or distillation's one view (B, 3, G, G)."""
    from lvdkit.pretrain.augment import GLOBAL_KEYS, LOCAL_KEY, VIEW_KEY

    b, c = cfg.optim.step_batch, cfg.crops

    def crops(*shape: int) -> Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)

    if cfg.method == "distillation":
        return {VIEW_KEY: crops(b, 3, c.global_size, c.global_size)}
    batch = {key: crops(b, 3, c.global_size, c.global_size) for key in GLOBAL_KEYS}
    if c.n_local:
        batch[LOCAL_KEY] = crops(b, c.n_local, 3, c.local_size, c.local_size)
    return batch


def train_throughput(preset: str, overrides: tuple[str, ...], size: Size, device: torch.device) -> dict[str, Any]:
    """lvdkit's own training step (``train_step``: optimizer groups, schedules, clipping, teacher/queue update) on
    pre-made crops of the preset's batch: img/s, FLOPs per step, MFU on a known GPU, peak memory."""
    from torch.utils.flop_counter import FlopCounterMode

    from lvdkit.core.settings import load_config
    from lvdkit.pretrain.config import PretrainConfig
    from lvdkit.pretrain.train import build_method, build_optimizer, build_schedules, train_step

    cfg = load_config(PretrainConfig, ROOT / "configs" / preset, ["progress=false", *overrides])
    torch.manual_seed(0)
    method = build_method(cfg, 1_000_000).to(device).train()  # 1M images: the largest distillation queue
    optimizer = build_optimizer(method, cfg)
    schedules = build_schedules(cfg, size.warmup + 1 + size.steps, 1, 1)  # the timed steps after the frozen layer
    batch = fake_batch(cfg, device)
    bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")

    def step(i: int) -> dict[str, Any]:
        return train_step(method, method.student, optimizer, batch, schedules, cfg, 0, i, bf16)

    for i in range(size.warmup):
        step(i)
    counter = FlopCounterMode(display=False)
    with counter:  # one step (its own, untimed: counting slows it)
        row = step(size.warmup)
    flops = float(counter.get_total_flops())
    reset_peak(device)
    n, secs = timed(lambda i: step(size.warmup + 1 + i), device, 0, size.steps, size.max_timed_s)
    s_per_step, c = secs / n, cfg.crops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_bf16_flops(name)
    return {
        "preset": f"configs/{preset}",
        "overrides": list(overrides),
        "method": cfg.method,
        "model": cfg.model,
        "teacher": cfg.distill.teacher if cfg.method == "distillation" else None,
        "batch": cfg.optim.step_batch,
        "crops": [c.global_size, c.local_size, c.n_local] if cfg.method != "distillation" else [c.global_size],
        "bf16": bf16,
        "timed_steps": n,
        "s_per_step": s_per_step,
        "img_per_s": cfg.optim.step_batch / s_per_step,
        "flops_per_step": flops,
        "tflops_per_s": flops / s_per_step / 1e12,
        "mfu": flops / s_per_step / peak if peak else None,
        "peak_gib": peak_gib(device),
        "loss": row["loss"],
    }


def faiss_gpu() -> Any | None:
    """The faiss module when it is installed with GPUs, else None (faiss-cpu reports 0 GPUs)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss if getattr(faiss, "get_num_gpus", lambda: 0)() > 0 else None


def backend_name() -> str:
    return "faiss-gpu" if faiss_gpu() is not None else "torch (faiss-gpu not installed)"


def clustered(n: int, d: int, device: torch.device, seed: int = 0, centres: int = 1000) -> Tensor:
    """(n, d) float32 L2-normalised vectors around ``centres`` random centres: embeddings with cluster structure."""
    g = torch.Generator(device=device).manual_seed(seed)
    c = torch.randn(min(centres, n), d, device=device, generator=g)
    which = torch.randint(0, c.shape[0], (n,), device=device, generator=g)
    x = c[which] + 0.7 * torch.randn(n, d, device=device, generator=g)
    return F.normalize(x, dim=1)


def knn(x: Tensor, k: int, chunk: int, max_s: float | None = None) -> tuple[Tensor, Tensor]:
    """Exact inner-product k-NN of every row of ``x`` (N, D) among all rows (itself included), as Faiss'
    IndexFlatIP: similarities (R, k) descending and indices (R, k) int64 of the first R rows, R = N unless
    ``max_s`` ran out first (at least one chunk). Query chunks bound the (chunk, N) similarity block."""
    sims, idx = [], []
    start_time = time.perf_counter()
    for start in range(0, x.shape[0], chunk):
        s, i = (x[start : start + chunk] @ x.T).topk(k, dim=1)  # (c, N) -> (c, k), sorted
        sims.append(s)
        idx.append(i)
        if max_s is not None:
            sync(x.device)
            if time.perf_counter() - start_time > max_s:
                break
    return torch.cat(sims), torch.cat(idx)


def assign(x: Tensor, centroids: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Nearest centroid by squared L2 for each row of ``x`` (N, D) among ``centroids`` (K, D): indices (N,) int64
    and squared distances (N,), in row chunks that bound the (chunk, K) block."""
    c_sq = (centroids * centroids).sum(1)  # (K,)
    labels, dists = [], []
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        d = (part * part).sum(1, keepdim=True) - 2 * part @ centroids.T + c_sq  # (c, K)
        value, index = d.min(dim=1)
        labels.append(index)
        dists.append(value.clamp_min(0))
    return torch.cat(labels), torch.cat(dists)


def lloyd_step(x: Tensor, centroids: Tensor, chunk: int) -> tuple[Tensor, Tensor, float]:
    """One Lloyd round: assign every row, then move each centroid to its rows' mean (an empty cluster keeps its
    centroid). Returns (new centroids (K, D), assignments (N,), inertia of that assignment)."""
    labels, dists = assign(x, centroids, chunk)
    sums = torch.zeros_like(centroids).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=centroids.shape[0])
    moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(x.dtype), centroids)
    return moved, labels, float(dists.double().sum())


def kmeans(
    x: Tensor, k: int, iters: int, chunk: int, seed: int = 0, max_s: float | None = None
) -> tuple[Tensor, list[float]]:
    """Lloyd k-means of ``x`` (N, D) from ``k`` distinct random rows: centroids (K, D) after ``iters`` rounds (fewer
    when ``max_s`` runs out, at least one) and the inertia (sum of squared distances) of each round's assignment
    plus the final one (rounds + 1 values)."""
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=g)[:k].to(x.device)].clone()
    inertia: list[float] = []
    start = time.perf_counter()
    for _ in range(iters):
        centroids, _, value = lloyd_step(x, centroids, chunk)  # float(): synchronises
        inertia.append(value)
        if max_s is not None and time.perf_counter() - start > max_s:
            break
    inertia.append(float(assign(x, centroids, chunk)[1].double().sum()))
    return centroids, inertia


def knn_section(size: Size, device: torch.device) -> dict[str, Any]:
    """Exact k-NN of ``knn_n`` x ``knn_d`` vectors among themselves."""
    x = clustered(size.knn_n, size.knn_d, device)
    out: dict[str, Any] = {"n": size.knn_n, "d": size.knn_d, "k": size.knn_k, "backend": backend_name()}
    sync(device)
    start = time.perf_counter()
    faiss = faiss_gpu()
    if faiss is not None:
        xs = x.cpu().numpy()
        sims, _ = faiss.knn_gpu(faiss.StandardGpuResources(), xs, xs, size.knn_k, metric=faiss.METRIC_INNER_PRODUCT)
        self_found = float(np.mean(sims[:, 0] > 0.999))
    else:
        sims_t, _ = knn(x, size.knn_k, size.knn_chunk, size.max_section_s)
        sync(device)
        rows = sims_t.shape[0]
        self_found = float((sims_t[:, 0] > 0.999).float().mean())
    measured = time.perf_counter() - start
    rows = size.knn_n if faiss is not None else rows
    # past the time budget the rest is extrapolated (rows are equal work), and "complete" says so
    out.update(seconds_knn=measured * size.knn_n / rows, seconds_measured=measured, rows_done=rows)
    out.update(complete=rows == size.knn_n, dtype="float32", self_first=self_found)
    out["peak_gib"] = peak_gib(device)
    return out


def kmeans_section(size: Size, device: torch.device) -> dict[str, Any]:
    """Lloyd k-means of ``kmeans_n`` x ``kmeans_d`` vectors into ``kmeans_k`` clusters."""
    x = clustered(size.kmeans_n, size.kmeans_d, device, seed=1, centres=2 * size.kmeans_k)
    out: dict[str, Any] = {"n": size.kmeans_n, "d": size.kmeans_d, "k": size.kmeans_k, "iterations": size.kmeans_iters}
    out["backend"] = backend_name()
    sync(device)
    start = time.perf_counter()
    faiss = faiss_gpu()
    if faiss is not None:
        km = faiss.Kmeans(size.kmeans_d, size.kmeans_k, niter=size.kmeans_iters, gpu=True, seed=0)
        km.train(x.cpu().numpy())
        inertia = [float(v) for v in km.obj]
    else:
        _, inertia = kmeans(x, size.kmeans_k, size.kmeans_iters, size.kmeans_chunk, max_s=size.max_section_s)
    measured = time.perf_counter() - start
    rounds = size.kmeans_iters if faiss is not None else max(1, len(inertia) - 1)
    # past the time budget the remaining rounds are extrapolated, and "complete" says so
    out.update(seconds_kmeans=measured * size.kmeans_iters / rounds, seconds_measured=measured, rounds_done=rounds)
    out.update(complete=rounds >= size.kmeans_iters, inertia_first=inertia[0], inertia_last=inertia[-1])
    out["peak_gib"] = peak_gib(device)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fsdp_section(size: Size, device: torch.device) -> dict[str, Any]:
    """A one-rank FSDP2 run: ``fully_shard`` on every block then the root, AdamW steps on random images (bf16
    parameters, fp32 reductions on CUDA); step time and peak memory. Proves the API works here, not scaling."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        return {"available": False, "note": f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard"}
    import timm
    import torch.distributed as dist

    cuda = device.type == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        kwargs = dict(size.fsdp_kwargs)
        model = timm.create_model(size.fsdp_model, pretrained=False, num_classes=0, img_size=size.fsdp_img, **kwargs)
        model = model.to(device)
        n_params = sum(p.numel() for p in model.parameters())
        # bf16 parameters, fp32 gradient reductions on CUDA; no casts on CPU (bf16 matmuls are slow there)
        bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        policy = bf16 if cuda else MixedPrecisionPolicy()
        blocks: Any = model.blocks
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(size.fsdp_batch, 3, size.fsdp_img, size.fsdp_img, device=device)
        losses: list[float] = []

        def step(i: int) -> None:
            loss = model(x).float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))

        reset_peak(device)
        with warnings.catch_warnings():  # the root returns the CLS slice, a view; nothing writes into it in place
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
            n, secs = timed(step, device, 1, max(2, size.steps // 3), size.max_timed_s)
    finally:
        dist.destroy_process_group()
    return {
        "available": True,
        "backend": backend,
        "model": size.fsdp_model,
        "params_m": n_params / 1e6,
        "batch": size.fsdp_batch,
        "img_size": size.fsdp_img,
        "s_per_step": secs / n,
        "img_per_s": n * size.fsdp_batch / secs,
        "peak_gib": peak_gib(device),
        "loss_finite": all(np.isfinite(losses)),
    }


# --- driver -------------------------------------------------------------------------------------------------------


def run_section(name: str, fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run one section: its result with ``error`` None and ``seconds``, or the error string and traceback."""
    print(f"[gpu_check] {name} ...", flush=True)
    reset_peak(device)
    start = time.perf_counter()
    try:
        out = {**fn(), "error": None}
    except Exception as exc:  # one broken section must not cost the others' figures
        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
    out["seconds"] = time.perf_counter() - start
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"[gpu_check] {name}: {out['seconds']:.1f} s{'' if out['error'] is None else ' ERROR ' + out['error']}")
    return out


def summary(report: dict[str, Any]) -> str:
    """A few human-readable lines of the report's main figures."""

    def f(value: Any, fmt: str = ".0f") -> str:
        return "-" if value is None else format(value, fmt)

    def partial(r: dict[str, Any]) -> str:
        return "" if r["complete"] else f" (extrapolated from {r['seconds_measured']:.0f} s)"

    hw, s = report["hardware"], report["sections"]
    lines = [f"gpu_check {report['size']} on {hw['gpu_name'] or 'CPU'} x{hw['gpu_count']}, {hw['cpu_count']} CPUs"]
    texts = {
        "embed": lambda r: (
            f"model {f(r['model_img_per_s'])} img/s, Pillow decode {f(r['pil_decode_img_per_s'])}, "
            f"device decode {f(r['gpu_decode_img_per_s'])}, end to end {f(r['end_to_end_img_per_s'])}; device vs "
            f"Pillow max {r['device_vs_pillow_max_grey']} grey, cosine {f(r['device_vs_pillow_min_cosine'], '.5f')}"
        ),
        "views": lambda r: (
            f"DINOv2 views: Pillow {f(r['pillow_views_img_per_s'])} img/s on {r['pillow_processes']} cores, "
            f"plan {f(r['plan_img_per_s'])}, device {f(r['device_views_img_per_s'])}"
        ),
        "train": lambda r: (
            f"{r['model']} {f(r['img_per_s'], '.1f')} img/s, {f(r['tflops_per_s'], '.1f')} TFLOP/s, "
            f"MFU {f(r['mfu'], '.3f')}, peak {f(r['peak_gib'], '.1f')} GiB"
        ),
        "distill": lambda r: f"{r['model']} {f(r['img_per_s'], '.1f')} img/s, peak {f(r['peak_gib'], '.1f')} GiB",
        "knn": lambda r: f"{r['n']} x {r['d']} k={r['k']}: {f(r['seconds_knn'], '.2f')} s{partial(r)} ({r['backend']})",
        "kmeans": lambda r: (
            f"{r['n']} x {r['d']} k={r['k']} x{r['iterations']}: {f(r['seconds_kmeans'], '.2f')} s{partial(r)}"
        ),
        "fsdp": lambda r: (
            f"{r['model']} {f(r['s_per_step'], '.3f')} s/step, peak {f(r['peak_gib'], '.1f')} GiB"
            if r.get("available")
            else r["note"]
        ),
    }
    for name, r in s.items():
        lines.append(f"  {name:8s} " + (f"ERROR {r['error']}" if r.get("error") else texts[name](r)))
    lines.append(f"  wall {report['wall_s']:.0f} s -> {report['json']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="gpu_check.json", help="where the report goes")
    parser.add_argument("--size", choices=("auto", "full", "tiny"), default="auto", help="auto: full with CUDA")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: 1 for tiny, torch's for full)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
    return args


def decode_pool() -> multiprocessing.pool.Pool:
    """One process per core for Pillow. Forked while this process has no CUDA context (a forked child must not
    inherit one), which also spares each worker re-importing torch; spawn where fork does not exist."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm loads: without internet the hub would retry for ~50 s
    pool = decode_pool() if {"embed", "views"} & set(args.sections) else None  # before CUDA starts
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = FULL if args.size == "full" or (args.size == "auto" and cuda) else TINY
    # tiny: one thread, since on a busy 2-core machine two spinning intra-op threads made a tiny step 100x slower
    torch.set_num_threads(args.threads or (1 if size is TINY else torch.get_num_threads()))
    report: dict[str, Any] = {"size": size.name, "device": str(device), "json": args.json, "started": time.time()}
    report.update(hardware=hardware(), versions=versions(), torch_threads=torch.get_num_threads(), sections={})
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "embed": lambda: embed_section(size, device, pool) if pool else {},
        "views": lambda: views_section(size, device, pool) if pool else {},
        "train": lambda: train_throughput("pretrain_vits14.yaml", size.train_overrides, size, device),
        "distill": lambda: train_throughput("distill_vits14_resnet50.yaml", size.distill_overrides, size, device),
        "knn": lambda: knn_section(size, device),
        "kmeans": lambda: kmeans_section(size, device),
        "fsdp": lambda: fsdp_section(size, device),
    }
    try:
        for name in args.sections:
            report["sections"][name] = run_section(name, runners[name], device)
            report["wall_s"] = time.perf_counter() - t0
            Path(args.json).write_text(json.dumps(report, indent=2))  # after every section: a killed run keeps some
    finally:
        if pool is not None:
            pool.terminate()
    print(summary(report), flush=True)
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any(r.get("error") for r in result["sections"].values()) else 0)
