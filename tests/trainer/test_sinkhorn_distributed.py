"""Sinkhorn-Knopp and softmax centering over 2 real gloo ranks equal one process on the concatenated batch.

One spawn for the whole module (importing torch in two fresh processes is the slow part); each test checks one case.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.dist_utils import find_free_port
from trainer.losses.centering import SoftmaxCenter, sinkhorn_knopp

WORLD_SIZE = 2
NUM_PROTOTYPES = 6
TEACHER_TEMP = 0.04


def _cases() -> dict[str, tuple[torch.Tensor, list[int]]]:
    """name -> (global logits [N, K], rows per rank). Deterministic, so parent and workers build the same tensors."""
    gen = torch.Generator().manual_seed(0)

    def logits(rows: int) -> torch.Tensor:
        return torch.randn(rows, NUM_PROTOTYPES, generator=gen).clamp(-1.0, 1.0)

    shifted = logits(8)
    shifted[:4] += 4.0  # rank 0 holds logits far above rank 1's: the stabilising max must be global
    return {
        "equal_rows": (logits(8), [4, 4]),
        "large_unequal_magnitudes": (shifted, [4, 4]),
        "unequal_rows": (logits(7), [5, 2]),
        "one_rank_empty": (logits(4), [4, 0]),
    }


def _local_rows(global_rows: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
    return global_rows.split(counts)[rank]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for name, (global_logits, counts) in _cases().items():
            local = _local_rows(global_logits, counts, rank)
            # uneven counts (iBOT's masked patches per rank, zero on some) need no global count
            results[f"sinkhorn/{name}"] = sinkhorn_knopp(local, TEACHER_TEMP, 3)
            center = SoftmaxCenter(NUM_PROTOTYPES, momentum=0.9)
            center.update(local)
            center.update(2.0 * local)
            results[f"center/{name}"] = center.center.clone()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out_dir = tmp_path_factory.mktemp("sinkhorn_ranks")
    mp.spawn(_worker, args=(find_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("case", list(_cases()))
def test_distributed_sinkhorn_equals_single_process_on_concatenated_batch(rank_results, case):
    global_logits, counts = _cases()[case]
    expected = sinkhorn_knopp(global_logits, TEACHER_TEMP, 3)  # one process, no process group
    for rank, results in enumerate(rank_results):
        local_expected = _local_rows(expected, counts, rank)
        assert results[f"sinkhorn/{case}"].shape == local_expected.shape
        torch.testing.assert_close(results[f"sinkhorn/{case}"], local_expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(_cases()))
def test_distributed_center_update_equals_single_process_mean(rank_results, case):
    global_logits, _ = _cases()[case]
    # Hand-computed EMA over the global batch mean (not the mean of per-rank means).
    first = 0.1 * global_logits.mean(dim=0, keepdim=True)
    expected = 0.9 * first + 0.1 * (2.0 * global_logits).mean(dim=0, keepdim=True)
    for results in rank_results:
        torch.testing.assert_close(results[f"center/{case}"], expected, rtol=1e-5, atol=1e-6)
