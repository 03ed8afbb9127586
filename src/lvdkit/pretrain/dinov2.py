"""DINOv2 (Oquab et al. 2023): a student ViT and its EMA teacher, DINO + iBOT + KoLeo losses.

The teacher sees the 2 unmasked global crops; the student sees the same crops with iBOT masks plus the local crops.
Losses (section 4 of the paper): DINO cross-entropy between teacher and student CLS prototypes (crops swapped: a
student crop is never matched to the teacher's same crop), iBOT cross-entropy on the masked patches, KoLeo on the
student's global CLS tokens (one term per global crop). Teacher targets are centred by Sinkhorn-Knopp or softmax.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lvdkit.pretrain.augment import multicrop_inputs
from lvdkit.pretrain.centering import SoftmaxCenter, teacher_probs
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.dino_loss import dino_loss
from lvdkit.pretrain.ema import ema_update
from lvdkit.pretrain.heads import DINOHead
from lvdkit.pretrain.ibot_loss import ibot_loss_masked
from lvdkit.pretrain.koleo_loss import koleo_loss
from lvdkit.pretrain.masking import BlockMaskGenerator, make_masks
from lvdkit.pretrain.method import Method, StudentFn, entropy, mean_std
from lvdkit.pretrain.models import build_backbone, is_timm_vit, token_grid, vit_tokens


class Student(nn.Module):
    """Backbone + DINO head (+ iBOT head when untied) + the iBOT mask token. Also the teacher's architecture."""

    def __init__(self, backbone: nn.Module, embed_dim: int, cfg: PretrainConfig) -> None:
        super().__init__()
        d = cfg.dinov2
        self.backbone = backbone

        def head() -> DINOHead:
            return DINOHead(embed_dim, d.head_out_dim, d.head_hidden_dim, d.head_bottleneck_dim, d.head_layers)

        self.dino_head = head()
        self.ibot_head = self.dino_head if d.shared_heads else head()
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))

    def forward(
        self, globals_: Tensor, locals_: Tensor | None, masks: Tensor | None, mask_input: bool = True
    ) -> dict[str, Tensor]:
        """globals_ (2B, 3, G, G), locals_ (nB, 3, L, L), masks (2B, N) -> CLS tokens and head logits.

        ``mask_input=False`` (the teacher) sees the crops whole but still scores the patches at ``masks``.
        """
        hide = masks if mask_input else None
        cls, patches = vit_tokens(self.backbone, globals_, hide, self.mask_token)  # (2B, D), (2B, N, D)
        out = {"cls": cls, "dino_global": self.dino_head(cls)}  # (2B, K)
        if locals_ is not None:
            out["dino_local"] = self.dino_head(vit_tokens(self.backbone, locals_)[0])  # (nB, K)
        if masks is not None:
            out["ibot"] = self.ibot_head(patches[masks])  # (M, K), masked patches only, row-major
        return out


class DINOv2Method(Method):
    """Holds student and teacher; :meth:`loss` computes one step's loss, :meth:`after_step` moves the teacher."""

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        if not cfg.model.startswith("timm:"):
            raise ValueError(f"dinov2 trains timm ViTs (e.g. timm:vit_small_patch14_dinov2), got {cfg.model!r}")
        d, crops = cfg.dinov2, cfg.crops
        kwargs = dict(cfg.model_kwargs)
        if d.layerscale is not None:
            kwargs.setdefault("init_values", d.layerscale)
        backbone, preprocess, self.identity = build_backbone(
            cfg.model, crops.global_size, kwargs, {"drop_path_rate": d.drop_path}, cfg.init
        )
        if not is_timm_vit(backbone):
            raise ValueError(f"dinov2 needs a timm ViT with a class token; {cfg.model} is {type(backbone).__name__}")
        self.cfg = cfg
        self.preprocess = preprocess
        self.mean, self.std = mean_std(preprocess)
        embed_dim: Any = backbone.embed_dim
        self.student: Student = Student(backbone, int(embed_dim), cfg)
        self.teacher: Student = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.center = SoftmaxCenter(d.head_out_dim, d.center_momentum) if d.centering == "softmax" else None
        self.ibot_center = SoftmaxCenter(d.head_out_dim, d.center_momentum) if d.centering == "softmax" else None
        self.grid: tuple[int, int] = token_grid(backbone, crops.global_size)
        self.mask_generator = BlockMaskGenerator(self.grid, max_num_patches=max(1, self.grid[0] * self.grid[1] // 2))

    def loss(
        self,
        batch: dict[str, Tensor],
        sched: dict[str, float],
        rng: np.random.Generator,
        student_fn: StudentFn | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """One (micro-)batch's total loss and its terms. ``student_fn`` is the (possibly DDP-wrapped) student.

        Batch-coupled parts are per micro-batch: Sinkhorn-Knopp balances the micro-batch, KoLeo's neighbours are in
        it, iBOT masks are drawn for it. The softmax centres accumulate and move once per optimizer step."""
        d = self.cfg.dinov2
        device = self.device
        globals_, locals_ = multicrop_inputs(batch, device, self.mean, self.std)
        n_images = globals_.shape[0] // 2
        masks = make_masks(2 * n_images, self.grid, d.mask_probability, (d.mask_ratio[0], d.mask_ratio[1]), rng)
        masks = masks.to(device)  # (2B, N)
        temp = sched["teacher_temp"]
        with torch.no_grad():
            t = self.teacher(globals_, None, masks, mask_input=False)  # unmasked, scored at the masked positions
            t_dino = teacher_probs(t["dino_global"], temp, d.centering, self.center)
            t_ibot = teacher_probs(t["ibot"], temp, d.centering, self.ibot_center)
            for center, logits in ((self.center, t["dino_global"]), (self.ibot_center, t["ibot"])):
                if center is not None:
                    center.accumulate(logits)  # the centres move once per optimizer step, in after_step
        s = (student_fn or self.student)(globals_, locals_, masks)
        k = t_dino.shape[-1]
        student_logits = [s["dino_global"].view(2, n_images, k)]
        if "dino_local" in s:
            student_logits.append(s["dino_local"].view(-1, n_images, k))
        dino = dino_loss(torch.cat(student_logits), t_dino.view(2, n_images, k), d.student_temp)
        ibot = ibot_loss_masked(s["ibot"], t_ibot, masks, d.student_temp, denominator="all")  # as DINOv2
        koleo = sum((koleo_loss(c) for c in s["cls"].float().chunk(2)), torch.zeros((), device=device))
        total = d.dino_weight * dino + d.ibot_weight * ibot + d.koleo_weight * koleo
        terms = {"dino": dino.item(), "ibot": ibot.item(), "koleo": koleo.item(), "masked": masks.float().mean().item()}
        terms["teacher_entropy"] = entropy(t_dino)  # collapse watch: log K is uniform, 0 one prototype for all
        if self.center is not None:
            terms["centre_norm"] = float(self.center.center.norm())
        return total, terms

    @torch.no_grad()
    def after_step(self, sched: dict[str, float]) -> None:
        ema_update(self.teacher, self.student, sched["momentum"])
        for center in (self.center, self.ibot_center):
            if center is not None:
                center.commit()

    def export_module(self, which: str) -> tuple[nn.Module, dict[str, Any]]:
        """The backbone to export and its identity kwargs: the teacher's (DINOv2 evaluates the EMA teacher)."""
        if which not in ("teacher", "student"):
            raise ValueError(f"which={which!r}; valid: 'teacher', 'student'")
        network: Student = self.teacher if which == "teacher" else self.student
        return network.backbone, self.identity
