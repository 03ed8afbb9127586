"""The learning curve's probe: k-NN on a labeled set with the export's preprocessing, and the collapse sign."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lvdkit.embeddings.backbones import create_torch_model
from lvdkit.pretrain.config import EvalConfig
from lvdkit.pretrain.monitor import KnnProbe, embedding_std

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 230)}


def labeled_colours(folder: Path, per_class: int = 8) -> Path:
    """One flat colour per class at several sizes, plus an unusable file: resized to the model's input, every image of
    a class is the same picture, so any model's k-NN must be exactly 1.0."""
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + 7 * i, 30 + 3 * i), rgb).save(folder / name / f"{i}.png")
    (folder / "red" / "broken.png").write_bytes(b"not an image")
    return folder


class Constant(nn.Module):
    """Maps every image to the same vector: a collapsed backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], -1)


def test_the_probe_scores_a_separable_set_perfectly_and_leaves_train_mode_as_it_was(tmp_path: Path) -> None:
    model, preprocess = create_torch_model("timm:resnet10t", img_size=32, pretrained=False)
    probe = KnnProbe(EvalConfig(data=str(labeled_colours(tmp_path)), k=5), preprocess)
    assert len(probe.train.labels) + len(probe.test.labels) == 3 * 8  # the broken file left out, as eval knn does
    assert sorted(set(probe.test.labels)) == sorted(COLOURS)  # stratified: every class in the test split
    model.train()
    row = probe(model)
    assert row["knn_top1"] == 1.0
    assert model.training  # the training loop's module is back in train mode
    with pytest.raises(ValueError, match=r"eval\.data"):
        KnnProbe(EvalConfig(), preprocess)


def test_embedding_std_is_zero_for_a_collapsed_backbone_and_near_one_for_spread_features(tmp_path: Path) -> None:
    _, preprocess = create_torch_model("timm:resnet10t", img_size=32, pretrained=False)
    probe = KnnProbe(EvalConfig(data=str(labeled_colours(tmp_path)), k=5, linear=True), preprocess)
    collapsed = probe(Constant())
    assert collapsed["embedding_std"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= collapsed["linear_top1"] <= 1.0 and collapsed["eval_s"] >= 0.0
    spread = embedding_std(torch.from_numpy(np.random.default_rng(0).standard_normal((4000, 64))))
    assert spread == pytest.approx(1.0, abs=0.05)  # isotropic unit vectors: std 1/sqrt(D) per dimension
