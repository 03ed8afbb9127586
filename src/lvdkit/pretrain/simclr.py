"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Two views of every image (:class:`~lvdkit.pretrain.augment.TwoViews`: random resized crop, flip, strong colour
jitter, grayscale, blur), one backbone, a projection head ``g`` (Linear -> BatchNorm -> ReLU -> Linear, as the
paper's code; 2048 -> 128 for a ResNet-50), and NT-Xent over the batch (:mod:`lvdkit.pretrain.nt_xent_loss`). Both
views go through the network in one pass, so BatchNorm sees the whole batch (the paper's global BN). No teacher, no
queue, no momentum: the other images of the batch are the negatives, which is why SimCLR wants large batches.

What lvdkit changes: the optimiser is the shared AdamW with cosine schedules (the paper uses LARS, lr 0.3 x B/256,
weight decay 1e-6); the backbone is any timm or torchvision model (the paper's is a ResNet-50). The exported
backbone is the encoder ``f`` before the projection head, as the paper evaluates it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lvdkit.pretrain.augment import GLOBAL_KEYS, normalize
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.method import Method, StudentFn, mean_std
from lvdkit.pretrain.models import build_backbone, feature_dim
from lvdkit.pretrain.nt_xent_loss import nt_xent_loss


class SimCLRStudent(nn.Module):
    """Backbone ``f`` -> pooled features (N, F) -> projection ``g`` (N, out_dim)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Sequential(
            nn.Linear(feat_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, views: Tensor) -> dict[str, Tensor]:
        """(N, 3, S, S) normalised views -> ``projection`` (N, out_dim), not normalised (the loss does that)."""
        return {"projection": self.proj(self.backbone(views))}


class SimCLRMethod(Method):
    """A student only; :meth:`loss` is NT-Xent over a (micro-)batch's two views."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        s, size = cfg.simclr, cfg.crops.global_size
        backbone, preprocess, self.identity = build_backbone(cfg.model, size, dict(cfg.model_kwargs), init=cfg.init)
        self.cfg = cfg
        self.preprocess = preprocess
        self.mean, self.std = mean_std(preprocess)
        self.student: SimCLRStudent = SimCLRStudent(
            backbone, feature_dim(backbone, size), s.proj_hidden_dim, s.proj_out_dim
        )

    def loss(
        self,
        batch: dict[str, Tensor],
        sched: dict[str, float],
        rng: np.random.Generator,
        student_fn: StudentFn | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """NT-Xent of the batch's two views (B images -> 2B projections, 2B - 2 negatives each; under DDP the
        negatives are every worker's). Batch-coupled: with gradient accumulation the negatives are the micro-batch's
        only, so accumulating is *not* the same as a larger batch here (fewer negatives, BatchNorm per micro-batch)."""
        views = torch.cat([batch[k] for k in GLOBAL_KEYS]).to(self.device, non_blocking=True)  # (2B, 3, S, S)
        z = (student_fn or self.student)(normalize(views, self.mean, self.std))["projection"]  # (2B, out_dim)
        z_a, z_b = z.float().chunk(2)
        loss = nt_xent_loss(z_a, z_b, self.cfg.simclr.temperature)
        with torch.no_grad():  # share of images whose closest view-b projection is their own
            sims = nn.functional.normalize(z_a, dim=-1) @ nn.functional.normalize(z_b, dim=-1).T
            top1 = (sims.argmax(dim=1) == torch.arange(len(sims), device=sims.device)).float().mean()
        return loss, {"nt_xent": loss.item(), "pair_top1": top1.item()}

    def export_module(self, which: str) -> tuple[nn.Module, dict[str, Any]]:
        """The encoder ``f`` (the projection head is a training device, not exported)."""
        if which != "student":
            raise ValueError(f"which={which!r}; simclr has no teacher (valid: 'student')")
        return self.student.backbone, self.identity
