"""Random crop-major batches with real iBOT masks, for benchmarks and step-level tests (no decoding involved)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.masking import mask_weights_and_indices, sample_ibot_masks

__all__ = ["random_batch"]


def random_batch(config: TrainConfig, batch_size: int, *, seed: int, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A batch shaped exactly like the collate's output (see docs/contracts.md), filled with random pixels."""
    crops, patch = config.data.crops, config.model.patch_size
    generator = torch.Generator().manual_seed(seed)
    grid = crops.global_size // patch
    masks = torch.from_numpy(
        sample_ibot_masks(
            2 * batch_size,
            (grid, grid),
            probability=config.data.masking.mask_sample_probability,
            ratio_min=config.data.masking.mask_ratio_min,
            ratio_max=config.data.masking.mask_ratio_max,
            min_block_patches=config.data.masking.min_block_patches,
            rng=np.random.default_rng(seed),
        )
    )
    indices, weights = mask_weights_and_indices(masks)
    batch = {
        "sample_ids": [f"random-{seed}-{i}" for i in range(batch_size)],
        "global_crops": torch.randn(2 * batch_size, 3, crops.global_size, crops.global_size, generator=generator),
        "local_crops": torch.randn(
            crops.num_local * batch_size, 3, crops.local_size, crops.local_size, generator=generator
        ),
        "masks": masks,
        "mask_indices": torch.as_tensor(indices),
        "mask_weights": torch.as_tensor(weights, dtype=torch.float32),
        "labels": torch.full((batch_size,), -1, dtype=torch.long),
        "num_bad_samples": 0,
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
