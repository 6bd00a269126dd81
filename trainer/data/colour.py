"""Photometric half of the multi-crop recipe on float tensors: colour jitter, grayscale, blur, solarize, normalise.

The same functions serve the CPU fast path (one image's crops, in a DataLoader worker) and the GPU path
(``data.crops.gpu_augment``: every crop of a batch at once, on the device). Each op follows the torchvision tensor
definition of the reference recipe (recipe.md, "Multi-crop data"):

- brightness ``clamp(f * x)``, contrast ``clamp(f * x + (1 - f) * mean(gray(x)))``, saturation
  ``clamp(f * x + (1 - f) * gray(x))``, hue = HSV hue rotation by ``f`` turns; applied in a random order per crop;
- grayscale ``0.2989 R + 0.587 G + 0.114 B`` replicated on three channels;
- Gaussian blur with a 9-tap kernel, reflect padding, separable;
- solarize: values >= 128/255 become ``1 - x``.

Only arithmetic, clamp and min/max reductions are used: on the CPU ``torch.where``, ``remainder`` and ``max`` with
indices are an order of magnitude slower than plain arithmetic in the kernels we measured.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import functools

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


def _step(difference: torch.Tensor) -> torch.Tensor:
    """1.0 where ``difference >= 0``, else 0.0 (for |difference| < 1e-30 a weight in between). Comparisons and
    bool-to-float casts are several times slower than this multiply-add-clamp on the CPU."""
    return (difference * 1e30).add_(1.0).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of [n, 3, H, W] (values in [0, 1]) by ``shift`` turns per crop; V and S are unchanged.

    Hue is measured in sextants (0..6): the max channel picks the sextant, the other two its position. Output
    channel c is ``min + chroma * clamp(|((h + off_c) mod 6) - 2| - 1, 0, 1)`` with offsets 5, 3, 1 for R, G, B.
    ``shift`` must lie in [-0.1, 0.1] turns (the recipe's hue jitter range).
    """
    red, green, blue = x[:, 0], x[:, 1], x[:, 2]
    max_c, min_c = x.amax(dim=1), x.amin(dim=1)
    chroma = max_c - min_c
    d_rg, d_gb, d_br = red - green, green - blue, blue - red
    # Weights of "red / green / blue is the max channel" (ties: red, then green, as torchvision). Where channels
    # tie, the neighbouring sextant formulas give the same hue, so the exact tie weight does not matter.
    r_ge_g, g_ge_b, r_ge_b = _step(d_rg), _step(d_gb), _step(d_br.neg())
    is_red = r_ge_g.mul_(r_ge_b)
    is_blue = (1 - r_ge_b).mul_(g_ge_b.neg_().add_(1))
    is_green = (1 - is_red).sub_(is_blue)
    hue = d_gb.mul_(is_red).addcmul_(d_br, is_green).addcmul_(d_rg, is_blue)
    hue.div_(chroma.clamp_min(1e-12))  # a grey pixel has chroma 0: any hue reconstructs it
    hue.add_(is_green, alpha=2.0).add_(is_blue, alpha=4.0).add_((6 * shift).reshape(-1, 1, 1))
    k = hue.unsqueeze(1) + _hue_offsets(x)  # in [-0.6, 10.6]: hue in [-1, 5] plus a shift of at most 0.6 sextant
    # The profile clamp(|k - 2| - 1, 0, 1) repeats every 6 sextants and is 1 from 2 sextants away on, so over
    # [-0.6, 10.6] it is the sum of the profiles centred at 2 and 8, minus 1 (no mod: floor and remainder are slow
    # on the CPU). clamp(|d| - 1, 0, 1) = clamp(|d|, 1, 2) - 1, and the -3 folds into the offset.
    profile = (k - 2).abs_().clamp_(1.0, 2.0).add_(k.sub_(8).abs_().clamp_(1.0, 2.0))
    return profile.mul_(chroma.unsqueeze(1)).add_((min_c - 3 * chroma).unsqueeze(1))


@functools.cache
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).reshape(1, len(values), 1, 1)


def _hue_offsets(x: torch.Tensor) -> torch.Tensor:
    return _constant((5.0, 3.0, 1.0), x.dtype, x.device)


_JITTER_OPS = (_brightness, _contrast, _saturation, adjust_hue)


def blur_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """Normalised 9-tap Gaussian kernels [n, 9] for the sigmas [n] (torchvision's kernel definition)."""
    half = BLUR_KERNEL_SIZE // 2
    taps = torch.arange(-half, half + 1, dtype=torch.float32, device=sigma.device)
    kernel = torch.exp(-0.5 * (taps / sigma.float().unsqueeze(1)) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


def _blur_pass(padded: torch.Tensor, kernel: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """One separable pass along ``dim``; the kernel is symmetric, so tap k and tap 8-k share a multiply."""
    half = BLUR_KERNEL_SIZE // 2
    if kernel.dim() == 1:  # one crop: python-float weights take the fast scalar kernels
        weights = kernel.tolist()
        out = padded.narrow(dim, half, length) * weights[half]
        for k in range(half):
            if weights[k] < NEGLIGIBLE_TAP * weights[half]:
                continue  # small sigma: the outer taps change no float32 value
            out.add_(padded.narrow(dim, k, length), alpha=weights[k])
            out.add_(padded.narrow(dim, 2 * half - k, length), alpha=weights[k])
        return out
    out = padded.narrow(dim, half, length) * _column(kernel[:, half])
    for k in range(half):
        pair = padded.narrow(dim, k, length) + padded.narrow(dim, 2 * half - k, length)
        out.addcmul_(pair, _column(kernel[:, k]))
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur [n, 3, H, W] with a 9-tap Gaussian of per-crop ``sigma`` [n] (reflect padding, separable).

    On the CPU ``x`` is blurred in place and returned; elsewhere a new tensor is returned.
    """
    half = BLUR_KERNEL_SIZE // 2
    height, width = x.shape[-2:]
    kernels = blur_kernels(sigma)
    if x.device.type == "cpu":  # per-crop scalar weights: about 3x faster than broadcast multiplies on the CPU
        for i in range(x.shape[0]):
            x[i : i + 1] = _blur_one(x[i : i + 1], kernels[i])
        return x
    rows = _blur_pass(F.pad(x, (half, half, 0, 0), mode="reflect"), kernels, 3, width)
    return _blur_pass(F.pad(rows, (0, 0, half, half), mode="reflect"), kernels, 2, height)


def _blur_one(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    half = BLUR_KERNEL_SIZE // 2
    height, width = x.shape[-2:]
    rows = _blur_pass(F.pad(x, (half, half, 0, 0), mode="reflect"), kernel, 3, width)
    return _blur_pass(F.pad(rows, (0, 0, half, half), mode="reflect"), kernel, 2, height)


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


def apply_colour_ops(x: torch.Tensor, params: ColourParams) -> torch.Tensor:
    """Colour jitter (random order per crop), grayscale, blur and solarize of [N, 3, H, W] floats in [0, 1]."""
    if x.shape[0] != len(params):
        raise ValueError(f"colour params for {len(params)} crops, got {x.shape[0]} crops")
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
