"""Block masks: exact counts, BEiT block shapes, DINOv2's ratio spread over the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvdkit.pretrain.masking import BlockMaskGenerator, make_masks

GRID = (14, 14)  # 224 px with 16 px patches
N = GRID[0] * GRID[1]


def test_counts_are_exact_for_every_target() -> None:
    generator = BlockMaskGenerator(GRID, max_num_patches=N // 2)
    rng = np.random.default_rng(0)
    for n_masked in [0, 1, 3, 4, 5, 17, 50, 98, 150, N]:
        for _ in range(5):
            mask = generator(n_masked, rng)
            assert mask.shape == GRID and mask.dtype == bool
            assert int(mask.sum()) == n_masked
    # BEiT alone never overshoots, and on a small grid often stops short: the top-up is what makes counts exact.
    small = BlockMaskGenerator((4, 4))
    beit = [int(small(11, rng, top_up=False).sum()) for _ in range(50)]
    assert max(beit) <= 11 and min(beit) < 11
    with pytest.raises(ValueError, match="n_masked"):
        generator(N + 1, rng)


def test_block_shapes_follow_area_and_aspect_up_to_rounding() -> None:
    generator = BlockMaskGenerator(GRID, min_num_patches=4, max_num_patches=60, min_aspect=0.3)
    assert generator.max_aspect == pytest.approx(1 / 0.3)
    rng = np.random.default_rng(1)
    aspects = []
    for _ in range(2000):
        h, w = generator.sample_block(60, rng)
        assert h >= 1 and w >= 1
        # h and w are rounded from reals h', w' with h' w' in [4, 60] and h' / w' in [0.3, 3.33].
        assert (h - 0.5) * (w - 0.5) <= 60 and (h + 0.5) * (w + 0.5) >= 4
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5 if w > 0.5 else 1e-9) >= 0.3
        aspects.append(h / w)
    # Log-uniform aspect: as many tall blocks as wide ones, and both extremes reached.
    tall = sum(a > 1 for a in aspects)
    wide = sum(a < 1 for a in aspects)
    assert abs(tall - wide) < 0.15 * len(aspects)
    assert max(aspects) >= 2.5 and min(aspects) <= 0.4


def test_one_block_is_a_rectangle() -> None:
    generator = BlockMaskGenerator(GRID, min_num_patches=4, max_num_patches=40)
    rng = np.random.default_rng(2)
    for _ in range(50):
        mask = np.zeros(GRID, dtype=bool)
        added = generator._add_block(mask, 40, rng)  # one BEiT round on an empty grid
        assert added == mask.sum()
        if added == 0:
            continue
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # its bounding box is full
        assert 1 <= added <= 40 and len(rows) < GRID[0] and len(cols) < GRID[1]


def test_masks_are_blocky_not_scattered() -> None:
    # Among the in-grid 4-neighbours of masked patches, far more are masked than the 50 / 196 of a random mask.
    generator = BlockMaskGenerator(GRID, max_num_patches=N // 2)
    rng = np.random.default_rng(3)
    fractions = []
    for _ in range(30):
        mask = generator(50, rng)
        masked_pairs = 2 * ((mask[1:] & mask[:-1]).sum() + (mask[:, 1:] & mask[:, :-1]).sum())
        degree = np.full(GRID, 4) - np.pad(np.zeros((12, 12), dtype=int), 1, constant_values=1)
        degree[[0, 0, -1, -1], [0, -1, 0, -1]] = 2
        fractions.append(masked_pairs / degree[mask].sum())
    assert np.mean(fractions) > 0.5


def test_make_masks_spreads_ratios_over_the_range() -> None:
    rng = np.random.default_rng(4)
    masks = make_masks(8, GRID, mask_probability=0.5, ratio_range=(0.1, 0.5), generator=rng, shuffle=False)
    assert masks.dtype == torch.bool and masks.shape == (8, N)
    counts = masks.sum(dim=1).tolist()
    assert counts[4:] == [0, 0, 0, 0]
    edges = np.linspace(0.1, 0.5, 5)
    for i, count in enumerate(counts[:4]):  # crop i draws its ratio from sub-interval i
        assert int(N * edges[i]) <= count <= int(N * edges[i + 1])
    assert counts[:4] == sorted(counts[:4])


def test_make_masks_over_many_batches() -> None:
    rng = np.random.default_rng(5)
    masked_rows = np.zeros(6)
    for _ in range(40):
        masks = make_masks(6, GRID, generator=rng)  # shuffled (the default)
        counts = masks.sum(dim=1)
        assert int((counts > 0).sum()) == 3
        ratios = counts[counts > 0].double() / N
        assert ratios.min() >= int(N * 0.1) / N and ratios.max() <= 0.5
        masked_rows += (counts > 0).numpy()
    assert masked_rows.min() > 0  # every row position gets masked sometimes
    # Reproducible with a seeded generator; Python's round for the masked count.
    first = make_masks(6, GRID, generator=np.random.default_rng(7))
    assert torch.equal(first, make_masks(6, GRID, generator=np.random.default_rng(7)))
    assert int((make_masks(5, GRID, generator=rng).sum(dim=1) > 0).sum()) == 2  # round(2.5) == 2
    assert int((make_masks(3, GRID, mask_probability=1.0, generator=rng).sum(dim=1) > 0).sum()) == 3
    assert not make_masks(4, GRID, mask_probability=0.0, generator=rng).any()


def test_make_masks_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ratio_range"):
        make_masks(4, GRID, ratio_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="mask_probability"):
        make_masks(4, GRID, mask_probability=1.5)
    with pytest.raises(ValueError, match="grid"):
        make_masks(4, GRID, mask_generator=BlockMaskGenerator((7, 7)))
    with pytest.raises(ValueError, match="aspect"):
        BlockMaskGenerator(GRID, min_aspect=2.0, max_aspect=1.0)
