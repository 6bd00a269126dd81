"""Crop-major collate: decode and augment a batch, replace undecodable samples, draw the iBOT masks.

Output (docs/contracts.md; crop-major = all images' crop 0, then all images' crop 1, ...)::

    sample_ids       list[str]          FIRST key: StreamingDataLoader-style counters take len(first value)
    global_crops     float [2B, 3, G, G]  normalised (uint8 when the colour ops are deferred, see "colour")
    local_crops      float [L*B, 3, l, l]
    masks            bool [2B, N]       iBOT masks of the global crops, N = (G / patch)^2
    mask_indices     long [M]           indices into masks.flatten()
    mask_weights     float [M]          1 / (masked patches of the crop)
    labels           long [B]           -1 when unknown
    num_bad_samples  int                samples of this batch that could not be decoded (replaced)
    bad_sample_ids   list[str]          their ids
    colour           dict               only with deferred colour (gpu_augment): crop-major ColourParams fields
                                        of the "global" and "local" crops; finish_deferred_colour consumes it

Every random draw is seeded from ``(seed, epoch, global position)`` of the sample (the iBOT mask plan: from those of
the global batch's first sample; each crop's blocks: from its own), so a resumed or resized run produces the very
same crops and masks at any world size.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from trainer.config import ConfigError, CropConfig, MaskConfig, TrainConfig
from trainer.data.augment import BadImageError, MultiCropAugmentation, MultiCropSample
from trainer.data.colour import ColourParams, apply_colour_ops, normalize_, uint8_to_float
from trainer.data.synthetic import synthetic_image, synthetic_image_size
from trainer.masking import ibot_mask_plan, mask_weights_and_indices, sample_planned_mask

__all__ = ["MultiCropCollate", "finish_deferred_colour", "single_threaded"]

logger = logging.getLogger(__name__)

_REPLACEMENT_STREAM = 1  # seed-stream tag: a replaced sample's crops differ from its donor's own crops
_MASK_STREAM = 2


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One intra-op thread while augmenting in the main process (``num_workers=0``, CPU deferred colour).

    The ops run on one image's small crops: OpenMP fan-out costs more than it saves there, and on a busy machine a
    contended parallel region turned a 2-microsecond pad into milliseconds. DataLoader workers already use one.
    """
    previous = torch.get_num_threads()
    if get_worker_info() is not None or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _crop_major_params(per_image: list[ColourParams]) -> dict[str, torch.Tensor]:
    """Per-image params [n_crops, ...] of B images -> crop-major [n_crops * B, ...] tensors, as a dict."""
    return {
        f.name: torch.stack([getattr(p, f.name) for p in per_image], dim=1).flatten(0, 1)
        for f in fields(ColourParams)
    }


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch tensor; in a DataLoader worker it is allocated in shared memory, as ``default_collate`` does,
    so handing it to the main process costs no extra copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def _crop_major(per_image: list[torch.Tensor]) -> torch.Tensor:
    """B tensors [n_crops, ...] -> [n_crops * B, ...] with crop k of image b at k * B + b."""
    first = per_image[0]
    out = _batch_tensor((first.shape[0], len(per_image), *first.shape[1:]), first.dtype)
    torch.stack(per_image, dim=1, out=out)
    return out.flatten(0, 1)


class MultiCropCollate:
    """``collate_fn`` of the training DataLoader (runs in its workers).

    Args:
        crops / masking: ``data.crops`` and ``data.masking``.
        patch_size: the model's patch size (mask grid = global_size / patch_size).
        seed: base seed of every augmentation and mask draw.
        global_batch_size: images per step over all ranks (the iBOT mask plan is drawn over the global batch); None:
            each batch is its own global batch.
        augmentation: a prebuilt :class:`MultiCropAugmentation` (default: built from ``crops``).
    """

    def __init__(
        self,
        crops: CropConfig,
        masking: MaskConfig,
        *,
        patch_size: int,
        seed: int,
        global_batch_size: int | None = None,
        augmentation: MultiCropAugmentation | None = None,
    ) -> None:
        if crops.global_size % patch_size:
            allowed = f"a multiple of the patch size ({patch_size})"
            raise ConfigError("data.crops.global_size", crops.global_size, allowed)
        self.crops, self.masking, self.seed = crops, masking, seed
        self.global_batch_size = global_batch_size
        self.grid = crops.global_size // patch_size
        self.augmentation = augmentation or MultiCropAugmentation(crops)

    @classmethod
    def from_config(cls, config: TrainConfig, *, seed: int) -> MultiCropCollate:
        return cls(
            config.data.crops, config.data.masking, patch_size=config.model.patch_size, seed=seed,
            global_batch_size=config.optim.global_batch_size,
        )

    def _seed(self, sample: dict[str, Any], *extra: int) -> list[int]:
        return [self.seed, int(sample.get("_epoch", 0)), int(sample.get("_position", 0)), *extra]

    def _replacement(self, samples: list[dict[str, Any]], good: list[bool], index: int) -> MultiCropSample:
        """Crops for bad sample ``index``: a fresh augmentation of the next good sample of the batch, or of a
        synthetic image derived from the sample's position when the whole batch is bad."""
        seed = self._seed(samples[index], _REPLACEMENT_STREAM)
        for step in range(1, len(samples)):
            donor = (index + step) % len(samples)
            if good[donor]:
                return self.augmentation(samples[donor]["image"], seed=seed)
        size = synthetic_image_size(self.crops.global_size)
        return self.augmentation(synthetic_image(int(seed[2]), size, seed=self.seed), seed=seed)

    def _augment(self, samples: list[dict[str, Any]]) -> tuple[list[MultiCropSample], list[str]]:
        results: list[MultiCropSample | None] = []
        bad_ids: list[str] = []
        for sample in samples:
            try:
                results.append(self.augmentation(sample["image"], seed=self._seed(sample)))
            except BadImageError as exc:
                bad_ids.append(str(sample.get("id")))
                results.append(None)
                logger.warning(
                    "bad sample %s (epoch %s, position %s): %s; replaced",
                    sample.get("id"),
                    sample.get("_epoch"),
                    sample.get("_position"),
                    exc,
                )
        good = [r is not None for r in results]
        crops = [r if r is not None else self._replacement(samples, good, i) for i, r in enumerate(results)]
        return crops, bad_ids

    def _masks(self, samples: list[dict[str, Any]]) -> torch.Tensor:
        """iBOT masks of the batch's global crops (crop-major ``bool [2n, h * w]``), independent of the world size.

        Which crops of the GLOBAL batch are masked, and at which ratio, is drawn from the global batch's seed (its
        epoch and first position) by every rank alike (:func:`~trainer.masking.ibot_mask_plan`); each crop's blocks
        come from the crop's own seed (its position and view). A sample's ``_batch_offset`` is its index in the
        global batch; samples without one (direct calls) make the batch its own global batch.
        """
        num = len(samples)
        if all("_batch_offset" in sample for sample in samples):
            offsets = [int(sample["_batch_offset"]) for sample in samples]
            global_batch = self.global_batch_size or num
        else:
            offsets, global_batch = list(range(num)), num
        first = {int(s.get("_position", 0)) - offset for s, offset in zip(samples, offsets)}
        epochs = {int(s.get("_epoch", 0)) for s in samples}
        if len(first) != 1 or len(epochs) != 1 or max(offsets) >= global_batch:
            raise ValueError(
                f"MultiCropCollate: the samples of one batch come from different global batches (first positions "
                f"{sorted(first)}, epochs {sorted(epochs)}, offsets up to {max(offsets)} of {global_batch})"
            )
        masking = self.masking
        plan_seed = [self.seed, epochs.pop(), first.pop(), _MASK_STREAM]
        plan = ibot_mask_plan(
            2 * global_batch,
            probability=masking.mask_sample_probability,
            ratio_min=masking.mask_ratio_min,
            ratio_max=masking.mask_ratio_max,
            rng=np.random.default_rng(plan_seed),
        )
        masks = np.zeros((2 * num, self.grid * self.grid), dtype=bool)
        for view in range(2):
            for index, (sample, offset) in enumerate(zip(samples, offsets)):
                ratio = float(plan[view * global_batch + offset])
                if math.isnan(ratio):
                    continue
                masks[view * num + index] = sample_planned_mask(
                    (self.grid, self.grid),
                    ratio,
                    np.random.default_rng(self._seed(sample, _MASK_STREAM, view)),
                    min_block_patches=masking.min_block_patches,
                )
        return torch.from_numpy(masks)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("MultiCropCollate: empty batch")
        with single_threaded():
            crops, bad_ids = self._augment(samples)
        masks = self._masks(samples)
        mask_indices, mask_weights = mask_weights_and_indices(masks)
        batch: dict[str, Any] = {
            "sample_ids": [str(s["id"]) for s in samples],
            "global_crops": _crop_major([c.global_crops for c in crops]),
            "local_crops": _crop_major([c.local_crops for c in crops]),
            "masks": masks,
            "mask_indices": mask_indices,
            "mask_weights": mask_weights,
            "labels": torch.tensor([int(s.get("label", -1)) for s in samples], dtype=torch.long),
            "num_bad_samples": len(bad_ids),
            "bad_sample_ids": bad_ids,
        }
        if crops[0].global_colour is not None:
            batch["colour"] = {
                "global": _crop_major_params([c.global_colour for c in crops]),
                "local": _crop_major_params([c.local_colour for c in crops]),
            }
        return batch


def finish_deferred_colour(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Run the deferred colour ops of a batch on ``device`` (the ``gpu_augment`` path).

    Moves the uint8 crops to ``device``, applies colour jitter, grayscale, blur and solarize to all crops of each
    size at once, normalises, and returns the batch with float ``[n, 3, H, W]`` crops and no ``colour`` key.
    A batch without deferred colour is returned unchanged.
    """
    colour = batch.get("colour")
    if colour is None:
        return batch
    out = {key: value for key, value in batch.items() if key != "colour"}
    on_cpu = torch.device(device).type == "cpu"
    with single_threaded() if on_cpu else contextlib.nullcontext():
        for key, group in (("global_crops", "global"), ("local_crops", "local")):
            crops = uint8_to_float(batch[key].to(device, non_blocking=True))
            if crops.shape[0]:
                apply_colour_ops(crops, ColourParams(**colour[group]))  # selects on the host, computes on device
            out[key] = normalize_(crops)
    return out
