"""Crop-major collate: order, masks and weights, labels, bad samples, deferred (GPU-path) colour on the CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.data.helpers import jpeg_bytes
from trainer.config import CropConfig, MaskConfig
from trainer.data.augment import MultiCropAugmentation
from trainer.data.collate import MultiCropCollate, finish_deferred_colour

CROPS = CropConfig(global_size=32, local_size=16, num_local=3)
PATCH = 4


def _samples(count: int, *, bad: dict[int, bytes] | None = None) -> list[dict]:
    bad = bad or {}
    return [
        {"id": f"s{i}", "image": bad.get(i, jpeg_bytes(i, 40)), "label": i % 5, "_position": 100 + i, "_epoch": 2}
        for i in range(count)
    ]


def _collate(**options) -> MultiCropCollate:
    return MultiCropCollate(CROPS, MaskConfig(), patch_size=PATCH, seed=7, **options)


def test_batch_layout_is_crop_major_with_sample_ids_first() -> None:
    samples = _samples(4)
    batch = _collate()(samples)
    assert list(batch)[0] == "sample_ids" and batch["sample_ids"] == ["s0", "s1", "s2", "s3"]
    assert batch["global_crops"].shape == (8, 3, 32, 32) and batch["local_crops"].shape == (12, 3, 16, 16)
    assert batch["labels"].tolist() == [0, 1, 2, 3] and batch["labels"].dtype == torch.long
    assert batch["num_bad_samples"] == 0 and batch["bad_sample_ids"] == []
    augment = MultiCropAugmentation(CROPS)
    for b, sample in enumerate(samples):
        own = augment(sample["image"], seed=[7, 2, 100 + b])  # (seed, epoch, position)
        for k in range(2):
            assert torch.equal(batch["global_crops"][k * 4 + b], own.global_crops[k])
        for k in range(3):
            assert torch.equal(batch["local_crops"][k * 4 + b], own.local_crops[k])


def test_masks_indices_and_weights() -> None:
    batch = _collate()(_samples(8))
    masks = batch["masks"]
    assert masks.shape == (16, (32 // PATCH) ** 2) and masks.dtype == torch.bool
    per_crop = masks.sum(dim=1)
    assert int((per_crop > 0).sum()) == 8  # half of the 2B global crops are masked
    assert torch.equal(batch["mask_indices"], masks.flatten().nonzero().flatten())
    crop_of_index = batch["mask_indices"] // masks.shape[1]
    torch.testing.assert_close(batch["mask_weights"], 1.0 / per_crop[crop_of_index].float())
    assert float(batch["mask_weights"].sum()) == pytest.approx(8.0)  # each masked crop's weights sum to 1
    ratios = per_crop[per_crop > 0].float() / masks.shape[1]
    assert float(ratios.min()) >= 0.05 and float(ratios.max()) <= 0.5


def test_the_same_batch_collates_identically() -> None:
    first, second = _collate()(_samples(4)), _collate()(_samples(4))
    for key in ("global_crops", "local_crops", "masks", "mask_weights"):
        assert torch.equal(first[key], second[key]), key


def test_bad_samples_are_counted_logged_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    truncated = jpeg_bytes(1, 64)[:200]
    samples = _samples(4, bad={1: truncated, 3: b"random bytes, not an image"})
    with caplog.at_level(logging.WARNING, logger="trainer.data.collate"):
        batch = _collate()(samples)
    assert batch["num_bad_samples"] == 2 and batch["bad_sample_ids"] == ["s1", "s3"]
    assert batch["sample_ids"] == ["s0", "s1", "s2", "s3"]
    assert "bad sample s1 (epoch 2, position 101)" in caplog.text and "bad sample s3" in caplog.text
    assert torch.isfinite(batch["global_crops"]).all() and torch.isfinite(batch["local_crops"]).all()
    augment = MultiCropAugmentation(CROPS)
    donor_of_1 = augment(samples[2]["image"], seed=[7, 2, 101, 1])  # next good sample, the bad sample's own seed
    assert torch.equal(batch["global_crops"][1], donor_of_1.global_crops[0])
    assert not torch.equal(batch["global_crops"][1], batch["global_crops"][2])  # not a copy of the donor's crops
    donor_of_3 = augment(samples[0]["image"], seed=[7, 2, 103, 1])  # wraps around to the first sample
    assert torch.equal(batch["global_crops"][3], donor_of_3.global_crops[0])
    again = _collate()(samples)
    assert torch.equal(again["global_crops"], batch["global_crops"])


def test_a_batch_without_any_good_sample_uses_synthetic_fallbacks() -> None:
    samples = _samples(3, bad={0: b"x", 1: b"y", 2: b"z"})
    batch = _collate()(samples)
    assert batch["num_bad_samples"] == 3
    assert torch.isfinite(batch["global_crops"]).all()
    assert not torch.equal(batch["global_crops"][0], batch["global_crops"][1])


def test_deferred_colour_finished_on_the_cpu_equals_the_worker_path() -> None:
    """The gpu_augment path (uint8 crops + params, colour ops on the whole batch) gives the same batch."""
    samples = _samples(5)
    finished = _collate()(samples)
    deferred_collate = _collate(augmentation=MultiCropAugmentation(CROPS, defer_colour=True))
    deferred = deferred_collate(samples)
    assert deferred["global_crops"].dtype == torch.uint8 and "colour" in deferred
    out = finish_deferred_colour(deferred, "cpu")
    assert "colour" not in out and list(out)[0] == "sample_ids"
    torch.testing.assert_close(out["global_crops"], finished["global_crops"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["local_crops"], finished["local_crops"], atol=1e-5, rtol=0)
    assert torch.equal(out["masks"], finished["masks"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deferred_colour_on_cuda_equals_the_worker_path() -> None:
    samples = _samples(16)
    finished = _collate()(samples)
    deferred = _collate(augmentation=MultiCropAugmentation(CROPS, defer_colour=True))(samples)
    out = finish_deferred_colour(deferred, "cuda")
    assert out["global_crops"].device.type == "cuda"
    torch.testing.assert_close(out["global_crops"].cpu(), finished["global_crops"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["local_crops"].cpu(), finished["local_crops"], atol=1e-4, rtol=0)


def test_rejects_a_global_size_that_is_not_a_multiple_of_the_patch() -> None:
    with pytest.raises(ValueError, match="data.crops.global_size: invalid value 32; allowed: a multiple of the patch"):
        MultiCropCollate(CROPS, MaskConfig(), patch_size=14, seed=0)
