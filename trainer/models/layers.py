"""The small building blocks of the DINOv2 ViT, named as in the released checkpoints.

``patch_embed.proj`` (Conv2d, kernel = stride = patch), ``mlp.fc1``/``mlp.fc2`` (GELU MLP), ``mlp.w12``/``mlp.w3``
(fused SwiGLU) and ``ls1``/``ls2.gamma`` (LayerScale). All of them act row-wise, so they run unchanged on packed
``[T, D]`` tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LayerScale", "Mlp", "PatchEmbed", "SwiGLUFFN", "swiglu_hidden_dim"]


def swiglu_hidden_dim(embed_dim: int) -> int:
    """SwiGLU hidden width: 2/3 of the 4*D MLP (same parameter count), rounded up to a multiple of 8.

    ``round_up(int(4 * D * 2 / 3), 8)``: 4096 for ViT-g (D = 1536), 2736 for ViT-L (D = 1024).
    """
    return (int(4 * embed_dim * 2 / 3) + 7) // 8 * 8


class PatchEmbed(nn.Module):
    """Image ``[B, 3, H, W]`` -> patch tokens ``[B, (H/p)*(W/p), D]`` through a stride-p convolution ``proj``."""

    def __init__(self, *, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                f"crop or resize to multiples of {self.patch_size}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """``fc1`` -> GELU (exact erf form, as trained) -> ``fc2``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """Fused SwiGLU: ``w12`` = Linear(D, 2h) producing gate and value halves, ``w3`` = Linear(h, D)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` on a residual branch, initialised to a small constant."""

    def __init__(self, dim: int, *, init_value: float) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
