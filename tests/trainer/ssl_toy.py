"""A CPU-sized stand-in for the student/teacher ``nn.ModuleDict`` (backbone with ``blocks``, dino_head, ibot_head).

Same structure as the real meta-architecture (so parallelize and checkpoint see what they see in training: a
``blocks`` ModuleList, a position embedding, weight-normalised prototype layers, ``init_weights``), but tiny and
independent of ``trainer.models``.
"""

from __future__ import annotations

import torch
from torch import nn


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class ToyBackbone(nn.Module):
    """[B, N, in_dim] tokens -> [B, dim] mean-pooled features."""

    def __init__(self, *, in_dim: int = 6, dim: int = 16, depth: int = 3, num_tokens: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(in_dim, dim)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, num_tokens, dim))
        # Like the real mask token: a trainable parameter that gets no gradient in these forwards, so AdamW holds
        # no state for it (checkpoints must cope).
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The entry point the training step calls (not ``forward``), as on the real backbone."""
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return {"x_norm_clstoken": self.norm(x).mean(dim=1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["x_norm_clstoken"]


class ToyWeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g * v / ||v||`` per row (the prototype layer's parametrisation)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = nn.Parameter(torch.randn(out_dim, in_dim))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight_v)
        nn.init.ones_(self.weight_g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class ToyHead(nn.Module):
    """MLP -> L2-normalise -> weight-normalised prototypes (the DINOHead shape).

    No ``init_weights`` on purpose: materialisation falls back to each layer's ``reset_parameters``.
    """

    def __init__(self, dim: int = 16, prototypes: int = 12) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 8))
        self.last_layer = ToyWeightNormLinear(8, prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(nn.functional.normalize(self.mlp(x), dim=-1))


def toy_ssl_model(seed: int = 0, **backbone_kwargs: int) -> nn.ModuleDict:
    """Deterministic (``seed``) toy student/teacher."""
    torch.manual_seed(seed)
    return nn.ModuleDict(
        {"backbone": ToyBackbone(**backbone_kwargs), "dino_head": ToyHead(), "ibot_head": ToyHead()}
    )


def toy_loss(model: nn.ModuleDict, tokens: torch.Tensor) -> torch.Tensor:
    """A scalar depending on every parameter (both heads)."""
    features = model["backbone"].forward_features(tokens)["x_norm_clstoken"]
    return model["dino_head"](features).logsumexp(-1).mean() + model["ibot_head"](features).pow(2).mean()
