"""Sharded DCP checkpoints: exact reload on 2 ranks (FSDP2 + AdamW), resharded reload in one process."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from ssl_toy import toy_loss, toy_ssl_model
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from torch.multiprocessing.spawn import ProcessException

from tests.dist_utils import run_distributed
from trainer.checkpoint import CheckpointManager, OptimizerState, load_model_weights
from trainer.config import CheckpointConfig, ParallelConfig
from trainer.parallelize import parallelize
from trainer.rng import RNGState

FULL = StateDictOptions(full_state_dict=True)


def _shard(model: nn.ModuleDict, world_size: int) -> nn.ModuleDict:
    return parallelize(model, ParallelConfig(), world_size=world_size, device=torch.device("cpu"))


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
        "optim": copy.deepcopy(get_optimizer_state_dict(model, optimizer, options=FULL)),  # steps are shared
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
        assert torch.equal(actual, expected), f"{where} differs: {actual} vs {expected}"
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

    async_manager = _manager(directory, rank, world_size, async_save=True)
    async_manager.save(3, state, meta={}, blocking=False)
    _train(model, optimizer, steps=1, seed=7)  # overlaps the upload; collectives on the default group
    async_manager.wait()
    assert async_manager.last_saved_iteration == 3
    assert (Path(directory) / "ckpt-000000003" / "COMPLETE.json").exists()
    async_manager.close()
    manager.close()
    return expected


def _load_single_process_checkpoint(rank: int, world_size: int, directory: str) -> dict:
    """Scale up: load a 1-process checkpoint into a model sharded over 2 ranks (a bare optimizer this time)."""
    model = _shard(toy_ssl_model(seed=3), world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    progress: dict = {}
    manager = _manager(directory, rank, world_size)
    assert manager.load_latest({"student": model, "optimizer": optimizer, "progress": progress,
                                "rng": RNGState()}) == 5
    manager.close()
    draw = torch.rand(3)
    # Stage init (highres): the same weights into a sharded model with a longer position embedding.
    highres = _shard(toy_ssl_model(seed=4, num_tokens=8), world_size)
    assert load_model_weights(directory, {"student": highres}, resize=_stretch) == {}
    return {"state": _snapshot(model, optimizer), "progress": progress, "draw": draw,
            "highres": get_model_state_dict(highres, options=FULL)}


def _stretch(key: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.nn.functional.interpolate(tensor.transpose(1, 2), size=shape[1], mode="linear").transpose(1, 2)


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
    assert _manager(directory).load(f"{directory}/ckpt-000000002", state)["iteration"] == 2
    _assert_same(_snapshot(model, optimizer), expected_rank0, "resharded")
    assert progress == {"iteration": 2, "loader": {"sample_in_epoch": 64}}  # rank 0's per-rank state


def test_single_process_checkpoint_loads_sharded_on_two_ranks(tmp_path: Path) -> None:
    model = toy_ssl_model(seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, steps=2, seed=0)
    state = {"student": model, "optimizer": optimizer, "progress": {"iteration": 5}, "rng": RNGState()}
    _manager(str(tmp_path)).save(5, state, meta={})
    expected = _snapshot(model, optimizer)
    rank0_draw = torch.rand(3)  # what rank 0 draws after restoring the saved generator state

    ranks = run_distributed(_load_single_process_checkpoint, world_size=2, args=(str(tmp_path),))
    for rank in ranks:
        _assert_same(rank["state"], expected, "upscaled")
        assert rank["progress"] == {"iteration": 5}
    assert torch.equal(ranks[0]["draw"], rank0_draw)
    highres = ranks[0]["highres"]
    torch.testing.assert_close(highres["backbone.pos_embed"], _stretch("", model["backbone"].pos_embed.detach(),
                                                                       torch.Size([1, 8, 16])))
    for name, value in model.state_dict().items():
        if name != "backbone.pos_embed":
            assert torch.equal(highres[name], value), name
    assert not torch.equal(ranks[1]["draw"], rank0_draw)  # rank 1 got rank 0's RNG file and reseeded


def _die_while_saving(rank: int, world_size: int, directory: str) -> None:
    model = _shard(toy_ssl_model(seed=0), world_size)
    manager = _manager(directory, rank, world_size)
    manager.save(1, {"student": model, "progress": {"iteration": 1}}, meta={})
    if rank == 1:
        # Rank 1 is killed (exit without cleanup) after writing its per-rank file, while producing its tensors.
        model.register_state_dict_post_hook(lambda *args: os._exit(3))
    manager.save(2, {"student": model, "progress": {"iteration": 2}}, meta={})


def test_a_rank_dying_mid_save_leaves_an_unpublished_directory_that_resume_ignores(tmp_path: Path) -> None:
    directory = tmp_path / "ckpts"
    # Either rank 1's exit or rank 0's broken collective is reported first: both end the run.
    with pytest.raises(ProcessException):
        run_distributed(_die_while_saving, world_size=2, args=(str(directory),))
    interrupted = directory / "ckpt-000000002"
    assert (interrupted / "extra-rank00001.json").exists() and not (interrupted / "COMPLETE.json").exists()

    progress: dict = {}
    manager = _manager(str(directory))
    assert manager.load_latest({"student": toy_ssl_model(), "progress": progress}) == 1
    assert progress == {"iteration": 1}
    manager.save(2, {"student": toy_ssl_model(), "progress": {"iteration": 2}}, meta={})  # replaces the debris
    assert sorted(p.name for p in interrupted.iterdir()) == [
        ".metadata", "COMPLETE.json", "__0_0.distcp", "extra-rank00000.json"
    ]
