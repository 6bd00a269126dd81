"""Stand-ins that let the reference's own training code (``dinov2.train``) import and run on a CPU (tests and bench).

The reference (facebookresearch/dinov2 0.0.1.dev2) refuses to train without xformers, and its ``train`` package imports
fvcore and omegaconf at module level. None of them is a dependency of this project. :func:`modules` returns what
``bench.reference_dinov2.reference_training_code`` puts into ``sys.modules`` for the names that are missing:

* ``xformers.ops``: the five names the reference's training path calls, in PyTorch. ``fmha.BlockDiagonalMask`` (a
  block-diagonal mask over sequences concatenated into one, with ``from_seqlens``, ``from_tensor_list`` and ``split``),
  ``memory_efficient_attention`` (``[B, M, H, K]`` layout, through ``F.scaled_dot_product_attention``; with a
  block-diagonal mask each block attends only to itself, computed block by block with equal-length blocks batched,
  which is what the mask means without computing the scores it masks out), ``unbind``, ``scaled_index_add`` and
  ``index_select_cat`` (and ``fmha.MemoryEfficientAttentionFlashAttentionOp``, a kernel choice it passes back to
  ``memory_efficient_attention``). Nothing else: the reference falls back to PyTorch for ``SwiGLU`` and
  ``cross_entropy`` when those are missing, exactly as on a machine without xformers.
* ``fvcore.common.checkpoint`` and ``omegaconf``: only what importing ``dinov2.train`` touches (the checkpointer base
  classes, ``OmegaConf.load`` of the reference's default config into an attribute dict). Their real behaviour is
  never needed: the tests build the config themselves and checkpoint nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import yaml

__all__ = [
    "AttrDict", "BlockDiagonalMask", "index_select_cat", "memory_efficient_attention", "modules", "scaled_index_add",
    "unbind",
]


# ---- xformers.ops ---------------------------------------------------------------------------------------------------


class BlockDiagonalMask:
    """Sequences of ``seqlens`` tokens concatenated along dim 1 of a batch-1 tensor; each attends only to itself.

    ``_batch_sizes`` (set by ``from_tensor_list``, or by the reference itself after ``from_seqlens``) groups the
    sequences into the tensors they came from, for :meth:`split`.
    """

    def __init__(self, seqlens: Sequence[int]) -> None:
        self.seqlens = [int(n) for n in seqlens]
        self._batch_sizes: list[int] | None = None

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int]) -> "BlockDiagonalMask":
        return cls(q_seqlen)

    @classmethod
    def from_tensor_list(cls, tensors: Sequence[torch.Tensor]) -> tuple["BlockDiagonalMask", torch.Tensor]:
        """``[B_i, N_i, ...]`` tensors -> (mask over B_i sequences of N_i tokens each, ``[1, sum B_i N_i, ...]``)."""
        mask = cls([x.shape[1] for x in tensors for _ in range(x.shape[0])])
        mask._batch_sizes = [x.shape[0] for x in tensors]
        return mask, torch.cat([x.reshape(1, -1, *x.shape[2:]) for x in tensors], dim=1)

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`from_tensor_list`: ``[1, sum B_i N_i, ...]`` -> ``[B_i, N_i, ...]`` per source tensor."""
        assert self._batch_sizes is not None and tensor.shape[0] == 1 and tensor.shape[1] == sum(self.seqlens)
        chunks, start = [], 0
        for batch_size in self._batch_sizes:
            chunks.append(sum(self.seqlens[start:start + batch_size]))
            start += batch_size
        parts = tensor.split(chunks, dim=1)
        return [part.reshape(b, -1, *tensor.shape[2:]) for b, part in zip(self._batch_sizes, parts)]

    def runs(self) -> list[tuple[int, int]]:
        """Consecutive sequences of equal length as ``(count, length)`` runs."""
        out: list[tuple[int, int]] = []
        for n in self.seqlens:
            if out and out[-1][1] == n:
                out[-1] = (out[-1][0] + 1, n)
            else:
                out.append((1, n))
        return out

    def materialize(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense ``bool [T, T]`` mask (True: may attend), for checking the block-wise attention against it."""
        ids = torch.repeat_interleave(torch.arange(len(self.seqlens)), torch.tensor(self.seqlens)).to(device)
        return ids[:, None] == ids[None, :]


def memory_efficient_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: BlockDiagonalMask | None = None,
    p: float = 0.0, scale: float | None = None, op: Any = None,
) -> torch.Tensor:
    """Softmax attention on ``[B, M, H, K]`` inputs (xformers' layout), optionally block-diagonal. ``op`` picks one
    of xformers' kernels (the reference asks for its flash kernel with a mask); there is one implementation here."""
    if p:
        raise NotImplementedError("attention dropout: the reference's training path never uses it")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, M, K]
    if attn_bias is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)
    if not isinstance(attn_bias, BlockDiagonalMask) or query.shape[0] != 1:
        raise NotImplementedError(f"attn_bias {type(attn_bias).__name__} with batch {query.shape[0]}")
    outputs, start = [], 0
    for count, length in attn_bias.runs():  # [1, H, count*length, K] -> [count, H, length, K]: one SDPA per run
        end = start + count * length
        blocks = [t[:, :, start:end].unflatten(2, (count, length)).squeeze(0).transpose(0, 1) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*blocks, scale=scale)
        outputs.append(out.transpose(0, 1).flatten(1, 2).unsqueeze(0))
        start = end
    return torch.cat(outputs, dim=2).transpose(1, 2)


def unbind(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    return x.unbind(dim)


def scaled_index_add(
    input: torch.Tensor, index: torch.Tensor, source: torch.Tensor, scaling: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """``input`` with ``alpha * scaling * source[i]`` added to row ``index[i]`` (xformers adds in place; the
    reference only uses the result)."""
    return torch.index_add(input, 0, index, source if scaling is None else source * scaling, alpha=alpha)


def index_select_cat(sources: Sequence[torch.Tensor], indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``cat([source[index].flatten() ...])``: the selected rows of every source, flattened into one vector."""
    return torch.cat([source[index].flatten() for source, index in zip(sources, indices)])


# ---- import-time only: fvcore.common.checkpoint, omegaconf ----------------------------------------------------------


class AttrDict(dict):
    """A dict whose keys are also attributes (``cfg.optim.lr`` and ``cfg.optim["lr"]``), nested, as OmegaConf's."""

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        super().__init__({k: AttrDict(v) if isinstance(v, dict) else v for k, v in (values or {}).items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __deepcopy__(self, memo: dict) -> "AttrDict":
        return AttrDict({k: copy.deepcopy(v, memo) for k, v in self.items()})


class _OmegaConf:
    @staticmethod
    def load(path: str | Path) -> AttrDict:
        return AttrDict(yaml.safe_load(Path(path).read_text()))

    @staticmethod
    def create(values: dict[str, Any]) -> AttrDict:
        return copy.deepcopy(AttrDict(values))


class _Unavailable:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__}: an import-time stand-in (bench/reference_standins.py)")


def _module(name: str, **attributes: Any) -> ModuleType:
    module = ModuleType(name)
    module.__dict__.update(attributes)
    module.__file__ = __file__  # where to look when one of them turns up in a traceback
    return module


def modules() -> dict[str, dict[str, ModuleType]]:
    """Stand-in modules by the top-level package they replace: ``{"xformers": {"xformers": ..., "xformers.ops":
    ..., "xformers.ops.fmha": ...}, "fvcore": {...}, "omegaconf": {...}}``."""
    fmha = _module(
        "xformers.ops.fmha", BlockDiagonalMask=BlockDiagonalMask,
        MemoryEfficientAttentionFlashAttentionOp="flash",  # only passed back as memory_efficient_attention(op=...)
    )
    ops = _module(
        "xformers.ops", fmha=fmha, memory_efficient_attention=memory_efficient_attention, unbind=unbind,
        scaled_index_add=scaled_index_add, index_select_cat=index_select_cat,
    )
    checkpoint = _module(
        "fvcore.common.checkpoint",
        Checkpointer=type("Checkpointer", (_Unavailable,), {}),
        PeriodicCheckpointer=type("PeriodicCheckpointer", (_Unavailable,), {}),
    )
    common = _module("fvcore.common", checkpoint=checkpoint)
    return {
        "xformers": {"xformers": _module("xformers", ops=ops), "xformers.ops": ops, "xformers.ops.fmha": fmha},
        "fvcore": {"fvcore": _module("fvcore", common=common), "fvcore.common": common,
                   "fvcore.common.checkpoint": checkpoint},
        "omegaconf": {"omegaconf": _module("omegaconf", OmegaConf=_OmegaConf)},
    }
