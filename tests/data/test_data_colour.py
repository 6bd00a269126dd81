"""The batched colour ops equal torchvision's tensor ops crop by crop, whatever the op order and crop subset."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from trainer.data.colour import (
    ColourParams,
    adjust_hue,
    apply_colour_ops,
    gaussian_blur,
    grayscale,
    normalize_,
    uint8_to_float,
)

OPS = ("brightness", "contrast", "saturation", "hue")


def _images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    images[:, :, :4, :4] = 0.5  # grey patch: zero chroma
    images[:, 1, 4:8, 4:8] = images[:, 2, 4:8, 4:8]  # green == blue ties
    images[:, 0, 8:12, 8:12] = images[:, 1, 8:12, 8:12]  # red == green ties
    return images


def _reference(image: torch.Tensor, params: ColourParams, index: int) -> torch.Tensor:
    """torchvision, one crop, in the crop's op order."""
    out = image.clone()
    functions = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    if params.jitter[index]:
        for op_id in params.order[index].tolist():
            out = functions[op_id](out, float(params.factors[index, op_id]))
    if params.grayscale[index]:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    sigma = float(params.blur_sigma[index])
    if sigma > 0:
        out = TF.gaussian_blur(out, [9, 9], [sigma, sigma])
    if params.solarize[index]:
        out = torch.where(out >= 128 / 255, 1 - out, out)
    return out


@pytest.mark.parametrize("shift", [-0.1, -0.037, 0.0, 0.05, 0.1])
def test_hue_matches_torchvision(shift: float) -> None:
    images = _images(3)
    ours = adjust_hue(images.clone(), torch.full((3,), shift))
    for i in range(3):
        torch.testing.assert_close(ours[i], TF.adjust_hue(images[i], shift), atol=1e-5, rtol=0)


def test_blur_matches_torchvision_for_each_sigma() -> None:
    images = _images(4, size=20)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    ours = gaussian_blur(images.clone(), sigma)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(ours[i], TF.gaussian_blur(images[i], [9, 9], [s, s]), atol=1e-5, rtol=0)


def test_grayscale_and_normalize_match_torchvision() -> None:
    images = _images(2)
    torch.testing.assert_close(grayscale(images), TF.rgb_to_grayscale(images), atol=1e-6, rtol=0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    torch.testing.assert_close(normalize_(images.clone()), TF.normalize(images, mean, std), atol=1e-5, rtol=0)


def test_uint8_to_float_is_planar_and_scaled() -> None:
    channels_last = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    out = uint8_to_float(channels_last)
    assert out.shape == (2, 3, 5, 6) and out.is_contiguous()
    torch.testing.assert_close(out, channels_last.float() / 255)


def _random_params(n: int, seed: int) -> ColourParams:
    g = torch.Generator().manual_seed(seed)
    factors = torch.stack(
        [
            torch.empty(n).uniform_(0.6, 1.4, generator=g),
            torch.empty(n).uniform_(0.6, 1.4, generator=g),
            torch.empty(n).uniform_(0.8, 1.2, generator=g),
            torch.empty(n).uniform_(-0.1, 0.1, generator=g),
        ],
        dim=1,
    )
    blur = torch.rand(n, generator=g) < 0.5
    return ColourParams(
        jitter=torch.rand(n, generator=g) < 0.8,
        factors=factors,
        order=torch.stack([torch.randperm(4, generator=g) for _ in range(n)]),
        grayscale=torch.rand(n, generator=g) < 0.3,
        blur_sigma=torch.where(blur, torch.empty(n).uniform_(0.1, 2.0, generator=g), torch.zeros(n)),
        solarize=torch.rand(n, generator=g) < 0.4,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_apply_colour_ops_equals_per_crop_torchvision(seed: int) -> None:
    """Scattered subsets (gather path) and runs (view path) both reproduce the per-crop reference."""
    images = _images(9, size=16, seed=seed)
    params = _random_params(9, seed)
    ours = apply_colour_ops(images.clone(), params)
    for i in range(9):
        torch.testing.assert_close(ours[i], _reference(images[i], params, i), atol=2e-5, rtol=0)


def test_colour_params_cat_and_length_check() -> None:
    params = ColourParams.cat([_random_params(2, 0), _random_params(3, 1)])
    assert len(params) == 5 and params.order.shape == (5, 4)
    with pytest.raises(ValueError, match="colour params for 5 crops, got 4 crops"):
        apply_colour_ops(torch.rand(4, 3, 8, 8), params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_apply_colour_ops_on_cuda_matches_cpu() -> None:
    images = _images(64, size=32)
    params = _random_params(64, 3)
    cpu = apply_colour_ops(images.clone(), params)
    cuda = apply_colour_ops(images.cuda(), params.to("cuda"))
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=0)
