"""Both implementations of the colour ops (CPU crop by crop; batched for accelerators, run here on the CPU) equal
torchvision's tensor ops, including the hue formula's edge cases and the clamps the CPU path skips."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from tests.data.test_data_colour import _images, _random_params, _reference
from trainer.data import colour
from trainer.data.colour import ColourParams, adjust_hue, apply_colour_ops


def _edge_images(n: int, size: int = 20, seed: int = 0) -> torch.Tensor:
    """Random pixels plus every tie pattern, grey, black, white and saturated primaries."""
    images = _images(n, size=size, seed=seed)
    images[:, 2, 12:16, 12:16] = images[:, 0, 12:16, 12:16]  # blue == red
    images[:, 1, 16:20, 0:4] = images[:, 0, 16:20, 0:4]  # red == green > or < blue
    images[:, 2, 16:20, 0:4] = 0.2
    images[:, :, 0:2, 16:20] = 0.0
    images[:, :, 2:4, 16:20] = 1.0
    images[:, :, 4:6, 16:20] = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    images[:, :, 6:8, 16:20] = torch.tensor([0.0, 1.0, 1.0]).reshape(1, 3, 1, 1)
    images[:, :, 8:10, 16:20] = torch.tensor([1.0, 1.0, 0.0]).reshape(1, 3, 1, 1)
    return images


@pytest.mark.parametrize("shift", [-1 / 6, -0.1, -0.05, -1e-6, 0.0, 1e-6, 0.0123, 1 / 12, 0.1, 1 / 6])
def test_hue_edge_cases_match_torchvision(shift: float) -> None:
    images = _edge_images(3, seed=int(abs(shift) * 1e4))
    as_float = adjust_hue(images.clone(), shift)
    as_tensor = adjust_hue(images.clone(), torch.full((3,), shift))
    torch.testing.assert_close(as_float, as_tensor, atol=1e-6, rtol=0)
    for i in range(3):
        torch.testing.assert_close(as_float[i], TF.adjust_hue(images[i], shift), atol=1e-5, rtol=0)


def test_hue_per_crop_shifts() -> None:
    images = _edge_images(5, seed=3)
    shifts = torch.tensor([-0.1, 0.1, 0.0, 0.04, -0.033])
    ours = adjust_hue(images.clone(), shifts)
    for i, shift in enumerate(shifts.tolist()):
        torch.testing.assert_close(ours[i], TF.adjust_hue(images[i], shift), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batched_path_equals_per_crop_torchvision(seed: int) -> None:
    """The accelerator implementation (gather/scatter per op slot), exercised on the CPU."""
    images = _edge_images(9, size=16, seed=seed)
    params = _random_params(9, seed)
    ours = colour._apply_colour_ops_batched(images.clone(), params)
    for i in range(9):
        torch.testing.assert_close(ours[i], _reference(images[i], params, i), atol=2e-5, rtol=0)


def test_batched_blur_matches_torchvision() -> None:
    images = _images(4, size=20)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    ours = colour._gaussian_blur_batched(images.clone(), sigma)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(ours[i], TF.gaussian_blur(images[i], [9, 9], [s, s]), atol=1e-5, rtol=0)


def _params(n: int, op: int, factor: float) -> ColourParams:
    return ColourParams(
        jitter=torch.ones(n, dtype=torch.bool),
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n).index_fill_(1, torch.tensor([op]), factor),
        order=torch.tensor([[op] + [o for o in range(4) if o != op]] * n),
        grayscale=torch.zeros(n, dtype=torch.bool),
        blur_sigma=torch.zeros(n),
        solarize=torch.zeros(n, dtype=torch.bool),
    )


@pytest.mark.parametrize("op", [0, 1, 2])
@pytest.mark.parametrize("factor", [0.6, 0.999, 1.0, 1.001, 1.4])
def test_cpu_path_clamps_exactly_where_torchvision_does(op: int, factor: float) -> None:
    """The CPU path skips the clamp of a blend that cannot leave [0, 1]; extreme pixels stay in range and match."""
    images = _edge_images(2, size=20, seed=op)
    params = _params(2, op, factor)
    ours = apply_colour_ops(images.clone(), params)
    assert ours.min() >= 0 and ours.max() <= 1 + 1e-6
    for i in range(2):
        torch.testing.assert_close(ours[i], _reference(images[i], params, i), atol=2e-5, rtol=0)


def test_cpu_path_accepts_channels_last_input() -> None:
    images = _edge_images(4, size=16, seed=5)
    params = _random_params(4, 5)
    planar = apply_colour_ops(images.clone(), params)
    channels_last = apply_colour_ops(images.clone().contiguous(memory_format=torch.channels_last), params)
    torch.testing.assert_close(channels_last, planar, atol=0, rtol=0)
