"""iBOT masked-image-modelling loss on patch tokens.

Reference: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (2022), as used by Oquab et al.,
"DINOv2" (2023, section 4): the student sees the masked global crops, the teacher the unmasked ones, and the
cross-entropy between their patch-token distributions is taken at the masked positions only.
"""

from __future__ import annotations

import torch

__all__ = ["ibot_masked_loss"]


def ibot_masked_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    mask_weights: torch.Tensor,
    num_global_crops_total: int,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """``sum_m w_m H(teacher_m, student_m) / num_global_crops_total`` over the M masked patches.

    ``H(t, s) = -sum_k t_k log softmax(s / student_temp)_k``. With ``w_m = 1 / (masked patches in the crop of m)``
    each masked crop contributes the mean cross-entropy of its masked patches, and unmasked crops count in the
    denominator with zero loss.

    Args:
        student_logits: ``[M, K]`` student logits at the masked patches (the masked global crops, flattened).
        teacher_probs: ``[M, K]`` teacher targets at the same patches.
        mask_weights: ``[M]`` per-patch weights (``mask_weights`` of the batch).
        num_global_crops_total: the number of global crops the masks were drawn over on this rank (2 x the
            per-rank batch), masked or not.
        student_temp: student temperature (0.1).

    Returns:
        A scalar; zero (still connected to the graph) when M = 0.
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_probs.shape:
        raise ValueError(
            "ibot_masked_loss: student_logits and teacher_probs must both be [M, K] with equal shapes, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    if mask_weights.shape != student_logits.shape[:1]:
        raise ValueError(
            f"ibot_masked_loss: mask_weights must be [M] = [{student_logits.shape[0]}], got {tuple(mask_weights.shape)}"
        )
    if num_global_crops_total <= 0:
        raise ValueError(
            f"ibot_masked_loss num_global_crops_total: invalid value {num_global_crops_total!r}; allowed: > 0"
        )
    log_p = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
    # One batched dot per patch (bmm inside einsum): no [M, K] product is materialised.
    cross_entropy = -torch.einsum("mk,mk->m", teacher_probs.float(), log_p)
    return (cross_entropy * mask_weights.float()).sum() / num_global_crops_total
