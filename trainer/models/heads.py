"""The DINO / iBOT projection head: an MLP, L2 normalisation and a weight-normalised prototype layer.

The prototype layer keeps weight normalisation as two plain parameters, ``last_layer.weight_g [K, 1]`` (the norm,
initialised to 1 and trainable) and ``last_layer.weight_v [K, bottleneck]`` (the direction), and computes
``W = g * v / ||v||`` in every forward. Plain parameters shard under FSDP2 ``fully_shard`` like any other (each rank
holds whole rows, and the full tensors exist during forward), need no deprecated ``nn.utils.weight_norm`` hook, and
keep the reference training checkpoints' key names.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free ``Linear(in_dim, out_dim)`` with weight ``g * v / ||v||`` (row norms), ``g`` initialised to 1."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.empty(out_dim, 1))
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # v gets nn.Linear's default init, as in the reference (only the direction matters); the norm starts at 1.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        nn.init.ones_(self.weight_g)

    def weight(self) -> torch.Tensor:
        """The effective ``[out_dim, in_dim]`` weight; the row norm is taken in float32 for bf16 parameters."""
        norms = torch.linalg.vector_norm(self.weight_v.float(), dim=1, keepdim=True)
        return self.weight_v * (self.weight_g.float() / norms).to(self.weight_v.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """MLP (``num_layers`` Linear layers, GELU between) -> L2-normalise -> weight-normalised prototypes.

    With the default 3 layers: Linear(in, hidden) - GELU - Linear(hidden, hidden) - GELU - Linear(hidden, bottleneck),
    then ``last_layer`` = prototypes Linear(bottleneck, out_dim, bias=False). The optimiser freezes ``last_layer``
    for the first iterations by its name.

    Args:
        in_dim: backbone width D.
        out_dim: number of prototypes K.
        hidden_dim: MLP hidden width.
        bottleneck_dim: width before the prototypes.
        num_layers: Linear layers of the MLP (>= 1; 1 is a single Linear(in, bottleneck)).
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"heads.num_layers: invalid value {num_layers!r}; allowed: an integer >= 1")
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            if index:
                layers.append(nn.GELU())
            layers.append(nn.Linear(fan_in, fan_out))
        self.mlp = nn.Sequential(*layers)  # keys mlp.0, mlp.2, mlp.4 as in the reference
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """trunc-normal(0.02) MLP weights, zero biases, prototypes as :class:`WeightNormLinear` (meta-safe)."""
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(module.bias)
        self.last_layer.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[..., in_dim]`` -> prototype logits ``[..., out_dim]``."""
        x = self.mlp(x)
        # fp16 cannot represent 1e-12; the reference uses 1e-6 there
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)
