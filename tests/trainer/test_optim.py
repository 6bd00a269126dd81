"""Parameter groups, schedules applied to AdamW, per-module clipping and the teacher EMA (one process)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.config import resolve_config
from trainer.models import DINOHead, build_backbone
from trainer.optim import build_optimizer, build_param_groups, clip_grad_norms, ema_update, layer_id, set_schedules

NUM_BLOCKS = 4  # vit_pico


def _student() -> nn.ModuleDict:
    torch.manual_seed(0)
    backbone = build_backbone("vit_pico", patch_size=4, img_size=32, num_register_tokens=2)
    return nn.ModuleDict(
        {
            "backbone": backbone,
            "dino_head": DINOHead(96, 32, hidden_dim=64, bottleneck_dim=16),
            "ibot_head": DINOHead(96, 32, hidden_dim=64, bottleneck_dim=16),
        }
    )


def _group_of(groups: list[dict]) -> dict[int, dict]:
    return {id(param): group for group in groups for param in group["params"]}


# name -> (lr multiplier, wd multiplier, is_last_layer) with layer decay 0.9, patch-embed x0.2, L = 4 blocks:
# rate ** (L + 1 - layer), layer 0 = embeddings/tokens, block i = i + 1, final norm and heads = L + 1.
EXPECTED = {
    "backbone.cls_token": (0.9**5, 1.0, False),
    "backbone.pos_embed": (0.9**5, 1.0, False),
    "backbone.register_tokens": (0.9**5, 1.0, False),
    "backbone.mask_token": (0.9**5, 1.0, False),
    "backbone.patch_embed.proj.weight": (0.9**5 * 0.2, 1.0, False),
    "backbone.patch_embed.proj.bias": (0.9**5 * 0.2, 0.0, False),
    "backbone.blocks.0.attn.qkv.weight": (0.9**4, 1.0, False),
    "backbone.blocks.0.norm1.weight": (0.9**4, 0.0, False),
    "backbone.blocks.1.mlp.fc1.weight": (0.9**3, 1.0, False),
    "backbone.blocks.3.ls2.gamma": (0.9, 0.0, False),
    "backbone.blocks.3.mlp.fc2.bias": (0.9, 0.0, False),
    "backbone.norm.weight": (1.0, 0.0, False),
    "backbone.norm.bias": (1.0, 0.0, False),
    "dino_head.mlp.0.weight": (1.0, 1.0, False),
    "dino_head.mlp.4.bias": (1.0, 0.0, False),
    "dino_head.last_layer.weight_v": (1.0, 1.0, True),
    "dino_head.last_layer.weight_g": (1.0, 1.0, True),
    "ibot_head.last_layer.weight_v": (1.0, 1.0, True),
    "ibot_head.mlp.2.weight": (1.0, 1.0, False),
}


def test_param_groups_carry_the_documented_multipliers():
    student = _student()
    groups = build_param_groups(student, resolve_config("tiny"))
    group_of = _group_of(groups)
    params = dict(student.named_parameters())
    assert len(group_of) == len(params)  # every trainable parameter exactly once
    for name, (lr_mult, wd_mult, is_last_layer) in EXPECTED.items():
        group = group_of[id(params[name])]
        assert group["lr_multiplier"] == pytest.approx(lr_mult), name
        assert (group["wd_multiplier"], group["is_last_layer"]) == (wd_mult, is_last_layer), name
    # Grouped by (lr, wd, last layer): tokens 1 + patch embed 2 + 4 blocks x {decay, none} + top {decay, none, last}.
    assert len(groups) == 1 + 2 + 2 * NUM_BLOCKS + 3


def test_frozen_parameters_are_left_out():
    student = _student()
    student["backbone"].mask_token.requires_grad_(False)
    groups = build_param_groups(student, resolve_config("tiny"))
    assert id(student["backbone"].mask_token) not in _group_of(groups)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("blocks.1.5.attn.qkv.weight", 6),  # chunked layout: blocks.<chunk>.<global index>
        ("blocks.0.0.norm1.weight", 1),
        ("_orig_mod.blocks.2.norm1.weight", 3),  # torch.compile wrapper
        ("blocks.3._checkpoint_wrapped_module.mlp.fc1.weight", 4),  # activation checkpointing
        ("patch_embed.proj.weight", 0),
        ("register_tokens", 0),
        ("norm.weight", 13),
    ],
)
def test_layer_id_understands_flat_chunked_and_wrapped_names(name, expected):
    assert layer_id(name, 12) == expected


def test_set_schedules_applies_multipliers_and_freezes_the_last_layer():
    student = _student()
    config = resolve_config("tiny", overrides={"optim.adamw_beta2": 0.99})
    optimizer = build_optimizer(student, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["betas"] == (0.9, 0.99) for group in optimizer.param_groups)
    assert all(group["lr"] == 0.0 for group in optimizer.param_groups)  # warm-up starts at 0

    set_schedules(optimizer, lr=1e-3, weight_decay=0.04, last_layer_lr=0.0)
    group_of = _group_of(optimizer.param_groups)
    params = dict(student.named_parameters())
    for name, (lr_mult, wd_mult, is_last_layer) in EXPECTED.items():
        group = group_of[id(params[name])]
        assert group["lr"] == pytest.approx(0.0 if is_last_layer else 1e-3 * lr_mult), name
        assert group["weight_decay"] == pytest.approx(0.04 * wd_mult), name

    # A step with the prototypes frozen (lr 0) leaves them unchanged and moves the rest.
    before = {name: p.detach().clone() for name, p in params.items()}
    for p in params.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert torch.equal(params["dino_head.last_layer.weight_v"], before["dino_head.last_layer.weight_v"])
    assert not torch.equal(params["backbone.blocks.0.attn.qkv.weight"], before["backbone.blocks.0.attn.qkv.weight"])


def test_clip_grad_norms_clips_each_module_separately_and_returns_pre_clip_norms():
    big, small, idle = nn.Linear(2, 1, bias=False), nn.Linear(1, 1, bias=False), nn.Linear(1, 1)
    big.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5
    small.weight.grad = torch.tensor([[0.5]])

    norms = clip_grad_norms({"big": big, "small": small, "idle": idle}, max_norm=1.0)

    assert norms == pytest.approx({"big": 5.0, "small": 0.5, "idle": 0.0})
    assert all(isinstance(value, float) for value in norms.values())
    torch.testing.assert_close(big.weight.grad, torch.tensor([[0.6, 0.8]]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small.weight.grad, torch.tensor([[0.5]]))  # under the limit: untouched


def test_clip_grad_norms_with_zero_max_norm_only_measures():
    layer = nn.Linear(2, 1, bias=False)
    layer.weight.grad = torch.tensor([[3.0, 4.0]])
    norms = clip_grad_norms({"layer": layer}, max_norm=0.0, return_tensors=True)
    assert isinstance(norms["layer"], torch.Tensor) and norms["layer"].item() == pytest.approx(5.0)
    assert torch.equal(layer.weight.grad, torch.tensor([[3.0, 4.0]]))


def test_ema_update_moves_teacher_towards_student():
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    teacher = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    old_teacher = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, momentum=0.9)
    for new, old, source in zip(teacher.parameters(), old_teacher, student.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * source)
    snapshot = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), snapshot, strict=True))


def test_ema_update_rejects_mismatched_modules_and_momentum():
    with pytest.raises(ValueError, match="parameters differ"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2), momentum=1.1)
