"""Batched colour ops of the training views: per-crop draws, and each op doing what torchvision's does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from lvdkit.pretrain.colour import ColourOps, blur, gray, jitter, shift_hue


def _crops(n: int = 6, side: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)


def test_no_op_recipe_returns_the_crops_unchanged() -> None:
    crops = _crops()
    assert torch.equal(ColourOps((0.0, 0.0, 0.0, 0.0), p_jitter=1.0, p_gray=0.0)(crops), crops)


def test_grayscale_matches_pillow_luma() -> None:
    crops = _crops(2)
    out = ColourOps((0.0, 0.0, 0.0, 0.0), p_gray=1.0)(crops)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    pil = np.asarray(Image.fromarray(crops[0].permute(1, 2, 0).numpy()).convert("L"), dtype=np.int16)
    assert np.abs(out[0, 0].numpy().astype(np.int16) - pil).max() <= 1


def test_each_crop_gets_its_own_draw() -> None:
    same = _crops(1).expand(8, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    out = ColourOps((0.4, 0.4, 0.2, 0.1), p_jitter=1.0, p_gray=0.0, p_blur=1.0, blur_kernel=3)(same)
    assert len({out[i].numpy().tobytes() for i in range(8)}) == 8
    torch.manual_seed(0)
    half = ColourOps((0.0, 0.0, 0.0, 0.0), p_gray=0.5)(same)
    grayed = [bool(torch.equal(half[i, 0], half[i, 1])) for i in range(8)]
    assert 0 < sum(grayed) < 8  # some crops drew grayscale, some did not


def test_hue_shift_rotates_primaries_and_matches_torchvision() -> None:
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    assert torch.allclose(
        shift_hue(red, torch.full((1, 1, 1), 1 / 3)), torch.stack([red[:, 1], red[:, 0], red[:, 2]], 1)
    )
    x = _crops(3).float() / 255
    assert torch.allclose(shift_hue(x, torch.zeros(3, 1, 1)), x, atol=1e-5)
    ours = shift_hue(x, torch.full((3, 1, 1), 0.1))
    assert torch.allclose(ours, TF.adjust_hue(x, 0.1), atol=2e-3)


@pytest.mark.parametrize("op", [0, 1, 2])
def test_single_jitter_ops_match_torchvision(op: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _crops(2).float() / 255
    strength = [0.0, 0.0, 0.0, 0.0]
    strength[op] = 0.5
    factors = torch.tensor([0.6, 1.4]).view(2, 1, 1, 1)
    monkeypatch.setattr("lvdkit.pretrain.colour._factors", lambda x, s: factors)
    ours = jitter(x, (strength[0], strength[1], strength[2], strength[3]))
    reference = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[op]
    expected = torch.stack([reference(x[i], float(factors[i])) for i in range(2)])
    assert torch.allclose(ours, expected, atol=1e-3)  # contrast and saturation: torchvision weighs red 0.2989
    assert torch.allclose(gray(x), TF.rgb_to_grayscale(x), atol=1e-3)  # torchvision: 0.2989 for red


def test_blur_keeps_flat_crops_and_means_and_works_on_crops_smaller_than_the_kernel() -> None:
    flat = torch.full((2, 3, 8, 8), 0.5)
    assert torch.allclose(blur(flat, 9), flat)  # pad 4 < 8: reflect
    assert torch.allclose(blur(torch.full((1, 3, 4, 4), 0.25), 9), torch.full((1, 3, 4, 4), 0.25))  # replicate
    x = _crops(2).float() / 255
    out = blur(x, 5)
    assert out.std() < x.std() and torch.allclose(out.mean(), x.mean(), atol=0.02)
