"""KoLeo regulariser: spreads the batch's features uniformly over the sphere.

Reference: Sablayrolles et al., "Spreading vectors for similarity search" (ICLR 2019), the Kozachenko-Leonenko
differential entropy estimator, as used by Oquab et al., "DINOv2" (2023, section 4) on the student's CLS tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["koleo_loss"]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-mean_i log(||x_i - x_nn(i)|| + eps)`` on L2-normalised rows, nearest neighbour by dot product (not self).

    The recipe applies it per rank to each global crop's CLS tokens separately (a ``[B, D]`` chunk each).

    Args:
        x: ``[B, D]`` features (the student backbone's CLS tokens, before the head); computed in float32.
        eps: added to the distance so that duplicate rows give a large finite loss instead of ``-log 0``.

    Raises:
        ValueError: B < 2, where no nearest neighbour exists.
    """
    if x.ndim != 2:
        raise ValueError(f"koleo_loss: expected x of shape [B, D], got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(
            f"KoLeo needs at least 2 samples per rank per global crop to find a nearest neighbour, got {x.shape[0]}; "
            "set loss.koleo_loss_weight=0 or raise optim.global_batch_size (per-rank batch = global batch / world size)"
        )
    x = F.normalize(x.float(), p=2.0, dim=-1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.T
        # Below any cosine similarity (>= -1): a row never picks itself.
        similarity.fill_diagonal_(-2.0)
        neighbour = similarity.argmax(dim=1)
    distance = torch.linalg.vector_norm(x - x[neighbour], ord=2, dim=-1)
    return -torch.log(distance + eps).mean()
