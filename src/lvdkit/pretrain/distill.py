"""Distillation without labels: a frozen teacher's embeddings into a student of any timm/torchvision architecture.

Follows LightlyTrain's documented recipe, itself after Beyer et al. 2022 ("Knowledge distillation: A good teacher is
patient and consistent"):

- consistent: teacher and student see the *same* augmented view (one random resized crop, flip, colour jitter,
  blur), mixed across the batch with mixup (lambda ~ U(0, 1)) as the paper's "function matching" recommends;
- patient: long schedules are expected (the paper trains for thousands of epochs); nothing here assumes short runs.

Where it differs from Beyer et al.: they match the teacher's *class* logits with KL divergence; without labels there
are no classes, so a FIFO queue of past teacher embeddings acts as a pseudo-classifier (KL between softmax(t . Q /
0.07) and softmax(s . Q / 0.07)), and the student's pooled features go through a linear head to the teacher's width.
An optional dense term matches patch-to-patch similarity matrices. The teacher has no EMA or update.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvdkit.embeddings.backbones import create_torch_model
from lvdkit.embeddings.factory import parse_name
from lvdkit.embeddings.preprocess import Preprocess
from lvdkit.pretrain.augment import VIEW_KEY, normalize
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.distill_loss import EmbeddingQueue, dense_similarity_loss, distillation_loss, queue_size_for
from lvdkit.pretrain.method import Method, StudentFn, mean_std
from lvdkit.pretrain.models import build_backbone, feature_dim, pooled_and_tokens
from lvdkit.pretrain.ranks import gather_rows

TEACHER_KINDS = ("timm:NAME", "torchvision:NAME", "PATH.safetensors (an lvdkit export or model file)")


def load_teacher(
    name: str, img_size: int, pretrained: bool, checkpoint: str | None, kwargs: dict[str, Any]
) -> tuple[nn.Module, Preprocess]:
    """A frozen teacher in eval mode, by the embeddings factory's names. ONNX/SSCD are not PyTorch: refused."""
    kind, spec = parse_name(name)
    if kind == "lvdkit":
        from lvdkit.embeddings.model_file import load_lvdkit_model

        module, preprocess, _, _ = load_lvdkit_model(Path(spec).expanduser())
    elif kind in ("timm", "torchvision"):
        module, preprocess = create_torch_model(
            name, img_size=img_size, pretrained=pretrained, checkpoint=checkpoint, **kwargs
        )
    else:
        raise ValueError(f"distillation teacher {name!r} is not a PyTorch model; valid: {', '.join(TEACHER_KINDS)}")
    return module.eval().requires_grad_(False), preprocess


class DistillStudent(nn.Module):
    """Backbone -> pooled features (B, F) -> linear (B, D_teacher)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, out_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Linear(feat_dim, out_dim)

    def forward(self, x: Tensor, dense: bool = False) -> dict[str, Tensor]:
        if not dense:
            return {"embedding": self.proj(self.backbone(x))}  # (B, D_teacher)
        pooled, tokens = pooled_and_tokens(self.backbone, x)
        return {"embedding": self.proj(pooled), "tokens": self.proj(tokens)}  # (B, D_teacher), (B, N, D_teacher)


class DistillMethod(Method):
    """Frozen teacher + trainable student + queue; :meth:`loss` is one step."""

    frozen_prefixes = ("teacher.",)  # the teacher is reloaded from its own source on resume

    def __init__(self, cfg: PretrainConfig, n_images: int) -> None:
        super().__init__()
        dc, size = cfg.distill, cfg.crops.global_size
        teacher, tp = load_teacher(dc.teacher, size, dc.teacher_pretrained, dc.teacher_checkpoint, dc.teacher_kwargs)
        backbone, sp, self.identity = build_backbone(cfg.model, size, dict(cfg.model_kwargs), init=cfg.init)
        t_dim = feature_dim(teacher, size)
        self.cfg, self.teacher_norm, self.student_norm = cfg, mean_std(tp), mean_std(sp)
        self.preprocess = sp
        self._pending: list[Tensor] = []  # this optimizer step's teacher embeddings, enqueued in after_step
        self.teacher = teacher
        self.student: DistillStudent = DistillStudent(backbone, feature_dim(backbone, size), t_dim)
        self.queue = EmbeddingQueue(t_dim, dc.queue_size or queue_size_for(n_images))

    def loss(
        self,
        batch: dict[str, Tensor],
        sched: dict[str, float],
        rng: np.random.Generator,
        student_fn: StudentFn | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        dc = self.cfg.distill
        device = self.device
        view = batch[VIEW_KEY].to(device, non_blocking=True).float()  # (B, 3, S, S) in [0, 255]
        if dc.mixup and view.shape[0] > 1:
            lam = float(rng.uniform())
            perm = torch.from_numpy(rng.permutation(view.shape[0])).to(device)
            view = lam * view + (1 - lam) * view[perm]
        dense = dc.dense_weight > 0
        t_tokens = None
        with torch.no_grad():
            t_in = normalize(view, *self.teacher_norm)
            if dense:
                teacher, t_tokens = (t.float() for t in pooled_and_tokens(self.teacher, t_in))
            else:
                teacher = self.teacher(t_in).float()  # (B, D)
        s = (student_fn or self.student)(normalize(view, *self.student_norm), dense)
        queue = self.queue.queue.clone()  # this step's classifier: the embeddings of *earlier* optimizer steps
        loss = distillation_loss(s["embedding"].float(), teacher, queue, dc.temperature)
        terms = {"distill": loss.item()}
        if t_tokens is not None:
            dense_loss = dense_similarity_loss(s["tokens"].float(), t_tokens, dc.temperature)
            loss = loss + dc.dense_weight * dense_loss
            terms["dense"] = dense_loss.item()
        self._pending.append(F.normalize(teacher, dim=-1))
        return loss, terms

    @torch.no_grad()
    def after_step(self, sched: dict[str, float]) -> None:
        """The step's teacher embeddings (every micro-batch's, in order; under torch.distributed every rank's) join the
        queue once per optimizer step."""
        if self._pending:  # every rank's rows, rank by rank: the queue a single worker with the global batch keeps
            self.queue.enqueue(gather_rows(torch.cat(self._pending)))
            self._pending = []

    def export_module(self, which: str) -> tuple[nn.Module, dict[str, Any]]:
        """The student's backbone (the projection to the teacher's width is a training device, not exported)."""
        if which != "student":
            raise ValueError(f"which={which!r}; distillation exports the student only (valid: 'student')")
        return self.student.backbone, self.identity
