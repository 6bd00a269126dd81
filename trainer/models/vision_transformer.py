"""The DINOv2 vision transformer, parameter for parameter the released backbone.

Tokens are ``[CLS, registers, patches]``. The learned position embedding is sized for ``img_size`` (plus one CLS
entry) and bicubic-interpolated to other grids; registers get no position embedding; a learned mask token replaces
masked patch embeddings before the position embedding is added. Pre-norm blocks, LayerNorm eps 1e-6, LayerScale on
both branches, one final LayerNorm shared by all outputs.

Every forward is a packed forward (:mod:`trainer.models.packing`): ``forward_features_list`` runs crops of several
sizes through the blocks as one token tensor with block-diagonal attention, and the single-batch methods are the
one-group case of it. The model holds no device or distributed logic: build it on the meta device, shard it, then
``to_empty()`` + :meth:`DinoVisionTransformer.init_weights`, as torchtitan does. Under FSDP2 the root's hooks wrap
only ``forward``: register the other entry points with ``register_fsdp_forward_method(backbone, name)`` for
``forward_features``, ``forward_features_list`` and ``get_intermediate_layers``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import ARCHS, ConfigError, ModelConfig
from trainer.models.attention import ATTENTION_BACKENDS
from trainer.models.block import DROP_PATH_MODES, Block
from trainer.models.layers import PatchEmbed
from trainer.models.packing import TokenLayout

__all__ = ["DinoVisionTransformer", "interpolate_pos_embed", "validate_model_config"]

logger = logging.getLogger(__name__)

# Released-init standard deviations (the reference's timm-style init). The truncation bounds are +-2 in absolute
# value, as in timm's trunc_normal_ default, which at std 0.02 is 100 sigma: effectively a plain normal.
_WEIGHT_STD = 0.02
_TOKEN_STD = 1e-6


def interpolate_pos_embed(
    pos_embed: torch.Tensor, grid_hw: tuple[int, int], *, antialias: bool, offset: float
) -> torch.Tensor:
    """Bicubic-resize a ``[1, 1 + M*M, D]`` position embedding (CLS entry first) to a ``grid_h x grid_w`` grid.

    ``offset > 0`` passes the scale factor ``(grid + offset) / M`` to the resampler, as the original DINOv2 releases
    did (offset 0.1, no antialias); ``offset == 0`` passes the output size (the ``_reg4`` releases, with antialias).
    The two sample the source grid at slightly different positions, so outputs match a release only with its
    setting. Computed in float32; returned in the input dtype.
    """
    num_patches = pos_embed.shape[1] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"position embedding of {num_patches} patch entries is not a square grid")
    grid_h, grid_w = grid_hw
    if (grid_h, grid_w) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    patch_pos = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        resize: dict[str, Any] = {"scale_factor": ((grid_h + offset) / side, (grid_w + offset) / side)}
    else:
        resize = {"size": (grid_h, grid_w)}
    patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=antialias, **resize)
    assert patch_pos.shape[-2:] == (grid_h, grid_w), f"resampled to {tuple(patch_pos.shape[-2:])}"
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat([pos_embed[:, :1].float(), patch_pos], dim=1).to(pos_embed.dtype)


def validate_model_config(config: ModelConfig) -> None:
    """Raise :class:`ConfigError` naming the first ``model.*`` field that cannot build a backbone."""
    if config.arch not in ARCHS:
        raise ConfigError("model.arch", config.arch, "one of " + ", ".join(ARCHS))
    dim, depth, heads, ffn = config.resolved()
    checks = [
        ("embed_dim", dim, dim > 0, "a positive integer"),
        ("depth", depth, depth > 0, "a positive integer"),
        ("num_heads", heads, heads > 0 and dim % heads == 0, f"a positive divisor of embed_dim {dim}"),
        ("ffn", ffn, ffn in ("mlp", "swiglu"), "mlp or swiglu"),
        ("patch_size", config.patch_size, config.patch_size > 0, "a positive integer"),
        ("num_register_tokens", config.num_register_tokens, config.num_register_tokens >= 0, ">= 0"),
        ("drop_path_rate", config.drop_path_rate, 0.0 <= config.drop_path_rate < 1.0, "0 <= rate < 1"),
        ("drop_path_mode", config.drop_path_mode, config.drop_path_mode in DROP_PATH_MODES, str(DROP_PATH_MODES)),
        ("interpolate_offset", config.interpolate_offset, config.interpolate_offset >= 0, ">= 0"),
        ("attention_backend", config.attention_backend, config.attention_backend in ATTENTION_BACKENDS,
         "one of " + ", ".join(ATTENTION_BACKENDS)),
    ]
    for name, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"model.{name}", value, allowed)
    if config.img_size <= 0 or config.img_size % config.patch_size:
        allowed = f"a positive multiple of model.patch_size ({config.patch_size})"
        raise ConfigError("model.img_size", config.img_size, allowed)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT backbone whose ``state_dict`` keys and shapes are those of the released checkpoints.

    Args:
        config: the ``model`` section of the training config (preset plus explicit overrides).

    Attributes: ``embed_dim``, ``num_heads``, ``patch_size``, ``num_register_tokens``, ``n_blocks``, ``config``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        validate_model_config(config)
        dim, depth, heads, ffn = config.resolved()
        self.config = config
        self.embed_dim = self.num_features = dim
        self.num_heads = heads
        self.patch_size = config.patch_size
        self.num_register_tokens = config.num_register_tokens
        self.n_blocks = depth
        grid = config.img_size // config.patch_size
        # Registration order = state_dict order of the releases: tokens first, then patch_embed, blocks, norm.
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + grid * grid, dim))
        num_registers = config.num_register_tokens
        self.register_tokens = nn.Parameter(torch.empty(1, num_registers, dim)) if num_registers else None
        self.mask_token = nn.Parameter(torch.empty(1, dim))
        self.patch_embed = PatchEmbed(patch_size=config.patch_size, embed_dim=dim)
        self.blocks = nn.ModuleList(
            Block(
                dim=dim,
                num_heads=heads,
                ffn=ffn,
                layerscale_init=config.layerscale_init,
                drop_path_rate=config.drop_path_rate,  # uniform over depth, as in the reference
                drop_path_mode=config.drop_path_mode,
                attention_backend=config.attention_backend,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter: the released-model init, also after ``to_empty()`` from meta.

        trunc-normal(0.02) Linear weights and position embedding, zero biases, normal(1e-6) CLS and registers,
        zero mask token, LayerNorm (1, 0), LayerScale gamma = ``layerscale_init``, PyTorch's default Conv2d init for
        the patch embedding (the reference does not re-initialise it).
        """
        nn.init.trunc_normal_(self.pos_embed, std=_WEIGHT_STD, a=-2.0, b=2.0)
        nn.init.normal_(self.cls_token, std=_TOKEN_STD)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=_TOKEN_STD)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.proj.reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=_WEIGHT_STD, a=-2.0, b=2.0)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            block.reset_parameters()
        self.norm.reset_parameters()

    @property
    def grid_size(self) -> int:
        """Side of the patch grid the stored position embedding is sized for."""
        return math.isqrt(self.pos_embed.shape[1] - 1)

    def interpolated_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding ``[1, 1 + grid_h*grid_w, D]`` for a crop of that patch grid (model's settings)."""
        return interpolate_pos_embed(
            self.pos_embed,
            (grid_h, grid_w),
            antialias=self.config.interpolate_antialias,
            offset=self.config.interpolate_offset,
        )

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> input tokens ``[B, 1 + R + N, D]`` (mask token, CLS, position, registers)."""
        batch, _, height, width = x.shape
        tokens = self.patch_embed(x)  # [B, N, D]
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"masks of shape {tuple(masks.shape)} do not match [B, N] = {tuple(tokens.shape[:2])}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        cls = self.cls_token.to(tokens.dtype).expand(batch, -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        pos = self.interpolated_pos_embed(height // self.patch_size, width // self.patch_size)
        tokens = tokens + pos.to(tokens.dtype)
        if self.register_tokens is not None:
            registers = self.register_tokens.to(tokens.dtype).expand(batch, -1, -1)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens

    def forward_features_list(
        self, xs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None] | None = None
    ) -> list[dict[str, torch.Tensor | None]]:
        """ONE packed forward over crop batches of different sizes; equals one :meth:`forward_features` per entry.

        Args:
            xs: image batches ``[B_i, 3, H_i, W_i]`` (e.g. global crops, local crops).
            masks: per entry, a boolean ``[B_i, N_i]`` patch mask or None (default: no masks).

        Returns:
            One :meth:`forward_features` dict per entry.
        """
        masks = [None] * len(xs) if masks is None else list(masks)
        if len(masks) != len(xs):
            raise ValueError(f"{len(xs)} crop batches but {len(masks)} masks; pass one mask (or None) per batch")
        return self._packed_forward(list(xs), masks)

    def _packed_forward(
        self, xs: list[torch.Tensor], masks: list[torch.Tensor | None]
    ) -> list[dict[str, torch.Tensor | None]]:
        # Every public forward method calls this rather than another public method, so that when FSDP2 hooks them
        # (register_fsdp_forward_method) no hooked method runs inside another.
        groups = [self.prepare_tokens(x, m) for x, m in zip(xs, masks)]
        layout = TokenLayout(tuple(g.shape[0] for g in groups), tuple(g.shape[1] for g in groups))
        tokens = torch.cat([g.flatten(0, 1) for g in groups]) if len(groups) > 1 else groups[0].flatten(0, 1)
        for block in self.blocks:
            tokens = block(tokens, layout)
        normed = self.norm(tokens)
        return [
            self._output_dict(prenorm, out, m)
            for prenorm, out, m in zip(layout.split(tokens), layout.split(normed), masks)
        ]

    def _output_dict(
        self, prenorm: torch.Tensor, normed: torch.Tensor, masks: torch.Tensor | None
    ) -> dict[str, torch.Tensor | None]:
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:first_patch],
            "x_norm_patchtokens": normed[:, first_patch:],
            "x_prenorm": prenorm,
            "masks": masks,
        }

    def forward_features(
        self, x: torch.Tensor, masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        """Features of one batch ``[B, 3, H, W]``: normalised CLS ``[B, D]``, registers ``[B, R, D]``, patches
        ``[B, N, D]``, the pre-norm tokens ``x_prenorm [B, 1+R+N, D]`` and the ``masks`` passed in."""
        return self._packed_forward([x], [masks])[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised CLS token ``[B, D]`` (the embedding used for k-NN / linear evaluation)."""
        return self._packed_forward([x], [None])[0]["x_norm_clstoken"]

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[Any, ...]:
        """Outputs of the last ``n`` blocks (``n`` an int) or of the blocks with indices ``n`` (a sequence).

        Each output is the patch tokens ``[B, N, D]`` (``[B, D, h, w]`` with ``reshape``), passed through the final
        norm when ``norm``; with ``return_class_token`` each is a ``(patch_tokens, cls_token [B, D])`` pair.
        """
        indices = range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else list(n)
        if not indices or not all(0 <= i < self.n_blocks for i in indices):
            allowed = f"between 1 and {self.n_blocks} blocks, or block indices in [0, {self.n_blocks})"
            raise ValueError(f"n={n!r}: choose {allowed}")
        batch, _, height, width = x.shape
        tokens = self.prepare_tokens(x)
        layout = TokenLayout.single(batch, tokens.shape[1])
        tokens = tokens.flatten(0, 1)
        collected: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks[: max(indices) + 1]):
            tokens = block(tokens, layout)
            if index in indices:
                collected[index] = (self.norm(tokens) if norm else tokens).view(batch, -1, self.embed_dim)
        outputs = []
        for index in indices:
            out = collected[index]
            patches = out[:, 1 + self.num_register_tokens :]
            if reshape:
                grid = (height // self.patch_size, width // self.patch_size)
                patches = patches.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous()
            outputs.append((patches, out[:, 0]) if return_class_token else patches)
        return tuple(outputs)
