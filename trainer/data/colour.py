"""Photometric half of the multi-crop recipe on float tensors: colour jitter, grayscale, blur, solarize, normalise.

:func:`apply_colour_ops` serves the CPU fast path (one image's crops, in a DataLoader worker: crop by crop, with
Python-float parameters) and the GPU path (``data.crops.gpu_augment``: every crop of a batch at once, on the device,
each op once per op slot). Both follow the torchvision tensor definition of the reference recipe (recipe.md,
"Multi-crop data") to float32 rounding:

- brightness ``clamp(f * x)``, contrast ``clamp(f * x + (1 - f) * mean(gray(x)))``, saturation
  ``clamp(f * x + (1 - f) * gray(x))``, hue = HSV hue rotation by ``f`` turns; applied in a random order per crop;
- grayscale ``0.2989 R + 0.587 G + 0.114 B`` replicated on three channels;
- Gaussian blur with a 9-tap kernel, reflect padding, separable;
- solarize: values >= 128/255 become ``1 - x``.

Only arithmetic, clamp, lerp, sign and min/max/sum reductions over channels are used: on the CPU ``torch.where``,
``remainder``, ``aminmax`` / ``max`` with indices and broadcast ``addcmul`` are several times slower than plain
arithmetic in the kernels we measured. Hue needs no HSV round trip (see :func:`adjust_hue`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_JITTER_OPS",
    "ColourParams",
    "apply_colour_ops",
    "adjust_hue",
    "gaussian_blur",
    "grayscale",
    "normalize_",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision and PIL's "L" conversion
SOLARIZE_THRESHOLD = 128 / 255  # PIL's solarize(threshold=128) on the uint8 image
BLUR_KERNEL_SIZE = 9
NEGLIGIBLE_TAP = 1e-8  # relative to the centre tap: below float32 resolution of the sum (sigma < ~0.7 at tap 4)
NUM_JITTER_OPS = 4  # brightness, contrast, saturation, hue (the index used in ColourParams.order)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(NUM_JITTER_OPS)


@dataclass
class ColourParams:
    """Per-crop photometric parameters of N crops, drawn once on the CPU so every path applies the same ops.

    Legend: N = number of crops.
    """

    jitter: torch.Tensor
    """Bool[N]: colour jitter applied (p=0.8)."""
    factors: torch.Tensor
    """Float[N, 4]: brightness, contrast, saturation factors and hue shift (turns), indexed by op id."""
    order: torch.Tensor
    """Long[N, 4]: the op ids in the order they are applied (a random permutation per crop)."""
    grayscale: torch.Tensor
    """Bool[N]: converted to grayscale (p=0.2)."""
    blur_sigma: torch.Tensor
    """Float[N]: Gaussian blur sigma; 0 means no blur."""
    solarize: torch.Tensor
    """Bool[N]: solarized (global crop 2 only)."""

    def __len__(self) -> int:
        return int(self.jitter.shape[0])

    def to(self, device: torch.device | str) -> ColourParams:
        """The parameters on ``device`` (``self`` when they are there already)."""
        if all(getattr(self, f.name).device == torch.device(device) for f in fields(self)):
            return self
        return ColourParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @classmethod
    def cat(cls, parts: list[ColourParams]) -> ColourParams:
        """Concatenate the parameters of several crop groups (in the given order)."""
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def _column(values: torch.Tensor) -> torch.Tensor:
    """[n] -> [n, 1, 1, 1] for broadcasting a per-crop scalar over [n, 3, H, W]."""
    return values.reshape(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of [n, 3, H, W] as [n, 1, H, W]."""
    red, green, blue = GRAY_WEIGHTS
    return (x[:, 0:1] * red).add_(x[:, 1:2], alpha=green).add_(x[:, 2:3], alpha=blue)


def _brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul_(_column(factor)).clamp_(0.0, 1.0)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3))
    return x.mul_(_column(factor)).add_(_column(mean * (1 - factor))).clamp_(0.0, 1.0)


def _saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = grayscale(x).mul_(_column(1 - factor))
    return x.mul_(_column(factor)).add_(gray).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor | float) -> torch.Tensor:
    """Rotate the HSV hue of [n, 3, H, W] (values in [0, 1]) in place by ``shift`` turns per crop (a tensor [n], or
    one float for every crop); V and S are unchanged. Returns ``x``.

    ``shift`` must lie in [-1/6, 1/6] turns (the recipe's hue jitter is at most 0.1). In sextants, channel c sits at
    signed hue distance ``phi_c`` in [-3, 3] from its own hue (R 0, G 2, B 4) and its value is
    ``min + chroma * clamp(2 - |phi_c|, 0, 1)``. A shift by ``d`` sextants (|d| <= 1) turns this into
    ``clamp(2 - |phi_c| - sign(phi_c) d, 0, 1)``: exact, because only a channel on its plateau (|phi_c| <= 1) can
    cross its own hue, and there both expressions clamp to 1. ``sign(phi_c) = sign(x_next - x_prev)`` (cyclic
    R, G, B) and ``chroma * (2 - |phi_c|) = 2 x_c + max - (R + G + B)`` for the max, middle and min channel alike, so

        out_c = clamp(2 x_c + max + min - (R + G + B) - sign(x_next - x_prev) * chroma * d, min, max)

    About 14 elementwise kernels, no division, no sextant selection (the former formulation took about 40).
    """
    low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    base = torch.add(high, low).sub_(x.sum(dim=1, keepdim=True))
    if isinstance(shift, torch.Tensor):
        step = torch.sub(high, low).mul_(_column(6 * shift.to(x.dtype)))
    else:
        step = torch.sub(high, low).mul_(6 * float(shift))
    diff = torch.empty_like(x)
    red, green, blue = x[:, 0], x[:, 1], x[:, 2]
    torch.sub(green, blue, out=diff[:, 0])
    torch.sub(blue, red, out=diff[:, 1])
    torch.sub(red, green, out=diff[:, 2])
    diff.sign_().mul_(step)
    torch.add(base, x, alpha=2, out=x)
    return x.sub_(diff).clamp_(min=low, max=high)


@functools.cache
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).reshape(1, len(values), 1, 1)


_JITTER_OPS = (_brightness, _contrast, _saturation, adjust_hue)


def blur_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """Normalised 9-tap Gaussian kernels [n, 9] for the sigmas [n] (torchvision's kernel definition)."""
    half = BLUR_KERNEL_SIZE // 2
    taps = torch.arange(-half, half + 1, dtype=torch.float32, device=sigma.device)
    kernel = torch.exp(-0.5 * (taps / sigma.float().unsqueeze(1)) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


def blur_weights(sigma: float) -> list[float]:
    """The 9-tap kernel of :func:`blur_kernels` for one sigma, as Python floats (computed in double precision)."""
    half = BLUR_KERNEL_SIZE // 2
    taps = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-half, half + 1)]
    total = math.fsum(taps)
    return [tap / total for tap in taps]


def _blur_pass(padded: torch.Tensor, kernel: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """One separable pass along ``dim`` with per-crop kernels [n, 9] (the batched, device path)."""
    half = BLUR_KERNEL_SIZE // 2
    out = padded.narrow(dim, half, length) * _column(kernel[:, half])
    for k in range(half):
        pair = padded.narrow(dim, k, length) + padded.narrow(dim, 2 * half - k, length)
        out.addcmul_(pair, _column(kernel[:, k]))
    return out


def _flat_pass(flat: torch.Tensor, weights: list[float], length: int, step: int) -> torch.Tensor:
    """``out[j] = sum_k weights[k] * flat[j + k * step]`` for ``j < length``, on a contiguous 1-D tensor: every tap
    is one fused multiply-add over contiguous memory (the fastest elementwise kernel on the CPU)."""
    half = BLUR_KERNEL_SIZE // 2
    out = torch.mul(flat[half * step : half * step + length], weights[half])
    for k in range(BLUR_KERNEL_SIZE):
        if k == half or weights[k] < NEGLIGIBLE_TAP * weights[half]:
            continue  # small sigma: the outer taps change no float32 value
        out.add_(flat[k * step : k * step + length], alpha=weights[k])
    return out


def _blur_one(x: torch.Tensor, sigma: float) -> None:
    """Blur one crop [1, 3, H, W] (contiguous) in place: reflect-pad, then each separable pass over the flattened
    padded image (rows: neighbours 1 apart; columns: neighbours one row apart); the few outputs that straddle two
    rows or channels are computed and dropped by the strided view."""
    half = BLUR_KERNEL_SIZE // 2
    _, channels, height, width = x.shape
    weights = blur_weights(sigma)
    padded = F.pad(x, (half, half, 0, 0), mode="reflect").reshape(-1)
    row_width = width + 2 * half
    rows = _flat_pass(padded, weights, padded.numel() - 2 * half, 1)
    shape, plane = (1, channels, height, width), height * row_width
    rows = rows.as_strided(shape, (channels * plane, plane, row_width, 1))
    padded = F.pad(rows, (0, 0, half, half), mode="reflect").reshape(-1)
    plane = (height + 2 * half) * width
    cols = _flat_pass(padded, weights, padded.numel() - 2 * half * width, width)
    x.copy_(cols.as_strided(shape, (channels * plane, plane, width, 1)))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur [n, 3, H, W] with a 9-tap Gaussian of per-crop ``sigma`` [n] (reflect padding, separable).

    On the CPU ``x`` is blurred in place and returned; elsewhere a new tensor is returned.
    """
    if x.device.type == "cpu":  # per-crop scalar weights: faster than broadcast multiplies on the CPU
        source = x if x.is_contiguous() else x.contiguous()
        for i, value in enumerate(sigma.tolist()):
            _blur_one(source[i : i + 1], value)
        if source is not x:
            x.copy_(source)
        return x
    return _gaussian_blur_batched(x, sigma)


def _gaussian_blur_batched(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """:func:`gaussian_blur` on an accelerator: all crops at once with per-crop kernels; returns a new tensor."""
    half = BLUR_KERNEL_SIZE // 2
    height, width = x.shape[-2:]
    kernels = blur_kernels(sigma)
    rows = _blur_pass(F.pad(x, (half, half, 0, 0), mode="reflect"), kernels, 3, width)
    return _blur_pass(F.pad(rows, (0, 0, half, half), mode="reflect"), kernels, 2, height)


def _solarize(x: torch.Tensor) -> torch.Tensor:
    above = (x >= SOLARIZE_THRESHOLD).to(x.dtype)
    return x.add_(above.mul_(1 - 2 * x))  # x -> 1 - x where above, branch-free


def _apply_to(x: torch.Tensor, index: np.ndarray, op, *args: torch.Tensor) -> None:
    """Apply ``op`` in place to the crops ``index`` (sorted) of ``x``.

    Consecutive crops are processed through a view (no copy); scattered ones through one gather and one scatter.
    The selection is computed on the host: a handful of numpy calls beat dozens of tiny tensor ops per image.
    """
    count = len(index)
    if count == 0:
        return
    start = int(index[0])
    if int(index[-1]) - start + 1 == count:
        view = x[start : start + count]
        result = op(view, *(a[start : start + count] for a in args))
        if result.data_ptr() != view.data_ptr():
            view.copy_(result)
        return
    rows = torch.from_numpy(index).to(x.device)
    x.index_copy_(0, rows, op(x.index_select(0, rows), *(a.index_select(0, rows) for a in args)))


# ------------------------------------------------------------------------------------------------ CPU, crop by crop
# In a DataLoader worker the crops of one image are few and small: per-crop ops with Python-float parameters (no
# gathers, no broadcast multiplies, no host/device bookkeeping) and clamps only where a value can leave [0, 1].


def _brightness_one(x: torch.Tensor, factor: float) -> None:
    x.mul_(factor)
    if factor > 1:  # x >= 0 stays >= 0; only a gain can exceed 1
        x.clamp_(max=1.0)


def _gray_mean(x: torch.Tensor) -> float:
    """Mean of the luma of one crop, from its three channel means."""
    means = x.mean(dim=(0, 2, 3)).tolist()
    return math.fsum(weight * mean for weight, mean in zip(GRAY_WEIGHTS, means))


def _contrast_one(x: torch.Tensor, factor: float) -> None:
    # factor * x + (1 - factor) * mean as one lerp toward the mean (one kernel instead of a multiply and an add)
    x.lerp_(torch.tensor(_gray_mean(x), dtype=x.dtype), 1 - factor)
    if factor > 1:  # a blend toward the mean (factor <= 1) stays in [0, 1]
        x.clamp_(0.0, 1.0)


def _gray_one(x: torch.Tensor) -> torch.Tensor:
    """The luma of one crop [1, 3, H, W] as [1, 1, H, W]."""
    red, green, blue = GRAY_WEIGHTS
    return torch.mul(x[:, 0:1], red).add_(x[:, 1:2], alpha=green).add_(x[:, 2:3], alpha=blue)


def _saturation_one(x: torch.Tensor, factor: float) -> None:
    x.lerp_(_gray_one(x).expand_as(x), 1 - factor)  # factor * x + (1 - factor) * gray
    if factor > 1:  # a blend toward the luma (factor <= 1) stays in [0, 1]
        x.clamp_(0.0, 1.0)


_JITTER_ONE = (_brightness_one, _contrast_one, _saturation_one, adjust_hue)


def _apply_colour_ops_cpu(x: torch.Tensor, params: ColourParams) -> torch.Tensor:
    jitter, order, factors = params.jitter.tolist(), params.order.tolist(), params.factors.tolist()
    gray, sigma, solarize = params.grayscale.tolist(), params.blur_sigma.tolist(), params.solarize.tolist()
    contiguous = x.is_contiguous()
    work = x if contiguous else x.contiguous()
    for i in range(work.shape[0]):
        crop = work[i : i + 1]
        if jitter[i]:
            for op_id in order[i]:
                _JITTER_ONE[op_id](crop, factors[i][op_id])
        if gray[i]:
            crop.copy_(_gray_one(crop).expand_as(crop))
        if sigma[i] > 0:
            _blur_one(crop, sigma[i])
        if solarize[i]:
            _solarize(crop)
    if not contiguous:
        x.copy_(work)
    return x


def apply_colour_ops(x: torch.Tensor, params: ColourParams) -> torch.Tensor:
    """Colour jitter (random order per crop), grayscale, blur and solarize of [N, 3, H, W] floats in [0, 1], in
    place; returns ``x``. On the CPU crop by crop, elsewhere batched over all crops that share an op slot."""
    if x.shape[0] != len(params):
        raise ValueError(f"colour params for {len(params)} crops, got {x.shape[0]} crops")
    if x.device.type == "cpu":
        return _apply_colour_ops_cpu(x, params.to("cpu"))
    return _apply_colour_ops_batched(x, params)


def _apply_colour_ops_batched(x: torch.Tensor, params: ColourParams) -> torch.Tensor:
    """:func:`apply_colour_ops` for many crops on an accelerator: each op runs once per op slot on all crops that
    draw it there."""
    host = params.to("cpu")
    jitter, order = host.jitter.numpy(), host.order.numpy()
    values = params.to(x.device)
    for slot in range(NUM_JITTER_OPS):
        for op_id, op in enumerate(_JITTER_OPS):
            index = np.flatnonzero(jitter & (order[:, slot] == op_id))
            _apply_to(x, index, op, values.factors[:, op_id])
    _apply_to(x, np.flatnonzero(host.grayscale.numpy()), lambda crops: grayscale(crops).expand(-1, 3, -1, -1))
    _apply_to(x, np.flatnonzero(host.blur_sigma.numpy() > 0), gaussian_blur, values.blur_sigma)
    _apply_to(x, np.flatnonzero(host.solarize.numpy()), _solarize)
    return x


def normalize_(x: torch.Tensor) -> torch.Tensor:
    """In-place ImageNet mean/std normalisation of [N, 3, H, W] floats in [0, 1]."""
    inv_std = tuple(1.0 / s for s in IMAGENET_STD)
    return x.sub_(_constant(IMAGENET_MEAN, x.dtype, x.device)).mul_(_constant(inv_std, x.dtype, x.device))


def uint8_to_float(crops: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [N, 3, H, W] in any memory layout -> contiguous float32 [N, 3, H, W] in [0, 1]."""
    tensor = torch.as_tensor(crops)
    # Planar (contiguous NCHW) output: per-channel ops on a channels-last float tensor run several times slower.
    return tensor.to(torch.float32, memory_format=torch.contiguous_format).mul_(1 / 255)
