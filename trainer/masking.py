"""iBOT masks for the global crops: BEiT-style rectangular blocks, stratified mask ratios.

References: Bao et al., "BEiT: BERT Pre-Training of Image Transformers" (2022) for the block-wise masking; Zhou et
al., "iBOT" (2022) and Oquab et al., "DINOv2" (2023) for masking half of the crops with ratios spread over
[0.1, 0.5]. Runs in data-loader workers: numpy only for the sampling (an explicit ``np.random.Generator`` so the
masks are reproducible from the loader's seed), torch only for :func:`mask_weights_and_indices`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["ibot_mask_plan", "mask_weights_and_indices", "sample_block_mask", "sample_ibot_masks", "sample_planned_mask"]

MAX_TRIES_PER_BLOCK = 10
"""Attempts at placing one block before the mask is considered full (BEiT)."""


def _place_block(
    mask: np.ndarray,
    max_new_patches: int,
    rng: np.random.Generator,
    *,
    min_block_patches: int,
    log_aspect_range: tuple[float, float],
) -> int:
    """Try up to :data:`MAX_TRIES_PER_BLOCK` times to mask one block adding 1..max_new_patches patches.

    Returns the number of newly masked patches (0 when every try failed).
    """
    height, width = mask.shape
    low, high = sorted((float(min_block_patches), float(max_new_patches)))
    for _ in range(MAX_TRIES_PER_BLOCK):
        area = rng.uniform(low, high)
        aspect = math.exp(rng.uniform(*log_aspect_range))
        block_h = int(round(math.sqrt(area * aspect)))
        block_w = int(round(math.sqrt(area / aspect)))
        # Rounding can shrink a block below the minimum; such a draw counts as a failed try.
        if block_h * block_w < min_block_patches or block_h >= height or block_w >= width:
            continue
        top = int(rng.integers(0, height - block_h + 1))
        left = int(rng.integers(0, width - block_w + 1))
        window = mask[top : top + block_h, left : left + block_w]
        new_patches = block_h * block_w - int(window.sum())
        # Overlap with earlier blocks is allowed, but the block must add something and stay within the budget.
        if 0 < new_patches <= max_new_patches:
            window[...] = True
            return new_patches
    return 0


def sample_block_mask(
    grid_hw: tuple[int, int],
    num_target_patches: int,
    rng: np.random.Generator,
    *,
    min_block_patches: int = 4,
    min_aspect: float = 0.3,
    max_patches_per_block: int | None = None,
) -> np.ndarray:
    """One BEiT block mask ``bool [h, w]`` with about ``num_target_patches`` masked patches (never more).

    Blocks of at least ``min_block_patches`` patches, area uniform in [min, remaining budget], aspect ratio
    log-uniform in ``[min_aspect, 1 / min_aspect]``, are added until the target is reached or a block fails
    :data:`MAX_TRIES_PER_BLOCK` placements; so the count can end a few patches short of the target.
    ``max_patches_per_block`` caps what one block may add (default: the target).
    """
    height, width = grid_hw
    mask = np.zeros((height, width), dtype=bool)
    log_aspect_range = (math.log(min_aspect), math.log(1.0 / min_aspect))
    per_block_cap = num_target_patches if max_patches_per_block is None else max_patches_per_block
    num_masked = 0
    while num_masked < num_target_patches:
        budget = min(num_target_patches - num_masked, per_block_cap)
        added = _place_block(
            mask, budget, rng, min_block_patches=min_block_patches, log_aspect_range=log_aspect_range
        )
        if added == 0:
            break
        num_masked += added
    return mask


def _check_mask_args(num_images: int, probability: float, ratio_min: float, ratio_max: float) -> None:
    if num_images < 0:
        raise ValueError(f"sample_ibot_masks num_images: invalid value {num_images!r}; allowed: >= 0")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(
            f"data.masking.mask_sample_probability: invalid value {probability!r}; allowed: 0 <= probability <= 1"
        )
    if not 0.0 <= ratio_min <= ratio_max <= 1.0:
        raise ValueError(
            f"data.masking.mask_ratio_min/max: invalid value {[ratio_min, ratio_max]!r}; allowed: 0 <= min <= max <= 1"
        )


def sample_ibot_masks(
    num_images: int,
    grid_hw: tuple[int, int],
    *,
    probability: float = 0.5,
    ratio_min: float = 0.1,
    ratio_max: float = 0.5,
    rng: np.random.Generator,
    max_mask_fraction: float = 0.5,
    min_block_patches: int = 4,
) -> np.ndarray:
    """Masks for ``num_images`` global crops: ``bool [num_images, h * w]``, True = masked patch.

    ``int(num_images * probability)`` crops get a block mask; the i-th of those n crops draws its ratio uniformly in
    the i-th of n equal slices of ``[ratio_min, ratio_max]`` (stratified, so every batch spans the whole range) and
    targets ``int(ratio * h * w)`` patches, at most ``max_mask_fraction * h * w`` (and no block adds more than that).
    The other crops are unmasked. Rows are then shuffled so masked crops land on random images and views.
    ``min_block_patches`` is the smallest block (see :func:`sample_block_mask`).
    """
    _check_mask_args(num_images, probability, ratio_min, ratio_max)
    height, width = grid_hw
    num_patches = height * width
    max_masked = int(max_mask_fraction * num_patches)
    num_masked_images = int(num_images * probability)
    masks = np.zeros((num_images, num_patches), dtype=bool)
    # Stratified ratios: crop i of n draws uniformly in [min + i * step, min + (i + 1) * step), step = (max - min) / n.
    step = (ratio_max - ratio_min) / max(num_masked_images, 1)
    ratios = ratio_min + step * (np.arange(num_masked_images) + rng.random(num_masked_images))
    for row, ratio in enumerate(ratios):
        target = min(int(num_patches * ratio), max_masked)
        masks[row] = sample_block_mask(
            grid_hw, target, rng, min_block_patches=min_block_patches, max_patches_per_block=max_masked
        ).reshape(-1)
    return masks[rng.permutation(num_images)]


def ibot_mask_plan(
    num_crops: int,
    *,
    probability: float = 0.5,
    ratio_min: float = 0.1,
    ratio_max: float = 0.5,
    rng: np.random.Generator,
) -> np.ndarray:
    """Which crops of a whole global batch are masked, and at which ratio: ``float [num_crops]``, NaN = unmasked.

    The batch-level draw of :func:`sample_ibot_masks` (``int(num_crops * probability)`` masked crops, ratios
    stratified over ``[ratio_min, ratio_max]``, shuffled over the crops) without the block masks themselves. The data
    loader draws it for the GLOBAL batch from the batch's seed, on every rank, and each rank then draws only its own
    crops' blocks (:func:`sample_planned_mask`, seeded per crop): the masks a crop gets do not depend on how the global
    batch is split over ranks, so a run resized to another world size sees the same masks.
    """
    _check_mask_args(num_crops, probability, ratio_min, ratio_max)
    num_masked = int(num_crops * probability)
    step = (ratio_max - ratio_min) / max(num_masked, 1)
    ratios = np.full(num_crops, np.nan)
    ratios[:num_masked] = ratio_min + step * (np.arange(num_masked) + rng.random(num_masked))
    return ratios[rng.permutation(num_crops)]


def sample_planned_mask(
    grid_hw: tuple[int, int],
    ratio: float,
    rng: np.random.Generator,
    *,
    max_mask_fraction: float = 0.5,
    min_block_patches: int = 4,
) -> np.ndarray:
    """The flat ``bool [h * w]`` block mask of one crop planned at ``ratio`` (NaN: unmasked), as
    :func:`sample_ibot_masks` draws each masked crop: ``int(ratio * h * w)`` patches, at most
    ``max_mask_fraction * h * w``."""
    height, width = grid_hw
    num_patches = height * width
    if math.isnan(ratio):
        return np.zeros(num_patches, dtype=bool)
    max_masked = int(max_mask_fraction * num_patches)
    target = min(int(num_patches * ratio), max_masked)
    return sample_block_mask(
        grid_hw, target, rng, min_block_patches=min_block_patches, max_patches_per_block=max_masked
    ).reshape(-1)


def mask_weights_and_indices(masks: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the masked patches and their iBOT loss weights.

    Args:
        masks: ``bool [num_crops, N]``.

    Returns:
        ``(indices Long[M], weights Float[M])``: indices into ``masks.flatten()`` in increasing order, and for each
        masked patch ``1 / (masked patches in its crop)``.
    """
    masks = torch.as_tensor(masks, dtype=torch.bool)
    if masks.ndim != 2:
        raise ValueError(f"mask_weights_and_indices: expected masks of shape [num_crops, N], got {tuple(masks.shape)}")
    per_crop = masks.sum(dim=1, keepdim=True).clamp_min(1).to(torch.float32)
    weights = (1.0 / per_crop).expand_as(masks)[masks]
    indices = masks.flatten().nonzero().flatten()
    return indices, weights
