"""Sinkhorn-Knopp teacher targets: ours (no passes for the recipe's scalar factors) vs the recipe's pass structure.

    python bench/sinkhorn.py --rows 2048 --prototypes 131072 --repeats 5

The baseline is the recipe written pass for pass (divide by the total, then per iteration divide by the prototype
sums and by K, by the sample sums and by B, finally multiply by B), with the same float32 max shift; ours skips every
scalar factor because each cancels in the next normalisation (``trainer/losses/centering.py``). Same logits, same
process, alternating runs. Prints ONE JSON object: median milliseconds of each, ``speedup``, and the largest
absolute difference between the two results. ``--device cuda`` runs it on a GPU (synchronised timing).
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

from trainer.losses.centering import sinkhorn_knopp  # noqa: E402


def recipe_pass_structure(logits: torch.Tensor, teacher_temp: float, num_iterations: int) -> torch.Tensor:
    """The baseline: every scalar factor of the recipe as its own pass over the [N, K] matrix (one process)."""
    num_samples, num_prototypes = logits.shape
    scaled = logits.float() / teacher_temp
    q = scaled.sub_(scaled.max()).exp_()
    q.div_(q.sum())
    for _ in range(num_iterations):
        q.div_(q.sum(dim=0, keepdim=True)).div_(num_prototypes)
        q.div_(q.sum(dim=1, keepdim=True)).div_(num_samples)
    return q.mul_(num_samples)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=positive_int, default=2048,
                        help="N: samples (DINO: 2 x batch; iBOT: masked patches)")
    parser.add_argument("--prototypes", type=positive_int, default=131072,
                        help="K (the recipes use 65,536 or 131,072)")
    parser.add_argument("--iterations", type=positive_int, default=3)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--temp", type=float, default=0.07)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    # head logits are cosine similarities with weight-normalised prototypes: [-1, 1]
    logits = (2.0 * torch.rand(args.rows, args.prototypes, generator=generator) - 1.0).to(device)

    def ours() -> torch.Tensor:
        return sinkhorn_knopp(logits, args.temp, args.iterations)

    def baseline() -> torch.Tensor:
        return recipe_pass_structure(logits, args.temp, args.iterations)

    difference = float((ours() - baseline()).abs().max())  # also the warm-up of both
    ours_s, baseline_s = [], []
    for _ in range(args.repeats):
        ours_s.append(timed(ours, device)[0])
        baseline_s.append(timed(baseline, device)[0])
    ours_ms, baseline_ms = 1e3 * statistics.median(ours_s), 1e3 * statistics.median(baseline_s)
    print(json.dumps({
        "benchmark": "sinkhorn",
        "device": device_label(device),
        "threads": torch.get_num_threads(),
        "shape": [args.rows, args.prototypes],
        "iterations": args.iterations,
        "ours_ms": round(ours_ms, 3),
        "recipe_passes_ms": round(baseline_ms, 3),
        "speedup": round(baseline_ms / ours_ms, 3),
        "max_abs_difference": difference,
    }))


if __name__ == "__main__":
    main()
