"""CheckpointManager in one process: publication, interrupted writes, retention, async saves, object stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest
import torch
from ssl_toy import toy_loss, toy_ssl_model
from torch import nn

from trainer import layout
from trainer.checkpoint import CheckpointManager, load_model_weights, resolve_checkpoint
from trainer.config import CheckpointConfig


def _manager(directory: str, **kwargs) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(dir=directory, **kwargs), rank=0, world_size=1)


def _state(seed: int = 0) -> dict:
    model = toy_ssl_model(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.zero_grad()
    toy_loss(model, torch.randn(2, 4, 6)).backward()
    optimizer.step()
    return {"student": model, "optimizer": optimizer, "progress": {"seed": seed}}


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("ckpt-"))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_marker_is_written_last_and_holds_the_record(tmp_path: Path) -> None:
    manager = _manager(str(tmp_path))
    seconds = manager.save(7, _state(), meta={"losses": {"total": 2.0}, "reason": "interval"})
    record = json.loads((tmp_path / "ckpt-000000007" / "COMPLETE.json").read_text())
    assert record["iteration"] == 7 and record["world_size"] == 1 and record["reason"] == "interval"
    assert record["save_seconds"] <= seconds and manager.last_saved_iteration == 7
    assert not list(tmp_path.rglob("*.tmp"))
    # The marker is the newest file of the directory.
    files = list((tmp_path / "ckpt-000000007").iterdir())
    assert max(files, key=lambda p: p.stat().st_mtime_ns).name == "COMPLETE.json"


def test_interrupted_write_is_never_resumed_and_is_replaced(tmp_path: Path) -> None:
    manager = _manager(str(tmp_path), keep_last=0)
    saved = _state(seed=1)
    manager.save(1, saved, meta={})
    # A crash while writing iteration 2: tensor files present (one truncated), no marker.
    shutil.copytree(tmp_path / "ckpt-000000001", tmp_path / "ckpt-000000002")
    (tmp_path / "ckpt-000000002" / "COMPLETE.json").unlink()
    (tmp_path / "ckpt-000000002" / "__0_0.distcp").write_bytes(b"\x00" * 10)

    fresh = _state(seed=2)
    assert manager.load_latest(fresh) == 1
    assert fresh["progress"] == {"seed": 1}
    assert all(torch.equal(a, b) for a, b in zip(_params(fresh["student"]).values(),
                                                  _params(saved["student"]).values()))
    manager.save(2, fresh, meta={})
    assert (tmp_path / "ckpt-000000002" / "__0_0.distcp").stat().st_size > 10
    assert layout.latest_complete(str(tmp_path)).iteration == 2
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        (tmp_path / "ckpt-000000002" / "COMPLETE.json").unlink()
        manager.load(str(tmp_path / "ckpt-000000002"), fresh)


def test_retention_keeps_the_newest_and_the_published(tmp_path: Path) -> None:
    manager = _manager(str(tmp_path), keep_last=2)
    state = _state()
    manager.save(1, state, meta={})
    (tmp_path / layout.PUBLISHED_FILE).write_text(json.dumps({"checkpoint": "ckpt-000000001"}))
    for iteration in (2, 3):
        manager.save(iteration, state, meta={})
    (tmp_path / "ckpt-000000004").mkdir()  # interrupted, older than the next complete one
    manager.save(5, state, meta={})
    assert _names(tmp_path) == ["ckpt-000000001", "ckpt-000000003", "ckpt-000000005"]
    (tmp_path / "ckpt-000000009").mkdir()  # newer than every complete one (an async save in flight): kept
    assert manager.prune() == []
    assert _names(tmp_path)[-1] == "ckpt-000000009"


def test_keep_last_zero_keeps_everything(tmp_path: Path) -> None:
    manager = _manager(str(tmp_path), keep_last=0)
    for iteration in (1, 2, 3):
        manager.save(iteration, {"progress": {"i": iteration}}, meta={})
    assert len(_names(tmp_path)) == 3


def test_a_complete_checkpoint_is_not_rewritten(tmp_path: Path) -> None:
    manager = _manager(str(tmp_path))
    manager.save(3, {"progress": {"value": 1}}, meta={})
    manager.save(3, {"progress": {"value": 2}}, meta={})
    assert json.loads((tmp_path / "ckpt-000000003" / "extra-rank00000.json").read_text()) == {"progress": {"value": 1}}


def test_async_save_snapshots_the_state_at_the_call(tmp_path: Path) -> None:
    manager = _manager(str(tmp_path), async_save=True)
    state = _state()
    expected = _params(state["student"])
    manager.save(4, state, meta={}, blocking=False)
    with torch.no_grad():  # training goes on while the upload runs
        for param in state["student"].parameters():
            param.add_(1.0)
    manager.wait()
    assert (tmp_path / "ckpt-000000004" / "COMPLETE.json").exists()
    assert manager.last_saved_iteration == 4 and manager.last_save_seconds > 0
    restored = _state(seed=9)
    assert manager.load_latest(restored) == 4
    actual = _params(restored["student"])
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


def test_object_store_uri_round_trip() -> None:
    directory = "memory://bucket/run-a/pretrain"
    manager = _manager(directory)
    saved = _state(seed=4)
    manager.save(10, saved, meta={"reason": "final"})
    fs = fsspec.filesystem("memory")
    assert json.loads(fs.cat_file("/bucket/run-a/pretrain/ckpt-000000010/COMPLETE.json"))["reason"] == "final"
    restored = _state(seed=5)
    assert _manager(directory).load_latest(restored) == 10
    assert restored["progress"] == {"seed": 4}
    actual, expected = _params(restored["student"]), _params(saved["student"])
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    assert resolve_checkpoint(directory) == f"{directory}/ckpt-000000010"


def test_load_model_weights_resizes_or_returns_changed_shapes(tmp_path: Path) -> None:
    source = toy_ssl_model(seed=1)
    _manager(str(tmp_path)).save(100, {"student": source, "teacher": toy_ssl_model(seed=2)}, meta={})
    saved_pos = source["backbone"].pos_embed.detach().clone()

    def stretch(key: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        assert key == "teacher.backbone.pos_embed"
        return torch.nn.functional.interpolate(tensor.transpose(1, 2), size=shape[1], mode="linear").transpose(1, 2)

    target = toy_ssl_model(seed=3, num_tokens=8)
    left = load_model_weights(str(tmp_path), {"teacher": target}, resize=stretch)  # the stage dir resolves
    assert left == {}
    teacher = toy_ssl_model(seed=2)
    assert torch.equal(target["dino_head"].mlp[0].weight, teacher["dino_head"].mlp[0].weight)
    assert target["backbone"].pos_embed.shape == (1, 8, 16)

    student = toy_ssl_model(seed=3, num_tokens=8)
    untouched = student["backbone"].pos_embed.detach().clone()
    left = load_model_weights(str(tmp_path / "ckpt-000000100"), {"student.backbone": student["backbone"]})
    assert list(left) == ["student.backbone.pos_embed"] and torch.equal(left["student.backbone.pos_embed"], saved_pos)
    assert torch.equal(student["backbone"].pos_embed, untouched)
    assert torch.equal(student["backbone"].blocks[0].fc1.weight, source["backbone"].blocks[0].fc1.weight)


def test_load_model_weights_errors_name_the_problem(tmp_path: Path) -> None:
    _manager(str(tmp_path)).save(1, {"student": toy_ssl_model()}, meta={})
    with pytest.raises(KeyError, match="'teacher.backbone.pos_embed' is not in checkpoint"):
        load_model_weights(str(tmp_path), {"teacher": toy_ssl_model()})
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at or under"):
        load_model_weights(str(tmp_path / "elsewhere"), {"student": toy_ssl_model()})


def test_user_mistakes_raise_clear_errors(tmp_path: Path) -> None:
    manager = _manager(str(tmp_path))
    with pytest.raises(ValueError, match=r"meta: invalid keys \['iteration'\]"):
        manager.save(1, {}, meta={"iteration": 3})
    with pytest.raises(TypeError, match=r"state\['step'\]: unsupported type int"):
        manager.save(1, {"step": 3}, meta={})
    lonely = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"state\['optimizer'\]: no nn.Module in the state holds"):
        manager.save(1, {"student": nn.Linear(2, 2), "optimizer": lonely}, meta={})
    with pytest.raises(TypeError, match="must be JSON-serialisable"):
        manager.save(1, {"progress": {"when": object()}}, meta={})
    with pytest.raises(ValueError, match="checkpoint.keep_last: invalid value -1"):
        _manager(str(tmp_path), keep_last=-1)
