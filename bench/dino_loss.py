"""DINO cross-entropy forward + backward: ours (products and sums) vs the same contractions written as ``einsum``.

    python bench/dino_loss.py --batch 64 --prototypes 131072 --locals 8 --repeats 5

``einsum`` turns a contraction to a scalar into a [1 x n] @ [n x 1] matrix product; ours multiplies and sums (the
local views summed first). Same logits and targets, same process, alternating runs. Prints ONE JSON object: median
milliseconds of each (forward + backward), ``speedup``, and the largest difference between the two losses and
between their gradients. ``--device cuda`` runs it on a GPU (synchronised timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._cli import device_label, positive_int, timed  # noqa: E402

from trainer.losses.dino import dino_cross_entropy, num_dino_loss_terms  # noqa: E402


def einsum_cross_entropy(student_global, student_local, teacher_probs, student_temp: float = 0.1):
    """The baseline: the same loss with both contractions as ``einsum``."""
    num_global, batch_size, _ = student_global.shape
    scale = -1.0 / (batch_size * num_dino_loss_terms(num_global, student_local.shape[0]))
    teacher_sum = teacher_probs.sum(dim=0)
    log_p_global = torch.log_softmax(student_global.float() / student_temp, dim=-1)
    loss_global = torch.einsum("gbk,gbk->", teacher_sum.unsqueeze(0) - teacher_probs, log_p_global) * scale
    log_p_local = torch.log_softmax(student_local.float() / student_temp, dim=-1)
    loss_local = torch.einsum("lbk,bk->", log_p_local, teacher_sum) * scale
    return loss_global, loss_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--prototypes", type=positive_int, default=131072)
    parser.add_argument("--locals", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    student_global = torch.randn(2, args.batch, args.prototypes, generator=gen).to(device).requires_grad_()
    student_local = torch.randn(args.locals, args.batch, args.prototypes, generator=gen).to(device).requires_grad_()
    teacher = torch.softmax(torch.randn(2, args.batch, args.prototypes, generator=gen) / 0.04, dim=-1).to(device)

    def run(loss_fn) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
        student_global.grad = student_local.grad = None

        def forward_backward() -> torch.Tensor:
            loss_global, loss_local = loss_fn(student_global, student_local, teacher)
            (loss_global + loss_local).backward()
            return (loss_global + loss_local).detach()

        seconds, loss = timed(forward_backward, device)
        return seconds, loss, [student_global.grad.clone(), student_local.grad.clone()]

    _, ours_loss, ours_grads = run(dino_cross_entropy)  # warm-up of both, and the comparison
    _, base_loss, base_grads = run(einsum_cross_entropy)
    ours_s, base_s = [], []
    for _ in range(args.repeats):
        ours_s.append(run(dino_cross_entropy)[0])
        base_s.append(run(einsum_cross_entropy)[0])
    ours_ms, base_ms = 1e3 * statistics.median(ours_s), 1e3 * statistics.median(base_s)
    print(json.dumps({
        "benchmark": "dino_loss",
        "device": device_label(device),
        "threads": torch.get_num_threads(),
        "shape": {"global": [2, args.batch, args.prototypes], "local": [args.locals, args.batch, args.prototypes]},
        "ours_ms": round(ours_ms, 3),
        "einsum_ms": round(base_ms, 3),
        "speedup": round(base_ms / ours_ms, 3),
        "loss_difference": float((ours_loss - base_loss).abs()),
        "grad_max_difference": max(float((a - b).abs().max()) for a, b in zip(ours_grads, base_grads)),
    }))


if __name__ == "__main__":
    main()
