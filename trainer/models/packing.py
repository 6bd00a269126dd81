"""Token packing: crops of several sizes travel through the transformer as ONE flat token tensor.

A packed batch is a ``[T, D]`` tensor holding every token of every crop back to back, plus a :class:`TokenLayout`
saying how it splits: group ``i`` is ``batch_sizes[i]`` crops of ``seq_lens[i]`` tokens each, stored crop after crop.
Row-wise layers (LayerNorm, the qkv/proj/FFN linears, LayerScale) run once over all ``T`` rows. Against one forward
per crop size this halves the kernel launches and, under FSDP2, the per-block parameter all-gathers (the reason the
reference packs); on CPU the two cost about the same (``bench/attention.py``). Attention is the only layer that must
see crop boundaries: it is block diagonal, each crop attending only to its own tokens.

The layout holds Python ints only (its derived values are recomputed, not cached, so ``dataclasses.replace`` as
done by FSDP2's input casting reproduces it exactly); it passes through activation checkpointing and becomes
constant guards under ``torch.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

__all__ = ["TokenLayout", "sample_kept_rows"]


@dataclass(frozen=True)
class TokenLayout:
    """How a flat ``[T, D]`` token tensor splits into groups of equally long crops (see the module docstring)."""

    batch_sizes: tuple[int, ...]
    """Crops per group."""
    seq_lens: tuple[int, ...]
    """Tokens per crop of each group (CLS + registers + patches)."""

    def __post_init__(self) -> None:
        assert len(self.batch_sizes) == len(self.seq_lens), "one batch size per sequence length"
        assert all(b >= 0 for b in self.batch_sizes) and all(n > 0 for n in self.seq_lens)

    @classmethod
    def single(cls, batch_size: int, seq_len: int) -> TokenLayout:
        """The layout of an ordinary ``[B, N, D]`` batch flattened to ``[B*N, D]``."""
        return cls((batch_size,), (seq_len,))

    @property
    def num_tokens(self) -> int:
        return sum(b * n for b, n in zip(self.batch_sizes, self.seq_lens))

    @property
    def offsets(self) -> tuple[int, ...]:
        """First row of each group in the flat tensor."""
        starts, row = [], 0
        for b, n in zip(self.batch_sizes, self.seq_lens):
            starts.append(row)
            row += b * n
        return tuple(starts)

    @property
    def attention_groups(self) -> tuple[tuple[int, int, int], ...]:
        """``(first_row, num_crops, seq_len)`` of each run of consecutive groups with equal sequence length.

        Adjacent groups of the same length are contiguous in the flat tensor, so they form one regular
        ``[b, n, D]`` batch for attention; empty groups are skipped.
        """
        merged: list[list[int]] = []
        for start, b, n in zip(self.offsets, self.batch_sizes, self.seq_lens):
            if b == 0:
                continue
            if merged and merged[-1][2] == n:
                merged[-1][1] += b
            else:
                merged.append([start, b, n])
        return tuple((start, b, n) for start, b, n in merged)

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Views ``[B_i, N_i, ...]`` of a flat ``[T, ...]`` tensor, one per group (no copy)."""
        assert tokens.shape[0] == self.num_tokens, f"{tokens.shape[0]} rows for a layout of {self.num_tokens}"
        return [
            tokens[start : start + b * n].view(b, n, *tokens.shape[1:])
            for start, b, n in zip(self.offsets, self.batch_sizes, self.seq_lens)
        ]

    def crop_seq_lens(self) -> list[int]:
        """The sequence length of every crop in order (what xformers' block-diagonal mask is built from)."""
        return [n for b, n in zip(self.batch_sizes, self.seq_lens) for _ in range(b)]


def sample_kept_rows(
    layout: TokenLayout, keep_ratio: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
    """Draw the crops a residual branch runs on under efficient stochastic depth.

    In each group of ``B`` crops, ``max(int(B * keep_ratio), 1)`` crops are kept uniformly without replacement
    (the reference's ``int(b * (1 - drop_rate))``, floored at one so a branch never runs on nothing).

    Returns ``(rows, row_scale, kept_layout)``: the flat row indices of the kept crops' tokens (sorted within a group
    for memory locality), the per-row factor ``B / kept`` that makes the expected residual update unbiased, and the
    layout of the gathered subset.
    """
    rows, scales, kept_sizes = [], [], []
    for start, b, n in zip(layout.offsets, layout.batch_sizes, layout.seq_lens):
        kept = max(int(b * keep_ratio), 1) if b else 0
        crops = torch.randperm(b, device=device)[:kept].sort().values
        token = torch.arange(n, device=device)
        rows.append((start + crops[:, None] * n + token).flatten())
        scales.append(torch.full((kept * n,), b / max(kept, 1), device=device))
        kept_sizes.append(kept)
    kept_layout = TokenLayout(tuple(kept_sizes), layout.seq_lens)
    return torch.cat(rows), torch.cat(scales), kept_layout
