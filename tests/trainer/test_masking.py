"""iBOT mask sampling: how many crops, how much of each, block shapes, stratification, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.masking import mask_weights_and_indices, sample_block_mask, sample_ibot_masks

GRID = (14, 14)
NUM_PATCHES = 14 * 14


def _components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of a 2-D boolean mask (flood fill)."""
    seen = np.zeros_like(mask)
    sizes = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            row, col = stack.pop()
            size += 1
            for r, c in ((row + 1, col), (row - 1, col), (row, col + 1), (row, col - 1)):
                if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c] and not seen[r, c]:
                    seen[r, c] = True
                    stack.append((r, c))
        sizes.append(size)
    return sizes


def test_exactly_the_requested_share_of_crops_is_masked():
    rng = np.random.default_rng(0)
    for num_images, probability, expected in ((64, 0.5, 32), (5, 0.5, 2), (8, 0.0, 0), (8, 1.0, 8)):
        masks = sample_ibot_masks(num_images, GRID, probability=probability, rng=rng)
        assert masks.shape == (num_images, NUM_PATCHES) and masks.dtype == np.bool_
        assert int(masks.any(axis=1).sum()) == expected


def test_masked_counts_are_within_the_ratio_bounds():
    masks = sample_ibot_masks(256, GRID, ratio_min=0.1, ratio_max=0.5, rng=np.random.default_rng(1))
    counts = masks.sum(axis=1)
    masked = counts[counts > 0]
    assert masked.size == 128
    assert masked.max() <= int(0.5 * NUM_PATCHES)
    # Blocks stop when the next one would overshoot, so a crop may end a few patches short of int(N * ratio).
    assert masked.min() >= int(0.1 * NUM_PATCHES) - 8


def test_mask_ratios_are_stratified_over_the_range():
    num_masked = 32
    masks = sample_ibot_masks(2 * num_masked, GRID, rng=np.random.default_rng(2))
    counts = np.sort(masks.sum(axis=1)[masks.any(axis=1)])
    # The i-th smallest count lies in (about) the i-th of 32 equal slices of [0.1, 0.5]: an unstratified draw
    # would put several crops in one slice and leave others empty.
    edges = np.linspace(0.1, 0.5, num_masked + 1) * NUM_PATCHES
    for i, count in enumerate(counts):
        assert int(edges[i]) - 8 <= count <= int(edges[i + 1]), (i, count, edges[i], edges[i + 1])


def test_blocks_have_at_least_four_patches():
    rng = np.random.default_rng(3)
    for target in (4, 5, 20, 60, 98):
        for _ in range(20):
            mask = sample_block_mask(GRID, target, rng, max_patches_per_block=98)
            assert mask.sum() <= target
            assert min(_components(mask), default=4) >= 4


def test_rows_are_shuffled_and_reproducible_from_the_generator():
    first = sample_ibot_masks(16, GRID, rng=np.random.default_rng(4))
    again = sample_ibot_masks(16, GRID, rng=np.random.default_rng(4))
    np.testing.assert_array_equal(first, again)
    masked_rows = {
        tuple(np.nonzero(sample_ibot_masks(16, GRID, rng=np.random.default_rng(seed)).any(axis=1))[0])
        for seed in range(5)
    }
    assert len(masked_rows) > 1 and tuple(range(8)) not in masked_rows


def test_invalid_ratios_name_the_config_fields():
    with pytest.raises(ValueError, match="data.masking.mask_ratio_min/max"):
        sample_ibot_masks(4, GRID, ratio_min=0.4, ratio_max=0.2, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="data.masking.mask_sample_probability"):
        sample_ibot_masks(4, GRID, probability=1.5, rng=np.random.default_rng(0))


def test_mask_weights_and_indices():
    masks = np.array(
        [
            [True, False, True, False],
            [False, False, False, False],
            [False, True, True, True],
        ]
    )
    indices, weights = mask_weights_and_indices(masks)
    assert indices.dtype == torch.long and weights.dtype == torch.float32
    assert indices.tolist() == [0, 2, 9, 10, 11]
    torch.testing.assert_close(weights, torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3]))
    # Same answer from a torch tensor, and the weights of each masked crop sum to one.
    torch_indices, torch_weights = mask_weights_and_indices(torch.from_numpy(masks))
    assert torch.equal(torch_indices, indices) and torch.equal(torch_weights, weights)
    assert weights.sum().item() == pytest.approx(2.0)


def test_single_patch_blocks_mask_tiny_grids_within_the_ratio_bounds():
    # a 2x2 grid (28 px crops in 14 px patches): the reference's 4-patch blocks never fit under the 50% cap
    default = sample_ibot_masks(64, (2, 2), rng=np.random.default_rng(0))
    assert not default.any()
    masks = sample_ibot_masks(64, (2, 2), rng=np.random.default_rng(0), min_block_patches=1)
    per_crop = masks.sum(axis=1)
    assert (per_crop > 0).sum() >= 16  # the masked half of the crops, less those whose ratio rounds to 0 patches
    assert per_crop.max() <= 2  # never above half of the 4 patches


def test_a_grid_where_no_mask_block_fits_is_a_config_error():
    from trainer.config import ConfigError, resolve_config

    small_grid = {"model.patch_size": 14, "model.img_size": 28, "data.crops.global_size": 28,
                  "data.crops.local_size": 14}
    with pytest.raises(ConfigError) as err:
        resolve_config("tiny", overrides=small_grid)
    assert err.value.path == "data.masking.min_block_patches" and "2x2" in str(err.value)
    resolve_config("tiny", overrides={**small_grid, "data.masking.min_block_patches": 1})
    resolve_config("tiny", overrides={**small_grid, "loss.ibot_loss_weight": 0.0})  # no iBOT: nothing to mask
    with pytest.raises(ConfigError, match="min_block_patches"):
        resolve_config("tiny", overrides={"data.masking.min_block_patches": 0})
