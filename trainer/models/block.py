"""The pre-norm transformer block with the two stochastic-depth modes of DINOv2 training.

``x = x + ls1(attn(norm1(x)))``; ``x = x + ls2(mlp(norm2(x)))``. During training with drop rate ``d > 0``:

- ``efficient`` (the reference's): each residual branch runs only on ``int(B * (1 - d))`` randomly chosen crops of
  every crop group (a fresh draw per branch), and its output is scattered back with ``index_add`` scaled by
  ``B / kept``. Dropped crops cost nothing, so a block does about ``1 - d`` of its usual work.
- ``classic``: the branch runs on every crop and each crop's branch output is zeroed with probability ``d`` and
  otherwise scaled by ``1 / (1 - d)`` (DropPath).

Both leave the expected residual update unchanged. In eval mode neither drops anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn

from trainer.models.attention import Attention
from trainer.models.layers import LayerScale, Mlp, SwiGLUFFN, swiglu_hidden_dim
from trainer.models.packing import TokenLayout, sample_kept_rows

__all__ = ["Block", "DROP_PATH_MODES"]

DROP_PATH_MODES = ("efficient", "classic")

Branch = Callable[[torch.Tensor, TokenLayout], torch.Tensor]


class Block(nn.Module):
    """One ViT block over packed tokens (or an ordinary ``[B, N, D]`` batch).

    Args:
        dim: token width D.
        num_heads: attention heads.
        ffn: ``mlp`` (4*D hidden, GELU) or ``swiglu`` (hidden :func:`swiglu_hidden_dim`).
        layerscale_init: initial LayerScale gamma of both branches.
        drop_path_rate: stochastic depth rate of both branches (training only).
        drop_path_mode: ``efficient`` or ``classic`` (see the module docstring).
        attention_backend: ``auto``, ``sdpa`` or ``xformers``.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        ffn: Literal["mlp", "swiglu"],
        layerscale_init: float,
        drop_path_rate: float = 0.0,
        drop_path_mode: Literal["efficient", "classic"] = "efficient",
        attention_backend: str = "auto",
    ) -> None:
        super().__init__()
        assert ffn in ("mlp", "swiglu") and drop_path_mode in DROP_PATH_MODES  # validated by the ViT
        self.drop_path_rate = drop_path_rate
        self.drop_path_mode = drop_path_mode
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend=attention_backend)
        self.ls1 = LayerScale(dim, init_value=layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim) if ffn == "mlp" else SwiGLUFFN(dim, swiglu_hidden_dim(dim))
        self.ls2 = LayerScale(dim, init_value=layerscale_init)

    def forward(self, x: torch.Tensor, layout: TokenLayout | None = None) -> torch.Tensor:
        """Packed tokens ``x [T, D]`` with their ``layout``, or a plain batch ``x [B, N, D]`` with ``layout=None``."""
        if layout is None:
            batch, seq_len, dim = x.shape
            flat = self.forward(x.reshape(batch * seq_len, dim), TokenLayout.single(batch, seq_len))
            return flat.view(batch, seq_len, dim)
        x = self._residual(x, layout, self._attention_branch)
        return self._residual(x, layout, self._ffn_branch)

    def _attention_branch(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x), layout))

    def _ffn_branch(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _residual(self, x: torch.Tensor, layout: TokenLayout, branch: Branch) -> torch.Tensor:
        if not self.training or self.drop_path_rate == 0.0:
            return x + branch(x, layout)
        if self.drop_path_mode == "efficient":
            rows, row_scale, kept_layout = sample_kept_rows(layout, 1.0 - self.drop_path_rate, x.device)
            update = branch(x.index_select(0, rows), kept_layout)
            return x.index_add(0, rows, (update * row_scale[:, None].to(update.dtype)).to(x.dtype))
        keep = 1.0 - self.drop_path_rate
        crop_scale = [
            torch.empty(b, device=x.device).bernoulli_(keep).div_(keep).repeat_interleave(n)
            for b, n in zip(layout.batch_sizes, layout.seq_lens)
        ]
        update = branch(x, layout)
        return x + update * torch.cat(crop_scale)[:, None].to(update.dtype)

    def reset_parameters(self) -> None:
        """LayerNorms to (1, 0) and LayerScale to its init value; Linear weights are initialised by the ViT."""
        for module in (self.norm1, self.norm2, self.ls1, self.ls2):
            module.reset_parameters()
