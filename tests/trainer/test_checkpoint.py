"""Sharded DCP checkpoints: exact reload on 2 ranks (FSDP2 + AdamW), resharded reload in one process."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ssl_toy import toy_loss, toy_ssl_model
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tests.dist_utils import run_distributed
from trainer.checkpoint import CheckpointManager, OptimizerState
from trainer.config import CheckpointConfig
from trainer.rng import RNGState

FULL = StateDictOptions(full_state_dict=True)


def _shard(model: nn.ModuleDict, world_size: int) -> nn.ModuleDict:
    mesh = init_device_mesh("cpu", (world_size,))
    for block in model["backbone"].blocks:
        fully_shard(block, mesh=mesh)
    for name in ("dino_head", "ibot_head", "backbone"):
        fully_shard(model[name], mesh=mesh)
    return model


def _train(model: nn.ModuleDict, optimizer: torch.optim.Optimizer, *, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        toy_loss(model, torch.randn(4, 4, 6, generator=generator)).backward()
        optimizer.step()


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full (unsharded) model and optimiser state as plain CPU tensors."""
    return {
        "model": {k: v.clone() for k, v in get_model_state_dict(model, options=FULL).items()},
        "optim": get_optimizer_state_dict(model, optimizer, options=FULL),
    }


def _assert_same(actual, expected, where: str = "") -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), f"{where} differs"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _manager(directory: str, rank: int = 0, world_size: int = 1, **kwargs) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(dir=directory, **kwargs), rank=rank, world_size=world_size)


def _save_then_reload(rank: int, world_size: int, directory: str) -> dict:
    model = _shard(toy_ssl_model(seed=0), world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, steps=2, seed=rank)
    manager = _manager(directory, rank, world_size)
    progress = {"iteration": 2, "loader": {"sample_in_epoch": 64 + rank}}
    rng = RNGState(rank=rank)
    state = {"student": model, "optimizer": OptimizerState(model, optimizer), "progress": progress, "rng": rng}
    manager.save(2, state, meta={"losses": {"total": 1.5}})
    expected = _snapshot(model, optimizer)
    expected_draw = torch.rand(3)

    _train(model, optimizer, steps=1, seed=99)  # move away from the saved state, then come back
    progress.clear()
    assert manager.load_latest(state) == 2
    _assert_same(_snapshot(model, optimizer), expected, "reloaded")
    assert progress == {"iteration": 2, "loader": {"sample_in_epoch": 64 + rank}}
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored: the same stream continues
    assert manager.loaded_meta["world_size"] == 2 and manager.last_load_seconds > 0
    manager.close()
    return expected


def test_sharded_checkpoint_reloads_exactly_on_two_ranks_and_resharded_in_one(tmp_path: Path) -> None:
    directory = str(tmp_path / "ckpts")
    expected_rank0, expected_rank1 = run_distributed(_save_then_reload, world_size=2, args=(directory,))
    _assert_same(expected_rank1["model"], expected_rank0["model"], "ranks agree")

    files = sorted(p.name for p in (tmp_path / "ckpts" / "ckpt-000000002").iterdir())
    assert files == [".metadata", "COMPLETE.json", "__0_0.distcp", "__1_0.distcp",
                     "extra-rank00000.json", "extra-rank00001.json"]
    record = json.loads((tmp_path / "ckpts" / "ckpt-000000002" / "COMPLETE.json").read_text())
    assert record["iteration"] == 2 and record["world_size"] == 2 and record["losses"] == {"total": 1.5}

    # One process, no process group, a differently initialised model: the shards are reassembled exactly.
    model = toy_ssl_model(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    progress: dict = {}
    state = {"student": model, "optimizer": OptimizerState(model, optimizer), "progress": progress}
    assert _manager(directory).load_latest(state) == 2
    _assert_same(_snapshot(model, optimizer), expected_rank0, "resharded")
    assert progress == {"iteration": 2, "loader": {"sample_in_epoch": 64}}  # rank 0's per-rank state
