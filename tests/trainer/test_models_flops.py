"""Analytic FLOPs against torch's FlopCounterMode on a real packed forward/backward, and against a hand count."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import CropConfig, ModelConfig
from trainer.models import build_backbone, model_flops_per_image


def counted_flops(config: ModelConfig, crops: CropConfig, *, backward: bool) -> int:
    """FLOPs torch counts while one image's crops run through the packed student forward (and backward)."""
    model = build_backbone(config)
    xs = [torch.randn(2, 3, crops.global_size, crops.global_size)]
    xs.append(torch.randn(crops.num_local, 3, crops.local_size, crops.local_size))
    # the math SDPA backend is made of bmm calls, which FlopCounterMode counts (the fused CPU kernel is not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        outputs = model.forward_features_list(xs)
        if backward:
            sum(out["x_prenorm"].sum() for out in outputs).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
@pytest.mark.parametrize("backward", [False, True])
def test_matches_flop_counter(ffn: str, backward: bool) -> None:
    config = ModelConfig(arch="vit_pico", depth=2, ffn=ffn, patch_size=4, img_size=32, num_register_tokens=2,
                         drop_path_rate=0.0, attention_backend="sdpa")
    crops = CropConfig(global_size=32, local_size=16, num_local=3)
    expected = counted_flops(config, crops, backward=backward)
    assert model_flops_per_image(config, crops, include_backward=backward) == expected


def test_hand_count_and_scaling() -> None:
    # D=96, L=4, p=4, 8 px crop: n=4 patches, s=5 tokens, MLP hidden 384
    config = ModelConfig(arch="vit_pico", patch_size=4, img_size=8)
    crops = CropConfig(global_size=8, local_size=4, num_local=0)
    per_block = 2 * (5 * 96 * 288 + 5 * 96 * 96 + 2 * 5 * 5 * 96 + 2 * 5 * 96 * 384)
    patch_embed = 2 * 4 * 48 * 96
    assert model_flops_per_image(config, crops, num_global=1, include_backward=False) == 4 * per_block + patch_embed
    assert model_flops_per_image(config, crops, num_global=1) == 3 * 4 * per_block + 2 * patch_embed
    with_locals = dataclasses.replace(crops, num_local=5)
    local_only = model_flops_per_image(config, with_locals, num_global=0)
    one_global = model_flops_per_image(config, crops, num_global=1)
    assert model_flops_per_image(config, with_locals) == 2 * one_global + local_only
