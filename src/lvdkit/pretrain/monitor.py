"""The learning curve of a run: k-NN on a labeled set every few steps, with a sign of collapse beside it.

DINO's weighted k-NN (k=20, T=0.07; :func:`lvdkit.pretrain.evaluate.knn_accuracy`) on the stratified split that
``lvdkit eval knn`` makes with the same seed, embedded with the backbone an export would hold (the EMA teacher for
DINOv2 and DINO, the student otherwise) and its export's preprocessing, so the curve's last point is what
``lvdkit eval knn`` reports for the export. The images are decoded and prepared once; rank 0 embeds them between
steps.

``embedding_std``: the per-dimension standard deviation of the L2-normalised embeddings, averaged and scaled by
sqrt(D) (SimSiam's collapse check, section 4.1): about 1 for embeddings spread over the sphere, 0 when every image
maps to one point.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lvdkit.core.image import DecodeError
from lvdkit.embeddings.preprocess import Preprocess
from lvdkit.pretrain.config import EvalConfig
from lvdkit.pretrain.evaluate import Labeled, knn_accuracy, linear_probe_accuracy, load_image, load_labeled, split


@dataclass
class Prepared:
    """One split's prepared pixels uint8 (N, H, W, 3) and labels."""

    pixels: np.ndarray
    labels: list[str]


def embedding_std(x: torch.Tensor) -> float:
    """x (N, D) -> the mean per-dimension std of the L2-normalised rows, times sqrt(D) (1: spread, 0: collapsed)."""
    if x.shape[0] < 2:
        return float("nan")
    return float(F.normalize(x.float(), dim=1).std(dim=0).mean() * math.sqrt(x.shape[1]))


@torch.no_grad()
def embed(module: nn.Module, pixels: np.ndarray, preprocess: Preprocess, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> pooled features (N, D) from ``module`` in eval mode (float32, on the CPU)."""
    device = next(module.parameters()).device
    mean = torch.tensor(preprocess.mean or (0.0, 0.0, 0.0), device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std or (1.0, 1.0, 1.0), device=device).view(1, 3, 1, 1)
    was_training = module.training
    module.eval()
    try:
        out = []
        for start in range(0, len(pixels), batch_size):
            x = torch.from_numpy(pixels[start : start + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
            out.append(module((x - mean) / std).float().cpu())
    finally:
        module.train(was_training)
    return torch.cat(out)


class KnnProbe:
    """k-NN (and optionally a linear probe) of a backbone on a labeled set, prepared once."""

    def __init__(self, cfg: EvalConfig, preprocess: Preprocess) -> None:
        if cfg.data is None:
            raise ValueError("eval.data is not set")
        self.cfg, self.preprocess = cfg, preprocess
        train, test = split(load_labeled(cfg.data), cfg.test_fraction, cfg.seed)
        self.train, self.test = self._prepare(train), self._prepare(test)
        if not len(self.train.pixels) or not len(self.test.pixels):
            raise ValueError(f"eval.data={cfg.data}: no usable images in the train or test split")

    def _prepare(self, data: Labeled) -> Prepared:
        keep = np.arange(len(data.labels))
        if len(keep) > self.cfg.max_images:  # an even draw keeps the classes in proportion
            keep = np.sort(np.random.default_rng(self.cfg.seed).permutation(len(keep))[: self.cfg.max_images])
        pixels, labels = [], []
        for i in keep:
            try:
                pixels.append(self.preprocess.prepare(load_image(data.images[i])))
            except DecodeError:
                continue  # `lvdkit eval knn` leaves unusable images out too
            labels.append(data.labels[i])
        h, w = self.preprocess.size
        return Prepared(np.stack(pixels) if pixels else np.zeros((0, h, w, 3), np.uint8), labels)

    def __call__(self, module: nn.Module) -> dict[str, float]:
        """The figures for ``module`` now: ``knn_top1``, ``embedding_std`` (test split), ``linear_top1`` when asked,
        and ``eval_s`` (seconds taken)."""
        start = time.perf_counter()
        train = embed(module, self.train.pixels, self.preprocess)
        test = embed(module, self.test.pixels, self.preprocess)
        tr, te = F.normalize(train, dim=1).numpy(), F.normalize(test, dim=1).numpy()
        c = self.cfg
        row = {
            "knn_top1": knn_accuracy(tr, self.train.labels, te, self.test.labels, c.k, c.temperature),
            "embedding_std": embedding_std(test),
        }
        if c.linear:
            row["linear_top1"] = linear_probe_accuracy(tr, self.train.labels, te, self.test.labels)
        row["eval_s"] = time.perf_counter() - start
        return row
