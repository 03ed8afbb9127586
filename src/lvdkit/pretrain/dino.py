"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"): self-distillation with no
labels. A student and its EMA teacher, multi-crop, softmax centering; no iBOT, no KoLeo, no masking.

The teacher sees the 2 global crops; the student sees them and the local crops. The loss is the DINO cross-entropy
between the teacher's centred, sharpened prototype distribution of one global crop and the student's of every other
crop (:func:`~lvdkit.pretrain.dino_loss.dino_loss`: the same pairs and mean as DINO's ``DINOLoss``). The centre is an
EMA (momentum 0.9) of the teacher's logits over both global crops, as in the paper.

What DINOv2 adds and this leaves out: the iBOT masked-patch loss and its head, KoLeo, Sinkhorn-Knopp centering,
LayerScale; DINO's defaults also differ (teacher momentum 0.996, global crop scale 0.4-1, no layer-wise lr decay:
set ``optim.layer_decay=1`` and ``optim.patch_embed_lr_mult=1``, as ``configs/dino_demo.yaml`` does). The student
takes the backbone's pooled output (a ViT's CLS token, a CNN's pooled features), so any timm or torchvision
backbone trains, as the paper's ResNet-50 runs did.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lvdkit.pretrain.augment import multicrop_inputs
from lvdkit.pretrain.centering import SoftmaxCenter
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.dino_loss import dino_loss
from lvdkit.pretrain.ema import ema_update
from lvdkit.pretrain.heads import DINOHead
from lvdkit.pretrain.method import Method, StudentFn, entropy, mean_std
from lvdkit.pretrain.models import build_backbone, feature_dim


class DINOStudent(nn.Module):
    """Backbone -> pooled features (N, F) -> DINO head (N, K). Also the teacher's architecture."""

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: PretrainConfig) -> None:
        super().__init__()
        d = cfg.dino
        self.backbone = backbone
        self.head = DINOHead(feat_dim, d.head_out_dim, d.head_hidden_dim, d.head_bottleneck_dim, d.head_layers)

    def forward(self, globals_: Tensor, locals_: Tensor | None = None) -> dict[str, Tensor]:
        """globals_ (2B, 3, G, G), locals_ (nB, 3, L, L) -> ``global`` (2B, K) and ``local`` (nB, K) logits.

        One backbone pass per resolution (DINO's ``MultiCropWrapper`` groups crops of one size the same way)."""
        out = {"global": self.head(self.backbone(globals_))}
        if locals_ is not None:
            out["local"] = self.head(self.backbone(locals_))
        return out


class DINOMethod(Method):
    """Student and EMA teacher; :meth:`loss` is one (micro-)batch, :meth:`after_step` moves teacher and centre."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        d, size = cfg.dino, cfg.crops.global_size
        train_kwargs = {"drop_path_rate": d.drop_path} if cfg.model.startswith("timm:") else {}
        backbone, preprocess, self.identity = build_backbone(
            cfg.model, size, dict(cfg.model_kwargs), train_kwargs, cfg.init
        )
        self.cfg = cfg
        self.preprocess = preprocess
        self.mean, self.std = mean_std(preprocess)
        self.student: DINOStudent = DINOStudent(backbone, feature_dim(backbone, size), cfg)
        self.teacher: DINOStudent = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.center = SoftmaxCenter(d.head_out_dim, d.center_momentum)

    def loss(
        self,
        batch: dict[str, Tensor],
        sched: dict[str, float],
        rng: np.random.Generator,
        student_fn: StudentFn | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """The DINO loss of a multi-crop batch. Teacher targets use the centre as it was at the start of the
        optimizer step; the teacher logits are accumulated into it and it moves in :meth:`after_step`."""
        d = self.cfg.dino
        globals_, locals_ = multicrop_inputs(batch, self.device, self.mean, self.std)
        n_images = globals_.shape[0] // 2
        with torch.no_grad():
            t_logits = self.teacher(globals_)["global"]  # (2B, K)
            t_probs = self.center.probs(t_logits, sched["teacher_temp"])
            self.center.accumulate(t_logits)
        s = (student_fn or self.student)(globals_, locals_)
        k = t_probs.shape[-1]
        student_logits = [s["global"].view(2, n_images, k)]
        if "local" in s:
            student_logits.append(s["local"].view(-1, n_images, k))
        loss = dino_loss(torch.cat(student_logits), t_probs.view(2, n_images, k), d.student_temp)
        terms = {"dino": loss.item(), "teacher_entropy": entropy(t_probs)}  # collapse watch: log K is uniform
        return loss, {**terms, "centre_norm": float(self.center.center.norm())}

    @torch.no_grad()
    def after_step(self, sched: dict[str, float]) -> None:
        ema_update(self.teacher, self.student, sched["momentum"])
        self.center.commit()

    def export_module(self, which: str) -> tuple[nn.Module, dict[str, Any]]:
        """The backbone to export: the EMA teacher's by default (DINO evaluates the teacher), or the student's."""
        if which not in ("teacher", "student"):
            raise ValueError(f"which={which!r}; valid: 'teacher', 'student'")
        network: DINOStudent = self.teacher if which == "teacher" else self.student
        return network.backbone, self.identity
