"""DINOv2 multi-crop augmentation (recipe.md, "Multi-crop data"): a fast path and the straightforward reference.

Per image: 2 global crops and ``num_local`` local crops, each a RandomResizedCrop (aspect 3/4..4/3, bicubic) with a
horizontal flip (p=0.5), colour jitter (0.4, 0.4, 0.2, 0.1; p=0.8), grayscale (p=0.2), Gaussian blur (kernel 9,
sigma U(0.1, 2.0)) with per-crop probabilities, solarize (threshold 128) on global crop 2, ImageNet normalisation.
The recipe's probabilities, scales and aspect ratios are ``data.crops`` settings (:class:`CropConfig`); the jitter
strengths are fixed.

Fast path (``data.crops.fast_path``): every random parameter is drawn first from one ``numpy`` generator seeded per
sample; the JPEG is then decoded with libjpeg's DCT scaling (``draft``) at 1/2, 1/4 or 1/8 size when every crop's
source region still holds at least its output size; each crop is cut and resized once on uint8 by torch; the colour
ops run on small float tensors (:mod:`trainer.data.colour`). With ``gpu_augment`` the colour ops are deferred: the
crops stay uint8 and their :class:`ColourParams` travel with the batch to the device.

Reference path: torchvision transforms on PIL images, image by image, as the DINOv2 reference code composes them.
It is the baseline of ``bench/augment.py`` and the yardstick of the statistical tests.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from trainer.config import ConfigError, CropConfig
from trainer.data.colour import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_JITTER_OPS,
    ColourParams,
    apply_colour_ops,
    normalize_,
    uint8_to_float,
)

__all__ = [
    "BLUR_PROBABILITIES",
    "BadImageError",
    "CropPlan",
    "MultiCropAugmentation",
    "MultiCropSample",
    "decode_image",
    "load_rgb",
    "open_image",
    "sample_crop_box",
    "sample_colour_params",
]

logger = logging.getLogger(__name__)

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
BLUR_SIGMA = (0.1, 2.0)
# (global crop 1, global crop 2, local crops). The reference code inverts the paper's probabilities, so the released
# models were trained with "reference".
BLUR_PROBABILITIES: dict[str, tuple[float, float, float]] = {
    "reference": (0.0, 0.9, 0.5), "paper": (1.0, 0.1, 0.5), "disabled": (0.0, 0.0, 0.0),
}
SeedLike = int | Sequence[int]


class BadImageError(ValueError):
    """The encoded bytes of a sample cannot be decoded (truncated, corrupt, not an image)."""


@dataclass
class MultiCropSample:
    """The crops of one image: float [n, 3, H, W] normalised, or uint8 [n, 3, H, W] with the colour deferred."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    global_colour: ColourParams | None = None
    """Set when the colour ops are deferred to the batch (``gpu_augment``)."""
    local_colour: ColourParams | None = None


@dataclass
class CropPlan:
    """The random draws of one image: crop boxes ``(left, top, width, height)`` and flips of every crop (global 1,
    global 2, locals), and the colour parameters of the global and of the local crops."""

    boxes: list[tuple[int, int, int, int]]
    flips: list[bool]
    global_colour: ColourParams
    local_colour: ColourParams


def sample_crop_box(
    rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
    aspect_ratio: tuple[float, float] = CropConfig.aspect_ratio,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(left, top, crop_width, crop_height)``: 10 tries at a random area and aspect ratio,
    then the largest centred box with an allowed aspect ratio (torchvision's algorithm)."""
    area = width * height
    log_low, log_high = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, crop_w, crop_h
    ratio = width / height
    if ratio < aspect_ratio[0]:
        crop_w, crop_h = width, int(round(width / aspect_ratio[0]))
    elif ratio > aspect_ratio[1]:
        crop_w, crop_h = int(round(height * aspect_ratio[1])), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def sample_colour_params(
    rng: np.random.Generator, num_crops: int, *, blur_probability: float, solarize_probability: float,
    blur_sigma: tuple[float, float] = BLUR_SIGMA, jitter_probability: float = CropConfig.jitter_probability,
    grayscale_probability: float = CropConfig.grayscale_probability,
) -> ColourParams:
    """Draw the photometric parameters of ``num_crops`` crops of one kind."""
    jitter = rng.random(num_crops) < jitter_probability
    factors = np.stack(
        [
            rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS, num_crops),
            rng.uniform(1 - CONTRAST, 1 + CONTRAST, num_crops),
            rng.uniform(1 - SATURATION, 1 + SATURATION, num_crops),
            rng.uniform(-HUE, HUE, num_crops),
        ],
        axis=1,
    )
    order = np.array([rng.permutation(NUM_JITTER_OPS) for _ in range(num_crops)], dtype=np.int64)
    order = order.reshape(num_crops, NUM_JITTER_OPS)
    grayscale = rng.random(num_crops) < grayscale_probability
    blur = rng.random(num_crops) < blur_probability
    sigma = np.where(blur, rng.uniform(blur_sigma[0], blur_sigma[1], num_crops), 0.0)
    solarize = rng.random(num_crops) < solarize_probability
    return ColourParams(
        jitter=torch.from_numpy(jitter),
        factors=torch.from_numpy(factors.astype(np.float32)),
        order=torch.from_numpy(order),
        grayscale=torch.from_numpy(grayscale),
        blur_sigma=torch.from_numpy(sigma.astype(np.float32)),
        solarize=torch.from_numpy(solarize),
    )


def open_image(data: bytes | Image.Image) -> Image.Image:
    """Open encoded bytes lazily (the header only); a PIL image passes through. Raises :class:`BadImageError`."""
    if isinstance(data, Image.Image):
        return data
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct/zlib errors... for bad files
        raise BadImageError(f"{type(exc).__name__}: {exc}") from exc


def load_rgb(image: Image.Image, *, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an opened image to RGB, JPEG DCT-scaled to at least ``draft_size`` when given.

    Raises :class:`BadImageError` when the data cannot be decoded completely (truncated files included).
    """
    try:
        if draft_size is not None:
            image.draft("RGB", draft_size)
        image.load()
        return image.convert("RGB")
    except Exception as exc:
        raise BadImageError(f"{type(exc).__name__}: {exc}") from exc


def decode_image(data: bytes | Image.Image) -> Image.Image:
    """Encoded bytes (or a PIL image) -> a fully decoded RGB PIL image. Raises :class:`BadImageError`."""
    return load_rgb(open_image(data))


def _draft_factor(boxes: list[tuple[int, int, int, int]], sizes: list[int]) -> int:
    """Largest DCT scale (1, 2, 4, 8) that keeps every crop's source region at least its output size."""
    room = min(min(w, h) / size for (_, _, w, h), size in zip(boxes, sizes))
    return next((factor for factor in (8, 4, 2) if room >= factor), 1)


def _seed_to_int(seed: SeedLike) -> int:
    return int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint64)[0] % (2**63))


class MultiCropAugmentation:
    """Image bytes -> the recipe's 2 global + ``num_local`` local crops, deterministic in ``seed``.

    Args:
        crops: the ``data.crops`` config (sizes, scales, blur probabilities, solarize probability, paths).
        fast_path: override ``crops.fast_path`` (True: fast path; False: torchvision reference path).
        defer_colour: override ``crops.gpu_augment`` (True: return uint8 crops plus :class:`ColourParams`).
    """

    def __init__(self, crops: CropConfig, *, fast_path: bool | None = None, defer_colour: bool | None = None) -> None:
        if crops.blur_probabilities not in BLUR_PROBABILITIES:
            raise ConfigError("data.crops.blur_probabilities", crops.blur_probabilities, ", ".join(BLUR_PROBABILITIES))
        self.crops = crops
        self.defer_colour = crops.gpu_augment if defer_colour is None else defer_colour
        self.fast_path = crops.fast_path if fast_path is None else fast_path
        if self.defer_colour and not self.fast_path:
            logger.warning("data.crops.fast_path=false has no effect with gpu_augment: the crops use the fast path")
            self.fast_path = True
        self.blur_probabilities = BLUR_PROBABILITIES[crops.blur_probabilities]
        self._reference = None if self.fast_path else _ReferencePipeline(crops, self.blur_probabilities)

    @property
    def crop_sizes(self) -> list[int]:
        """Output size of every crop in order: global 1, global 2, local 1..num_local."""
        return [self.crops.global_size] * 2 + [self.crops.local_size] * self.crops.num_local

    def __call__(self, data: bytes | Image.Image, *, seed: SeedLike) -> MultiCropSample:
        """Crops of one encoded image. Raises :class:`BadImageError` when the bytes cannot be decoded."""
        if self._reference is not None:
            return self._reference(data, seed=seed)
        return self._fast(data, np.random.default_rng(seed))

    # ------------------------------------------------------------------------------------------------ fast path
    def sample_plan(self, rng: np.random.Generator, width: int, height: int) -> CropPlan:
        """Every random draw of one image of ``width`` x ``height`` (the fast path's draw order)."""
        crops = self.crops
        scales = [crops.global_scale] * 2 + [crops.local_scale] * crops.num_local
        aspect = tuple(crops.aspect_ratio)
        boxes = [sample_crop_box(rng, width, height, scale, aspect) for scale in scales]
        flips = (rng.random(len(boxes)) < crops.flip_probability).tolist()
        blur_g1, blur_g2, blur_local = self.blur_probabilities
        common = dict(
            blur_sigma=tuple(crops.blur_sigma),
            jitter_probability=crops.jitter_probability,
            grayscale_probability=crops.grayscale_probability,
        )
        first = sample_colour_params(rng, 1, blur_probability=blur_g1, solarize_probability=0.0, **common)
        second = sample_colour_params(
            rng, 1, blur_probability=blur_g2, solarize_probability=crops.solarize_probability, **common
        )
        local = sample_colour_params(
            rng, crops.num_local, blur_probability=blur_local, solarize_probability=0.0, **common
        )
        return CropPlan(boxes, flips, ColourParams.cat([first, second]), local)

    def _fast(self, data: bytes | Image.Image, rng: np.random.Generator) -> MultiCropSample:
        header = open_image(data)
        width, height = header.size
        plan = self.sample_plan(rng, width, height)
        factor = _draft_factor(plan.boxes, self.crop_sizes) if header.format in ("JPEG", "MPO") else 1
        image = load_rgb(header, draft_size=(width // factor, height // factor) if factor > 1 else None)
        # [1, 3, H, W] channels-last view of the decoded pixels (np.array: a writable copy torch can wrap).
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
        crops = [
            _resized_crop(pixels, box, size, flip, factor)
            for box, size, flip in zip(plan.boxes, self.crop_sizes, plan.flips)
        ]
        global_u8 = torch.cat(crops[:2])
        size = self.crops.local_size
        local_u8 = torch.cat(crops[2:]) if crops[2:] else torch.empty(0, 3, size, size, dtype=torch.uint8)
        if self.defer_colour:
            return MultiCropSample(global_u8, local_u8, plan.global_colour, plan.local_colour)
        return MultiCropSample(_finish(global_u8, plan.global_colour), _finish(local_u8, plan.local_colour))


def _resized_crop(
    pixels: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool, factor: int
) -> torch.Tensor:
    """Crop ``box`` (original-image coordinates) of uint8 [1, 3, H, W] pixels decoded at 1/``factor`` scale, resize
    it to ``size`` (bicubic, antialiased: torch's uint8 kernel matches PIL to 1 level and runs about 4x faster) and
    flip it horizontally when asked. Returns uint8 [1, 3, size, size]."""
    left, top, crop_w, crop_h = box
    if factor > 1:  # libjpeg scaled by exactly 1/factor; round the box onto the reduced pixel grid
        right, bottom = round((left + crop_w) / factor), round((top + crop_h) / factor)
        left, top = min(round(left / factor), right - 1), min(round(top / factor), bottom - 1)
    else:
        right, bottom = left + crop_w, top + crop_h
    region = pixels[:, :, top:bottom, left:right]
    crop = torch.nn.functional.interpolate(region, size=(size, size), mode="bicubic", antialias=True)
    return crop.flip(-1) if flip else crop


def _finish(crops_u8: torch.Tensor, colour: ColourParams) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> colour ops -> normalised float [n, 3, H, W]."""
    crops = uint8_to_float(crops_u8)
    if crops.shape[0]:
        apply_colour_ops(crops, colour)
    return normalize_(crops)


class _ReferencePipeline:
    """The straightforward implementation: torchvision transforms on PIL images, as the reference code does."""

    def __init__(self, crops: CropConfig, blur_probabilities: tuple[float, float, float]) -> None:
        import torchvision.transforms as T

        def geometry(size: int, scale: tuple[float, float]) -> list:
            return [
                T.RandomResizedCrop(
                    size, scale=scale, ratio=tuple(crops.aspect_ratio), interpolation=T.InterpolationMode.BICUBIC
                ),
                T.RandomHorizontalFlip(p=crops.flip_probability),
            ]

        colour = [
            T.RandomApply([T.ColorJitter(BRIGHTNESS, CONTRAST, SATURATION, HUE)], p=crops.jitter_probability),
            T.RandomGrayscale(p=crops.grayscale_probability),
        ]

        def blur(p: float) -> T.RandomApply:
            return T.RandomApply([T.GaussianBlur(9, sigma=tuple(crops.blur_sigma))], p=p)

        finish = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        g1, g2, local = blur_probabilities
        self.global1 = T.Compose(geometry(crops.global_size, crops.global_scale) + colour + [blur(g1)] + finish)
        self.global2 = T.Compose(
            geometry(crops.global_size, crops.global_scale)
            + colour
            + [blur(g2), T.RandomSolarize(128, p=crops.solarize_probability)]
            + finish
        )
        self.local = T.Compose(geometry(crops.local_size, crops.local_scale) + colour + [blur(local)] + finish)
        self.num_local, self.local_size = crops.num_local, crops.local_size

    def __call__(self, data: bytes | Image.Image, *, seed: SeedLike) -> MultiCropSample:
        image = decode_image(data)
        # torchvision draws from torch's global generator: fork it so the trainer's RNG stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_to_int(seed))
            global_crops = torch.stack([self.global1(image), self.global2(image)])
            local = [self.local(image) for _ in range(self.num_local)]
        size = self.local_size
        local_crops = torch.stack(local) if local else torch.empty(0, 3, size, size)
        return MultiCropSample(global_crops, local_crops)
