"""Per-module clipping and the teacher EMA on FSDP2-sharded modules (DTensor parameters), 2 gloo ranks on CPU.

Both are compared with the same operations on unsharded copies in the parent process.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.dist_utils import find_free_port
from trainer.optim import clip_grad_norms, ema_update

WORLD_SIZE = 2
MAX_NORM = 1.0
MOMENTUM = 0.9


def _modules() -> tuple[nn.ModuleDict, nn.ModuleDict, dict[str, torch.Tensor]]:
    """Deterministic student, teacher and per-parameter gradients (same on every process)."""
    torch.manual_seed(0)
    student = nn.ModuleDict({"backbone": nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4)), "head": nn.Linear(4, 5)})
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(torch.randn_like(param))
    grads = {name: torch.randn_like(param) * 3 for name, param in student.named_parameters()}
    return student, teacher, grads


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        student, teacher, grads = _modules()
        for model in (student, teacher):
            for module in model.values():
                fully_shard(module)
        for name, param in student.named_parameters():
            assert isinstance(param, DTensor)
            param.grad = distribute_tensor(grads[name], param.device_mesh, param.placements)
        norms = clip_grad_norms({"backbone": student["backbone"], "head": student["head"]}, MAX_NORM)
        ema_update(teacher, student, MOMENTUM)
        results = {
            "norms": norms,
            "grads": {name: p.grad.full_tensor() for name, p in student.named_parameters()},
            "teacher": {name: p.full_tensor() for name, p in teacher.named_parameters()},
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("optim_ranks")
    mp.spawn(_worker, args=(find_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_clip_grad_norms_on_sharded_modules_equals_unsharded(rank_results):
    student, _, grads = _modules()
    for module_key in ("backbone", "head"):
        names = [f"{module_key}.{name}" for name, _ in student[module_key].named_parameters()]
        # Hand-computed: global L2 norm over the module's full gradients, scale max_norm / norm when above.
        norm = torch.sqrt(sum((grads[name].double() ** 2).sum() for name in names)).item()
        scale = min(1.0, MAX_NORM / (norm + 1e-6))
        for results in rank_results:
            assert results["norms"][module_key] == pytest.approx(norm, rel=1e-5)
            for name in names:
                torch.testing.assert_close(results["grads"][name], grads[name] * scale, rtol=1e-5, atol=1e-6)


def test_ema_update_on_sharded_modules_equals_unsharded(rank_results):
    student, teacher, _ = _modules()
    sources = dict(student.named_parameters())
    for name, param in teacher.named_parameters():
        expected = MOMENTUM * param.detach() + (1 - MOMENTUM) * sources[name].detach()
        for results in rank_results:
            torch.testing.assert_close(results["teacher"][name], expected)
