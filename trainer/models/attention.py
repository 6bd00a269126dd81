"""Multi-head self-attention over packed tokens, with two exact block-diagonal backends.

``sdpa`` (PyTorch ``scaled_dot_product_attention``): the packed tokens are cut into runs of equally long crops
(:attr:`TokenLayout.attention_groups`), each of which is an ordinary ``[b, H, n, hd]`` batch, and SDPA runs once per
run. That is block-diagonal attention by construction, with no mask. The alternative of one SDPA call over the whole
packed sequence with a dense ``[T, T]`` block-diagonal mask costs O(T^2) time and memory in the *total* token count:
an image's 2x224 + 8x98 crops at patch 14 are T = 914 tokens, and the dense form computes 914^2 = 835k scores per
head against 2*257^2 + 8*50^2 = 152k for the grouped form (5.5x at batch 1, 5.5B x at batch B); on GPU a dense mask
also rules out the flash kernels. ``bench/attention.py`` measures both.

``xformers`` (``memory_efficient_attention`` with a ``BlockDiagonalMask``, what the reference uses): one kernel over
the whole packed sequence that skips the off-diagonal blocks. Selected for ``attention_backend: xformers`` or ``auto``
when the tensors are on CUDA and xformers imports; xformers has no CPU kernels, so on CPU the SDPA path runs (the
maths is identical).
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import ConfigError
from trainer.models.packing import TokenLayout

__all__ = ["ATTENTION_BACKENDS", "Attention", "xformers_available"]

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")


@functools.cache
def _xformers_ops() -> ModuleType | None:
    """``xformers.ops`` when it imports, else None (checked once per process)."""
    try:
        import xformers.ops as xops  # noqa: PLC0415 - optional GPU dependency
    except Exception as exc:  # an ImportError, or a broken install raising at import time
        logger.debug("xformers unavailable (%s); attention uses PyTorch SDPA", exc)
        return None
    return xops


def xformers_available() -> bool:
    """Whether ``xformers.ops`` can be imported in this process."""
    return _xformers_ops() is not None


@functools.lru_cache(maxsize=64)
def _block_diagonal_mask(crop_seq_lens: tuple[int, ...]):  # -> xformers.ops.fmha.BlockDiagonalMask
    """xformers' block-diagonal bias for these crop lengths, cached: building it copies offsets to the device."""
    return _xformers_ops().fmha.BlockDiagonalMask.from_seqlens(list(crop_seq_lens))


class Attention(nn.Module):
    """Multi-head self-attention with the released parameter names (``qkv``, ``proj``, biases on both).

    Args:
        dim: token width D.
        num_heads: heads H; D must be divisible by H.
        backend: ``auto``, ``sdpa`` or ``xformers`` (see the module docstring).
    """

    def __init__(self, dim: int, num_heads: int, *, backend: str = "auto") -> None:
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ConfigError("model.attention_backend", backend, "one of " + ", ".join(ATTENTION_BACKENDS))
        if backend == "xformers" and not xformers_available():
            raise ConfigError("model.attention_backend", backend, "auto or sdpa (xformers is not installed)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def _use_xformers(self, x: torch.Tensor) -> bool:
        if self.backend == "sdpa" or not x.is_cuda:
            if self.backend == "xformers" and not x.is_cuda:
                _warn_xformers_cpu_once()
            return False
        return xformers_available()

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Attention over packed tokens ``x [T, D]``; each crop of ``layout`` attends only to itself."""
        qkv = self.qkv(x)  # [T, 3D]; the column order (3, H, hd) is the released checkpoints' layout
        if self._use_xformers(x):
            out = self._xformers(qkv, layout)
        else:
            out = self.grouped_sdpa(qkv, layout)
        return self.proj(out)

    def grouped_sdpa(self, qkv: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The SDPA backend's core: packed ``qkv [T, 3D]`` -> attention output ``[T, D]``, one call per group."""
        dim = self.num_heads * self.head_dim
        outputs = []
        for start, num_crops, seq_len in layout.attention_groups:
            group = qkv[start : start + num_crops * seq_len].view(num_crops, seq_len, 3, self.num_heads, self.head_dim)
            q, k, v = group.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, H, n, hd]
            out = F.scaled_dot_product_attention(q, k, v)
            outputs.append(out.transpose(1, 2).reshape(num_crops * seq_len, dim))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _xformers(self, qkv: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        num_tokens = qkv.shape[0]
        q, k, v = qkv.view(1, num_tokens, 3, self.num_heads, self.head_dim).unbind(2)  # each [1, T, H, hd]
        bias = _block_diagonal_mask(tuple(layout.crop_seq_lens()))
        out = _xformers_ops().memory_efficient_attention(q, k, v, attn_bias=bias)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)


@functools.cache
def _warn_xformers_cpu_once() -> None:
    logger.warning("model.attention_backend=xformers has no CPU kernels; using PyTorch SDPA for CPU tensors")
