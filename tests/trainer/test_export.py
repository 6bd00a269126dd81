"""Backbone checkpoints in the released layout: export, save, read, load (flat, chunked, prefixed, resized)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.models import (
    build_backbone,
    export_backbone_state_dict,
    interpolate_pos_embed,
    load_backbone_state_dict,
    read_checkpoint,
    save_backbone,
)

SETTINGS = {"patch_size": 4, "img_size": 32, "drop_path_rate": 0.0, "num_register_tokens": 4}


def pico(seed: int, **overrides):
    torch.manual_seed(seed)
    return build_backbone("vit_pico", **{**SETTINGS, **overrides})


def to_chunked(state_dict: dict[str, torch.Tensor], chunk_size: int) -> dict[str, torch.Tensor]:
    """The reference's FSDP training layout: block i lives at blocks.{i // chunk_size}.{i}."""
    out = {}
    for key, value in state_dict.items():
        match = re.match(r"blocks\.(\d+)\.(.*)", key)
        out[f"blocks.{int(match[1]) // chunk_size}.{match[1]}.{match[2]}" if match else key] = value
    return out


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_then_load_round_trips_bit_exactly(tmp_path: Path, suffix: str) -> None:
    source, target = pico(seed=1), pico(seed=2)
    assert not torch.equal(source.pos_embed, target.pos_embed)
    path = save_backbone(source, tmp_path / f"backbone{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"backbone{suffix}"]  # no partial file left behind
    raw = torch.load(path, weights_only=True) if suffix == ".pth" else load_file(path)
    assert sorted(raw) == sorted(source.state_dict())  # a flat dict of released keys, nothing else (safetensors sorts)
    result = load_backbone_state_dict(target, read_checkpoint(path))
    assert result.missing_keys == [] and result.unexpected_keys == []
    for (name, expected), got in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(got, expected), name
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(source.eval()(images), target.eval()(images))


def test_export_gives_owned_contiguous_cpu_tensors() -> None:
    model = pico(seed=0)
    exported = export_backbone_state_dict(model)
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in exported.values())
    before = exported["cls_token"].clone()
    with torch.no_grad():
        model.cls_token.add_(1.0)
    assert torch.equal(exported["cls_token"], before)


def test_chunked_prefixed_training_checkpoint_loads_the_teacher_strictly(tmp_path: Path) -> None:
    student, teacher, target = pico(seed=1), pico(seed=2), pico(seed=3)
    checkpoint = {"iteration": 7, "model": {}}
    for name, net in (("student", student), ("teacher", teacher)):
        for key, value in to_chunked(export_backbone_state_dict(net), chunk_size=2).items():
            checkpoint["model"][f"{name}.backbone.{key}"] = value
        checkpoint["model"][f"{name}.dino_head.mlp.0.weight"] = torch.zeros(3, 96)
    assert "teacher.backbone.blocks.1.3.attn.qkv.weight" in checkpoint["model"]
    path = tmp_path / "training.pth"
    torch.save(checkpoint, path)
    load_backbone_state_dict(target, read_checkpoint(path))
    for (name, expected), got in zip(teacher.state_dict().items(), target.state_dict().values()):
        assert torch.equal(got, expected), name
    student_only = load_backbone_state_dict(target, read_checkpoint(path), prefix="student.backbone.")
    assert student_only.unexpected_keys == [] and torch.equal(target.cls_token, student.cls_token)


def test_build_backbone_loads_a_checkpoint_with_wrapper_names(tmp_path: Path) -> None:
    source = pico(seed=1)
    wrapped = {f"module._orig_mod.{key}": value for key, value in export_backbone_state_dict(source).items()}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    loaded = build_backbone("vit_pico", checkpoint=tmp_path / "wrapped.pt", **SETTINGS)
    assert torch.equal(loaded.blocks[3].mlp.fc2.weight, source.blocks[3].mlp.fc2.weight)


def test_pos_embed_of_another_grid_is_interpolated_with_the_model_settings(caplog: pytest.LogCaptureFixture) -> None:
    source = pico(seed=1)  # 8x8 grid
    target = pico(seed=2, img_size=16, interpolate_antialias=True, interpolate_offset=0.0)  # 4x4 grid
    with caplog.at_level(logging.INFO, logger="trainer.models.checkpoint_io"):
        load_backbone_state_dict(target, export_backbone_state_dict(source))
    expected = interpolate_pos_embed(source.pos_embed.detach(), (4, 4), antialias=True, offset=0.0)
    assert target.pos_embed.shape == (1, 17, 96)
    assert torch.equal(target.pos_embed.detach(), expected)
    assert "interpolating checkpoint pos_embed (1, 65, 96) to the model's 4x4 grid" in caplog.text
    assert "antialias=True, offset=0.0" in caplog.text


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    state_dict = export_backbone_state_dict(pico(seed=0))
    target = pico(seed=1)
    incomplete = {k: v for k, v in state_dict.items() if k != "blocks.2.ls1.gamma"}
    with pytest.raises(ValueError, match=r"1 missing keys: blocks.2.ls1.gamma"):
        load_backbone_state_dict(target, incomplete)
    assert load_backbone_state_dict(target, incomplete, strict=False).missing_keys == ["blocks.2.ls1.gamma"]
    with pytest.raises(ValueError, match=r"unexpected keys: register_tokens.*hint: model.num_register_tokens"):
        load_backbone_state_dict(pico(seed=1, num_register_tokens=0), state_dict)
    with pytest.raises(ValueError, match=r"shape mismatch: cls_token: checkpoint \(1, 1, 96\) vs model \(1, 1, 192\)"):
        load_backbone_state_dict(pico(seed=1, embed_dim=192), state_dict, strict=False)
    both = {**{f"student.{k}": v for k, v in state_dict.items()}, **{f"ema.{k}": v for k, v in state_dict.items()}}
    with pytest.raises(ValueError, match=r"several backbones \(prefixes \['ema.', 'student.'\]\); pass prefix="):
        load_backbone_state_dict(target, both)
    with pytest.raises(ValueError, match="no cls_token key"):
        load_backbone_state_dict(target, {"head.weight": torch.zeros(1)})
    with torch.device("meta"):
        meta = pico(seed=1)
    with pytest.raises(ValueError, match="meta device; call to_empty"):
        load_backbone_state_dict(meta, state_dict)
    with pytest.raises(ValueError, match=r"suffix '.bin' is not one of .safetensors, .pth, .pt"):
        save_backbone(target, tmp_path / "backbone.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")
