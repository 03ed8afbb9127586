"""Pretraining configuration: one dataclass per concern, gathered in :class:`PretrainConfig`.

Defaults follow the DINOv2 paper and the facebookresearch/dinov2 ViT-S/B configs (``ssl_default_config.yaml``),
DINO's paper and ``main_dino.py`` for ``dino``, SimCLR's paper for ``simclr`` and, for distillation, LightlyTrain's
documented recipe; ``configs/pretrain_demo.yaml`` (and ``dino_demo.yaml``, ``simclr_demo.yaml``) are the small-data
presets (32 px crops, a 4-layer ViT, small heads) that train on CPU in minutes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

from lvdkit.core.settings import ConfigError, RayConfig

MethodName = Literal["dinov2", "dino", "simclr", "distillation"]
METHODS: tuple[str, ...] = get_args(MethodName)


@dataclasses.dataclass
class CropsConfig:
    """Multi-crop (DINOv2, DINO), SimCLR's two views and distillation's single view. Sizes are pixels (SimCLR and
    distillation crop at ``global_size``); scales are area fractions."""

    global_size: int = 224
    local_size: int = 98  # 98 = 7 patches of 14 px; use 96 for /16 patch models
    n_local: int = 8
    global_scale: list[float] = dataclasses.field(default_factory=lambda: [0.32, 1.0])
    local_scale: list[float] = dataclasses.field(default_factory=lambda: [0.05, 0.32])
    distill_scale: list[float] = dataclasses.field(default_factory=lambda: [0.14, 1.0])
    simclr_scale: list[float] = dataclasses.field(default_factory=lambda: [0.08, 1.0])  # SimCLR's (Inception) crop
    simclr_colour: float = 1.0  # SimCLR's colour distortion strength s (1 on ImageNet, 0.5 on CIFAR-10)
    blur_kernel: int = 9  # DINOv2's Gaussian blur kernel; odd; small images want a smaller one
    flip_p: float = 0.5  # horizontal flip probability of every view; 0 where mirroring changes meaning (digits, text)
    reduced_decode: bool = True  # JPEGs decoded at 1/2-1/8 scale when every crop still gets its full resolution
    # where views are decoded and cut: pillow (Ray Data tasks on CPUs), device (the training worker's device: nvJPEG
    # and crops on a GPU; lvdkit.pretrain.device_views), auto (device on GPU workers)
    decode: Literal["auto", "pillow", "device"] = "auto"


@dataclasses.dataclass
class DINOv2Config:
    """DINO + iBOT + KoLeo (DINOv2 paper section 4; repo ``ssl_default_config.yaml``)."""

    head_out_dim: int = 65536  # prototypes
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    shared_heads: bool = True  # one head for DINO and iBOT (DINOv2 default); untie for large models
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"
    center_momentum: float = 0.9  # softmax centering only
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    mask_probability: float = 0.5  # share of global crops that get an iBOT mask
    mask_ratio: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.5])
    drop_path: float = 0.1  # ViT-S/B in DINOv2's configs; 0.3-0.4 for L/g
    layerscale: float | None = 1e-5  # None keeps the model's own (timm: no LayerScale unless asked)
    freeze_last_layer_epochs: int = 1


@dataclasses.dataclass
class DINOConfig:
    """DINO (Caron et al. 2021): multi-crop self-distillation with an EMA teacher and softmax centering, no iBOT
    or KoLeo. Defaults: the paper's ViT-S/16 recipe (``main_dino.py``, teacher temperature 0.04 -> 0.07)."""

    head_out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    momentum_teacher: float = 0.996
    final_momentum_teacher: float = 1.0
    drop_path: float = 0.1  # timm backbones only
    freeze_last_layer_epochs: int = 1


@dataclasses.dataclass
class SimCLRConfig:
    """SimCLR (Chen et al. 2020): two views, an MLP projection head, NT-Xent over the batch's other views."""

    temperature: float = 0.1  # the paper's ImageNet value (0.5 was its CIFAR-10 one)
    proj_hidden_dim: int = 2048
    proj_out_dim: int = 128

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"simclr.temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass
class DistillConfig:
    """A frozen teacher's embeddings taught to a student through a queue pseudo-classifier (LightlyTrain's recipe)."""

    teacher: str = "timm:vit_base_patch14_dinov2"  # any PyTorch model the embeddings factory loads, or an export
    teacher_pretrained: bool = True  # timm/torchvision hub weights (needs the network unless cached)
    teacher_checkpoint: str | None = None  # a local weights file instead of any download
    teacher_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    temperature: float = 0.07
    queue_size: int | None = None  # None: by dataset size (16 ... 8192)
    dense_weight: float = 0.0  # > 0 adds the patch-to-patch similarity term (both models must give spatial tokens)
    mixup: bool = True  # batch-level mixup, lambda ~ U(0, 1), same mixed view for teacher and student


@dataclasses.dataclass
class OptimConfig:
    """AdamW with cosine schedules (per optimizer step), as DINOv2; ``lr`` is per 1024 images, scaled by
    sqrt(batch/1024) where batch = batch_size x accumulate_steps x workers (the images of one optimizer step)."""

    epochs: int = 100
    batch_size: int = 64  # per worker and forward pass (the micro-batch when accumulating)
    accumulate_steps: int = 1  # micro-batches whose gradients are summed into one optimizer step
    lr: float = 4e-3
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])

    def __post_init__(self) -> None:
        if self.accumulate_steps < 1:
            raise ConfigError(f"optim.accumulate_steps must be >= 1, got {self.accumulate_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"optim.batch_size must be >= 1, got {self.batch_size}")

    @property
    def step_batch(self) -> int:
        """Images per worker and optimizer step: ``batch_size * accumulate_steps``."""
        return self.batch_size * self.accumulate_steps


@dataclasses.dataclass
class EvalConfig:
    """The learning curve: k-NN (and optionally a linear probe) on a labeled set every few steps, by rank 0, logged to
    ``metrics.jsonl`` and TensorBoard with collapse signs (see :mod:`lvdkit.pretrain.monitor`)."""

    data: str | None = None  # class-per-folder directory or Parquet with `label` (as `lvdkit eval knn --train`)
    every: int = 0  # steps between evaluations; 0: at every checkpoint (and always at the end)
    test_fraction: float = 0.5  # stratified split, the one `lvdkit eval knn` makes with the same seed
    seed: int = 0
    k: int = 20
    temperature: float = 0.07
    linear: bool = False  # also the linear probe (L-BFGS, slower)
    max_images: int = 2000  # per split, drawn per class in proportion (pixels are held in memory)

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0 (0: at every checkpoint), got {self.every}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"eval.test_fraction must be in (0, 1), got {self.test_fraction}")


# DINO and DINOv2 evaluate and release the EMA teacher; SimCLR and distillation have a student only.
DEFAULT_WHICH = {"dinov2": "teacher", "dino": "teacher", "simclr": "student", "distillation": "student"}


@dataclasses.dataclass
class PretrainConfig:
    """A pretraining run: data, method, model, optimisation and where it runs."""

    out: str = "out/pretrain"  # the run folder: checkpoints, metrics.jsonl, tensorboard/, config.yaml, exports
    data: str = "out/curate/curated"  # curated set, or any Parquet folder/file with an image-bytes column
    image_column: str = "image"
    method: MethodName = "dinov2"
    model: str = "timm:vit_small_patch14_dinov2"  # the student; dinov2 needs a timm ViT, the others take any
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Start the student (and the EMA teacher) backbone from weights: an lvdkit export (FILE.safetensors + .json),
    # a timm/torchvision state-dict file (.safetensors/.pth/..., weights only), or timm:NAME / torchvision:NAME
    # hub weights (needs the network). None: random init.
    init: str | None = None
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool | None = None  # None: when Ray sees a GPU
    cpus_per_worker: float | None = None  # None: 1 with a GPU, else 0.5 (leaves CPU for Ray Data's decoding)
    torch_threads: int | None = None  # intra-op threads per worker on CPU; None: Ray's (its CPUs, at least 1)
    # ddp: a full replica per worker; fsdp: weights, gradients and AdamW state sharded over the workers (FSDP2
    # fully_shard, sharded checkpoints; for ViT-L/g sized models)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the student
    checkpoint_every: int = 100  # steps (and always at the end)
    keep_checkpoints: int = 3
    resume: bool = False  # continue the run in OUT from its last checkpoint
    max_failures: int = 0  # worker deaths Ray Train recovers from (from the last checkpoint)
    shuffle_buffer: int = 512  # rows, per worker, for Ray Data's local shuffle
    progress: bool = True
    tensorboard: bool = True
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    crops: CropsConfig = dataclasses.field(default_factory=CropsConfig)
    dinov2: DINOv2Config = dataclasses.field(default_factory=DINOv2Config)
    dino: DINOConfig = dataclasses.field(default_factory=DINOConfig)
    simclr: SimCLRConfig = dataclasses.field(default_factory=SimCLRConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
