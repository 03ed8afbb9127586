"""Patch masks for iBOT: BEiT-style block masking (Bao et al. 2022, "BEiT", section 2.2) and DINOv2's per-batch
schedule of mask ratios (Oquab et al. 2023; ``collate_data_and_cast`` in facebookresearch/dinov2).

A mask is bool over the patch grid, True where the student's patch token is replaced by the mask token.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

MAX_BLOCK_TRIES = 10  # BEiT's attempts at placing one block before giving up on this round


class BlockMaskGenerator:
    """Masks made of random rectangles (BEiT's blockwise masking), topped up to an exact patch count.

    Each round draws a block area uniformly in ``[min_num_patches, max_patches]`` (``max_patches`` = what is still
    to mask, capped by ``max_num_patches``; when fewer than ``min_num_patches`` remain the draw is between the two,
    as in BEiT) and a log-uniform aspect ratio ``h / w`` in ``[min_aspect, max_aspect]``; ``h`` and ``w`` are the
    rounded ``sqrt(area * aspect)`` and ``sqrt(area / aspect)``, so a realised block's ``h / w`` can leave the range
    by the rounding. A block must be strictly smaller than the grid on both sides, and is kept only if it masks
    between 1 and ``max_patches`` new patches; BEiT tries ``MAX_BLOCK_TRIES`` times per round and stops at the first
    round that adds nothing.

    BEiT never overshoots but can stop short of the target (the last few patches rarely fit a block). As in
    DINOv2's current generator, the shortfall is then masked at uniformly random free positions: the count is exact.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        height, width = grid
        if height < 1 or width < 1:
            raise ValueError(f"grid must be positive (H, W), got {grid}")
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if max_num_patches is not None and max_num_patches < 1:
            raise ValueError(f"max_num_patches must be >= 1 or None, got {max_num_patches}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.height, self.width = height, width
        self.num_patches = height * width
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        self.min_aspect, self.max_aspect = min_aspect, max_aspect
        self._log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator(grid=({self.height}, {self.width}), min_num_patches={self.min_num_patches}, "
            f"max_num_patches={self.max_num_patches}, aspect=({self.min_aspect:.3f}, {self.max_aspect:.3f}))"
        )

    def sample_block(self, max_patches: int, generator: np.random.Generator) -> tuple[int, int]:
        """One block shape (h, w) drawn as described in the class docstring (not yet checked against the grid)."""
        low, high = sorted((self.min_num_patches, max_patches))  # BEiT's random.uniform accepts either order
        area = generator.uniform(low, high)
        aspect = math.exp(generator.uniform(*self._log_aspect))
        return round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))

    def _add_block(self, mask: np.ndarray, max_patches: int, generator: np.random.Generator) -> int:
        for _ in range(MAX_BLOCK_TRIES):
            h, w = self.sample_block(max_patches, generator)
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = int(generator.integers(0, self.height - h + 1))
            left = int(generator.integers(0, self.width - w + 1))
            window = mask[top : top + h, left : left + w]
            added = h * w - int(window.sum())
            if 0 < added <= max_patches:
                window[...] = True
                return added
        return 0

    def __call__(self, n_masked: int, generator: np.random.Generator, *, top_up: bool = True) -> np.ndarray:
        """Bool (H, W) mask with exactly ``n_masked`` True (at most that many with ``top_up=False``, BEiT's mask)."""
        if not 0 <= n_masked <= self.num_patches:
            raise ValueError(f"n_masked must be in [0, {self.num_patches}], got {n_masked}")
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        cap = n_masked if self.max_num_patches is None else self.max_num_patches
        while count < n_masked:
            added = self._add_block(mask, min(n_masked - count, cap), generator)
            if added == 0:
                break
            count += added
        if top_up and count < n_masked:
            free = np.flatnonzero(~mask)
            mask.flat[generator.choice(free, size=n_masked - count, replace=False)] = True
        return mask


def make_masks(
    batch_size: int,
    grid: tuple[int, int],
    mask_probability: float = 0.5,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    generator: np.random.Generator | None = None,
    *,
    mask_generator: BlockMaskGenerator | None = None,
    shuffle: bool = True,
) -> Tensor:
    """DINOv2's masks for one batch of global crops: bool (B, H * W), row-major over the patch grid.

    ``batch_size`` counts the masked-capable crops, i.e. images x global crops (DINOv2 stacks crop 0 of every image,
    then crop 1). ``round(B * mask_probability)`` of them (Python's round, half to even; DINOv2 truncates) are masked,
    the rest get empty masks. The masked ones spread their ratios over ``ratio_range``: with M masked crops the range
    is cut into M equal sub-intervals and crop i masks ``int(H * W * r)`` patches, r uniform in sub-interval i. With
    ``shuffle`` (default, as DINOv2) the rows are then permuted, so which crops are masked is random; without it the
    masked rows come first, in increasing ratio order.

    ``mask_generator`` defaults to DINOv2's: BEiT blocks of at least 4 patches, aspect 0.3 to 3.33, at most half the
    grid per block. ``generator`` defaults to a fresh unseeded one; pass one for reproducible masks.
    """
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    low, high = ratio_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= low <= high <= 1, got {ratio_range}")
    rng = np.random.default_rng() if generator is None else generator
    height, width = grid
    num_patches = height * width
    if mask_generator is None:
        mask_generator = BlockMaskGenerator(grid, max_num_patches=max(1, num_patches // 2))
    elif (mask_generator.height, mask_generator.width) != (height, width):
        raise ValueError(f"mask_generator grid {(mask_generator.height, mask_generator.width)} != grid {grid}")
    n_masked_crops = round(batch_size * mask_probability)
    edges = np.linspace(low, high, n_masked_crops + 1)
    masks = np.zeros((batch_size, num_patches), dtype=bool)
    for i in range(n_masked_crops):
        n_masked = int(num_patches * rng.uniform(edges[i], edges[i + 1]))
        masks[i] = mask_generator(n_masked, rng).reshape(-1)
    if shuffle:
        masks = masks[rng.permutation(batch_size)]
    return torch.from_numpy(masks)
