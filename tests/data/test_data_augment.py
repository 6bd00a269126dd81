"""Multi-crop augmentation: shapes, ranges, determinism, recipe probabilities, fast path == reference statistically."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data.helpers import encode, jpeg_bytes
from trainer.config import CropConfig
from trainer.data.augment import (
    BLUR_PROBABILITIES,
    BadImageError,
    MultiCropAugmentation,
    load_rgb,
    open_image,
    sample_crop_box,
)
from trainer.data.colour import IMAGENET_MEAN, IMAGENET_STD
from trainer.data.synthetic import synthetic_image

CROPS = CropConfig(global_size=32, local_size=16, num_local=4)
MEAN = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)


def _pixels(normalised: torch.Tensor) -> torch.Tensor:
    return normalised * STD + MEAN


@pytest.mark.parametrize("fast_path", [True, False])
def test_shapes_dtype_and_value_range(fast_path: bool) -> None:
    sample = MultiCropAugmentation(CROPS, fast_path=fast_path)(jpeg_bytes(0, 48), seed=3)
    assert sample.global_crops.shape == (2, 3, 32, 32) and sample.global_crops.dtype == torch.float32
    assert sample.local_crops.shape == (4, 3, 16, 16) and sample.local_crops.dtype == torch.float32
    assert sample.global_colour is None and sample.local_colour is None
    for crops in (sample.global_crops, sample.local_crops):
        pixels = _pixels(crops)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


@pytest.mark.parametrize("fast_path", [True, False])
def test_same_seed_same_crops_other_seed_other_crops(fast_path: bool) -> None:
    augment = MultiCropAugmentation(CROPS, fast_path=fast_path)
    data = jpeg_bytes(1, 48)
    first, again, other = augment(data, seed=(0, 5)), augment(data, seed=(0, 5)), augment(data, seed=(0, 6))
    assert torch.equal(first.global_crops, again.global_crops) and torch.equal(first.local_crops, again.local_crops)
    assert not torch.equal(first.global_crops, other.global_crops)


def test_deferred_colour_returns_uint8_crops_and_params() -> None:
    sample = MultiCropAugmentation(CROPS, defer_colour=True)(jpeg_bytes(2, 48), seed=1)
    assert sample.global_crops.shape == (2, 3, 32, 32) and sample.global_crops.dtype == torch.uint8
    assert sample.local_crops.shape == (4, 3, 16, 16)
    assert len(sample.global_colour) == 2 and len(sample.local_colour) == 4
    assert not sample.global_colour.solarize[0]  # solarize never on global crop 1


def test_no_local_crops() -> None:
    crops = CropConfig(global_size=32, local_size=16, num_local=0)
    for fast_path in (True, False):
        sample = MultiCropAugmentation(crops, fast_path=fast_path)(jpeg_bytes(0, 48), seed=0)
        assert sample.local_crops.shape == (0, 3, 16, 16)


def test_crop_boxes_follow_scale_and_aspect_ranges(rng: np.random.Generator) -> None:
    width, height = 200, 150
    for scale in ((0.32, 1.0), (0.05, 0.32)):
        for _ in range(500):
            left, top, w, h = sample_crop_box(rng, width, height, scale)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            area = w * h / (width * height)
            # Rounding the sides to pixels moves the area and the ratio a little.
            assert scale[0] * 0.9 <= area <= scale[1] * 1.05
            assert 3 / 4 * 0.93 <= w / h <= 4 / 3 * 1.07


def test_crop_box_falls_back_to_a_centred_crop_for_extreme_images(rng: np.random.Generator) -> None:
    left, top, w, h = sample_crop_box(rng, 400, 10, (0.32, 1.0))
    assert (w, h) == (13, 10) and left == (400 - 13) // 2 and top == 0  # the widest allowed ratio, 4/3


@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_random_draws_follow_the_recipe_probabilities(mode: str) -> None:
    crops = CropConfig(global_size=32, local_size=16, num_local=8, blur_probabilities=mode)
    augment = MultiCropAugmentation(crops)
    plans = [augment.sample_plan(np.random.default_rng(i), 64, 64) for i in range(1500)]

    def freq(values: list) -> float:
        return float(np.mean(values))

    g1, g2, local = BLUR_PROBABILITIES[mode]
    tolerance = 0.04  # 3.5 sigma for p=0.5 over 1500 draws
    assert freq([p.global_colour.blur_sigma[0] > 0 for p in plans]) == pytest.approx(g1, abs=tolerance)
    assert freq([p.global_colour.blur_sigma[1] > 0 for p in plans]) == pytest.approx(g2, abs=tolerance)
    assert freq([s > 0 for p in plans for s in p.local_colour.blur_sigma]) == pytest.approx(local, abs=0.02)
    assert freq([p.global_colour.solarize[1] for p in plans]) == pytest.approx(0.2, abs=tolerance)
    assert not any(p.global_colour.solarize[0] or p.local_colour.solarize.any() for p in plans)
    everything = [p.global_colour for p in plans] + [p.local_colour for p in plans]
    assert freq([j for c in everything for j in c.jitter]) == pytest.approx(0.8, abs=0.02)
    assert freq([g for c in everything for g in c.grayscale]) == pytest.approx(0.2, abs=0.02)
    assert freq([f for p in plans for f in p.flips]) == pytest.approx(0.5, abs=0.02)
    sigmas = torch.cat([c.blur_sigma[c.blur_sigma > 0] for c in everything])
    assert 0.1 <= sigmas.min() and sigmas.max() <= 2.0 and float(sigmas.mean()) == pytest.approx(1.05, abs=0.05)
    factors = torch.cat([c.factors for c in everything])
    for op, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert low <= float(factors[:, op].min()) and float(factors[:, op].max()) <= high
    orders = {tuple(o.tolist()) for c in everything for o in c.order}
    assert len(orders) == 24  # every permutation of the four jitter ops occurs


def _crop_statistics(fast_path: bool, num_images: int) -> dict[str, float]:
    augment = MultiCropAugmentation(CROPS, fast_path=fast_path)
    globals_, locals_ = [], []
    for index in range(num_images):
        sample = augment(jpeg_bytes(index, 48), seed=(11, index))
        globals_.append(sample.global_crops)
        locals_.append(sample.local_crops)
    stats = {}
    for name, crops in (("global", torch.cat(globals_)), ("local", torch.cat(locals_))):
        pixels = _pixels(crops)
        stats[f"{name}_mean"] = float(pixels.mean())
        stats[f"{name}_std"] = float(pixels.std())
        stats[f"{name}_crop_std"] = float(pixels.std(dim=(1, 2, 3)).mean())  # blur lowers it
        grey = (pixels.amax(dim=1) - pixels.amin(dim=1)).amax(dim=(1, 2)) < 2 / 255
        stats[f"{name}_gray_fraction"] = float(grey.float().mean())
    return stats


def test_fast_path_is_statistically_the_reference() -> None:
    """Same recipe, different RNG and arithmetic: the output distributions must agree."""
    fast, reference = _crop_statistics(True, 160), _crop_statistics(False, 160)
    for key in fast:
        tolerance = 0.06 if key.endswith("fraction") else 0.02
        assert fast[key] == pytest.approx(reference[key], abs=tolerance), key
    assert fast["global_gray_fraction"] == pytest.approx(0.2, abs=0.06)


def test_jpeg_draft_decode_keeps_the_same_crops() -> None:
    """A 512 px JPEG with 32 px crops decodes at 1/8 size; the crops match those cut from the full image."""
    image = synthetic_image(3, 512, seed=1)
    data = encode(image, "JPEG", quality=95)
    assert load_rgb(open_image(data), draft_size=(64, 64)).size == (64, 64)
    augment = MultiCropAugmentation(CROPS, defer_colour=True)
    drafted = augment(data, seed=9)
    full = augment(load_rgb(open_image(data)), seed=9)  # a decoded image: no draft
    for a, b in ((drafted.global_crops, full.global_crops), (drafted.local_crops, full.local_crops)):
        difference = (a.float() - b.float()).abs().mean() / 255
        assert difference < 0.03  # a wrongly scaled box would cut another region entirely
    assert torch.equal(drafted.global_colour.factors, full.global_colour.factors)


@pytest.mark.parametrize("fast_path", [True, False])
def test_undecodable_bytes_raise_bad_image_error(fast_path: bool) -> None:
    augment = MultiCropAugmentation(CROPS, fast_path=fast_path)
    truncated = jpeg_bytes(0, 64)[:300]
    for data in (b"\x00\x01 definitely not an image", truncated):
        with pytest.raises(BadImageError):
            augment(data, seed=0)


def test_grayscale_png_and_rgba_inputs_become_rgb() -> None:
    augment = MultiCropAugmentation(CROPS)
    gray = encode(Image.fromarray(np.full((28, 28), 90, dtype=np.uint8)), "PNG")
    rgba = encode(Image.new("RGBA", (30, 30), (10, 200, 30, 128)), "PNG")
    for data in (gray, rgba):
        assert augment(data, seed=0).global_crops.shape == (2, 3, 32, 32)


def test_unknown_blur_mode_is_rejected() -> None:
    crops = CropConfig(blur_probabilities="reference")
    object.__setattr__(crops, "blur_probabilities", "sometimes")
    with pytest.raises(ValueError, match="data.crops.blur_probabilities: invalid value 'sometimes'"):
        MultiCropAugmentation(crops)


def test_reference_path_leaves_the_global_torch_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    MultiCropAugmentation(CROPS, fast_path=False)(jpeg_bytes(0, 48), seed=1)
    assert torch.equal(torch.rand(3), expected)
    assert math.isfinite(float(expected.sum()))


def test_blur_sigma_range_is_configurable_and_validated() -> None:
    crops = CropConfig(global_size=32, local_size=16, num_local=8, blur_sigma=(0.0125, 0.25))
    augment = MultiCropAugmentation(crops)
    plans = [augment.sample_plan(np.random.default_rng(i), 64, 64) for i in range(300)]
    sigmas = torch.cat([c.blur_sigma[c.blur_sigma > 0] for p in plans for c in (p.global_colour, p.local_colour)])
    assert len(sigmas) > 500 and 0.0125 <= float(sigmas.min()) and float(sigmas.max()) <= 0.25
    # the same image, seed and plan with the recipe's sigma differs only where a crop drew a blur
    image = jpeg_bytes(3, 48)
    scaled = MultiCropAugmentation(crops)(image, seed=(5, 1))
    recipe = MultiCropAugmentation(CropConfig(global_size=32, local_size=16, num_local=8))(image, seed=(5, 1))
    assert scaled.global_crops.shape == recipe.global_crops.shape
    assert not torch.equal(scaled.local_crops, recipe.local_crops)

    from trainer.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match="data.crops.blur_sigma"):
        resolve_config("tiny", overrides={"data.crops.blur_sigma": [0.5, 0.1]})


def test_flip_jitter_grayscale_and_aspect_are_configurable() -> None:
    crops = CropConfig(
        global_size=32, local_size=16, num_local=8, aspect_ratio=(1.0, 1.0),
        flip_probability=0.0, jitter_probability=0.0, grayscale_probability=1.0,
    )
    augment = MultiCropAugmentation(crops)
    plans = [augment.sample_plan(np.random.default_rng(i), 64, 64) for i in range(200)]
    assert not any(f for p in plans for f in p.flips)
    colours = [c for p in plans for c in (p.global_colour, p.local_colour)]
    assert not any(bool(c.jitter.any()) for c in colours)
    assert all(bool(c.grayscale.all()) for c in colours)
    assert all(w == h for p in plans for (_, _, w, h) in p.boxes)  # square boxes on a square image

    flipping = dataclasses.replace(crops, flip_probability=1.0, aspect_ratio=(0.5, 2.0))
    plans = [MultiCropAugmentation(flipping).sample_plan(np.random.default_rng(i), 64, 64) for i in range(200)]
    assert all(f for p in plans for f in p.flips)
    ratios = [w / h for p in plans for (_, _, w, h) in p.boxes]
    assert min(ratios) < 0.7 and max(ratios) > 1.45  # beyond the recipe's 3/4..4/3


@pytest.mark.parametrize("fast_path", [True, False])
def test_no_geometry_and_no_colour_gives_the_plain_image(fast_path: bool) -> None:
    """Every random op off and crops of the whole image: both paths return the image, resized and normalised."""
    crops = CropConfig(
        global_size=48, local_size=16, num_local=2, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0),
        aspect_ratio=(1.0, 1.0), flip_probability=0.0, jitter_probability=0.0, grayscale_probability=0.0,
        blur_probabilities="disabled", solarize_probability=0.0,
    )
    data = encode(synthetic_image(4, 48), "PNG")
    image = Image.open(io.BytesIO(data)).convert("RGB")
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - MEAN[0]) / STD[0]
    sample = MultiCropAugmentation(crops, fast_path=fast_path)(data, seed=0)
    for crop in sample.global_crops:
        assert torch.allclose(crop, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("data.crops.aspect_ratio", [1.5, 1.0]),
        ("data.crops.aspect_ratio", [0.0, 1.0]),
        ("data.crops.flip_probability", 1.5),
        ("data.crops.jitter_probability", -0.1),
        ("data.crops.grayscale_probability", 2),
        ("data.crops.solarize_probability", 1.01),
    ],
)
def test_crop_probabilities_and_aspect_are_validated(key: str, value: object) -> None:
    from trainer.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config("tiny", overrides={key: value})
