"""Teacher-target centering: softmax with an EMA center (DINO, iBOT) and Sinkhorn-Knopp (SwAV, used by DINOv2).

References: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO, 2021) for the centered
softmax; Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments" (SwAV, 2020) and
Oquab et al., "DINOv2" (2023, section 4) for Sinkhorn-Knopp centering.

Both need statistics of the whole global batch. They reach the other ranks only through
:mod:`trainer.distributed`, whose helpers are the identity without a process group, so one process and N ranks run
the same code. Every rank must call these functions in the same order (they contain collectives), also a rank with
zero rows (possible for iBOT's masked patches).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.distributed import all_reduce_sum, get_rank, get_world_size

__all__ = ["SoftmaxCenter", "sinkhorn_knopp"]


class SoftmaxCenter(nn.Module):
    """Centered, sharpened softmax of teacher logits: ``softmax((z - c) / tau)`` with ``c`` an EMA of batch means.

    The center lives in the buffer ``center`` ``[1, K]`` (float32, part of the state dict, so it is checkpointed).
    Per step call :meth:`probs` first (it uses the center of the previous steps, as the reference does), then
    :meth:`update` with the same logits.

    Args:
        out_dim: number of prototypes K.
        momentum: EMA momentum; ``c <- momentum * c + (1 - momentum) * batch_mean`` (0.9 in the recipe).
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim <= 0:
            raise ValueError(f"SoftmaxCenter out_dim: invalid value {out_dim!r}; allowed: a positive integer")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"SoftmaxCenter momentum: invalid value {momentum!r}; allowed: 0 <= momentum <= 1")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"out_dim={self.center.shape[-1]}, momentum={self.momentum}"

    @torch.no_grad()
    def probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher distributions ``softmax((z - c) / teacher_temp)`` in float32, same leading shape as the input."""
        return torch.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the mean teacher logit over the global batch (all rows of all ranks; row counts may differ).

        The per-rank sum and row count travel in one all-reduce, so the mean is exact even when ranks hold different
        numbers of rows (iBOT masked patches). With no rows anywhere the center is left unchanged.
        """
        rows = teacher_logits.detach().float().reshape(-1, self.center.shape[-1])
        # [sum over rows (K values), row count] in one message: one collective instead of two.
        packed = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
        all_reduce_sum(packed)
        total, count = packed[:-1], packed[-1]
        batch_mean = total / count.clamp_min(1.0)
        # count == 0 (no rows on any rank): keep the old center instead of decaying it towards zero.
        weight = torch.where(count > 0, 1.0 - self.momentum, 0.0)
        self.center.lerp_(batch_mean.unsqueeze(0), weight)


def _global_max(values: torch.Tensor) -> torch.Tensor:
    """Max of ``values`` over all ranks, through ``all_reduce_sum`` only (an all-gather of one scalar per rank).

    The scalar of rank r goes into slot r of a zero vector; summing the vectors gathers every rank's scalar.
    A rank with no values contributes -inf.
    """
    local = values.max() if values.numel() else values.new_tensor(float("-inf"))
    slots = values.new_zeros(get_world_size())
    slots[get_rank()] = local
    return all_reduce_sum(slots).max()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, num_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets: an equipartition of the global batch over the K prototypes.

    The recipe, with Q = exp(z / tau) seen as a [K, B] matrix (prototypes x samples of the GLOBAL batch): divide Q by
    its total, then ``num_iterations`` times {divide each prototype row by its sum and by K; divide each sample column
    by its sum and by B}; finally multiply by B. Each returned row (sample) sums to 1; each prototype receives about
    B / K of the total mass. Prototype sums are all-reduced across ranks; sample sums are local.

    Every scalar factor of the recipe (1 / total, 1 / K, 1 / B, x B) cancels in the row or column normalisation that
    follows it, so none is applied: the result is the recipe's exactly in exact arithmetic, with two passes over the
    [N, K] matrix per iteration instead of four (plus three fewer in total). That matrix is up to [masked patches x
    131,072] and its passes bound the training step at ViT-S (``bench/sinkhorn.py``; README, GPU table). No global
    count of samples is needed, so iBOT's masked-patch count is not all-reduced.

    For stability the logits are shifted by their global maximum before ``exp`` (computed in float32); a constant
    factor on Q cancels too. Prototype or sample sums that underflow to zero are floored at the smallest normal float
    instead of producing NaN.

    Args:
        teacher_logits: ``[N, K]`` logits of this rank's N samples (N may be 0 on some ranks).
        teacher_temp: teacher temperature tau.
        num_iterations: Sinkhorn iterations (3 in the recipe).

    Returns:
        ``[N, K]`` float32 targets, each row a probability distribution.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp teacher_logits: expected [N, K], got shape {tuple(teacher_logits.shape)}")
    if num_iterations < 1:
        raise ValueError(f"sinkhorn_knopp num_iterations: invalid value {num_iterations!r}; allowed: >= 1")
    scaled = teacher_logits.float() / teacher_temp
    # [N, K] layout throughout: "prototype rows" of the recipe are dim 0 sums here, "sample columns" dim 1 sums.
    q = scaled.sub_(_global_max(scaled)).exp_()
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(num_iterations):
        q.div_(all_reduce_sum(q.sum(dim=0, keepdim=True)).clamp_min_(tiny))
        q.div_(q.sum(dim=1, keepdim=True).clamp_min_(tiny))
    return q
