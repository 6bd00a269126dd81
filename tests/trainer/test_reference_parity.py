"""Parity with the public reference implementation (facebookresearch/dinov2, installed by scripts/setup.sh).

The same weights go into our modules and the reference's (strict state-dict loads both ways), the same inputs go
through both, and the outputs must agree to float32 tolerance: backbone features (also at another crop size, with
iBOT masks, in the chunked block layout, with SwiGLU), heads, the whole loss computation of a training step and whole
optimiser steps. bench/reference_dinov2.py composes the reference's modules exactly as its
``SSLMetaArch.forward_backward`` and ``train.py`` do (teacher views swapped, heads, Sinkhorn-Knopp or softmax
centering, DINO local/global terms, KoLeo per global crop, iBOT with per-crop weights, parameter groups, clipping,
EMA), with one student forward per crop size because the reference's list forward needs xformers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from bench.reference_dinov2 import (
    ReferenceLosses, ReferenceStep, ensure_process_group, import_reference, reference_backbone, reference_network,
)
from trainer.batches import random_batch
from trainer.config import resolve_config
from trainer.meta_arch import TrainStep, build_models, compute_losses
from trainer.models import DINOHead, build_backbone
from trainer.models.checkpoint_io import load_backbone_state_dict

# the reference (2023) uses torch APIs that now warn (nn.utils.weight_norm, torch.cuda.amp.autocast)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-5, msg=lambda m: f"{what}: {m}")


def _pair(ffn: str = "mlp", **sizes):
    torch.manual_seed(0)
    ours = build_backbone(
        "vit_pico", ffn=ffn, drop_path_rate=0.0, layerscale_init=0.5, **sizes
    ).eval()
    dim, depth, heads, _ = ours.config.resolved()
    ref = reference_backbone(
        img_size=ours.config.img_size, patch_size=ours.config.patch_size, embed_dim=dim, depth=depth,
        num_heads=heads, ffn=ffn,
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # our names and shapes ARE the reference's
    return ours, ref


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_backbone_features_equal_the_reference_at_native_and_other_crop_sizes(ffn):
    ours, ref = _pair(ffn, patch_size=4, img_size=32)
    torch.manual_seed(1)
    with torch.no_grad():
        for size in (32, 16, 24):  # native grid, then bicubic pos-embed interpolation to 4x4 and 6x6
            x = torch.randn(3, 3, size, size)
            grid = (size // 4) ** 2
            masks = torch.rand(3, grid) < 0.4
            for m in (None, masks):
                a, b = ours.forward_features(x, masks=m), ref.forward_features(x, masks=m)
                for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
                    _close(a[key], b[key], f"{ffn} {size}px masks={m is not None} {key}")
            # the packed forward of several crop sizes at once equals the reference's one forward per size
            packed = ours.forward_features_list([x, torch.randn(5, 3, 16, 16)], [masks, None])
            _close(packed[0]["x_norm_clstoken"], ref.forward_features(x, masks=masks)["x_norm_clstoken"], "packed")


def test_the_reference_chunked_layout_loads_into_our_backbone_with_equal_outputs():
    torch.manual_seed(0)
    ref = reference_backbone(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, block_chunks=2).eval()
    state = ref.state_dict()
    assert any(k.startswith("blocks.1.2.") for k in state)  # chunked: blocks.<chunk>.<block>.
    ours = build_backbone("vit_pico", patch_size=4, img_size=32, drop_path_rate=0.0).eval()
    load_backbone_state_dict(ours, state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(ours(x), ref(x), "chunked checkpoint")


def test_dino_head_equals_the_reference():
    dino_head = import_reference("dinov2.layers").DINOHead
    torch.manual_seed(0)
    ref = dino_head(in_dim=48, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    ours = DINOHead(48, 100, hidden_dim=64, bottleneck_dim=16)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(7, 48)
    _close(ours(x), ref(x), "DINO head")


@pytest.fixture
def single_process_group():
    # the reference's iBOT Sinkhorn all-reduces its patch count unconditionally: give it a (1-rank) group
    ensure_process_group(torch.device("cpu"))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("centering", ["sinkhorn", "softmax"])
@pytest.mark.parametrize("separate_ibot_head", [True, False])
def test_training_step_losses_and_gradients_equal_the_reference(centering, separate_ibot_head, single_process_group):
    config = resolve_config("tiny", overrides={
        "model.drop_path_rate": 0.0, "loss.centering": centering, "optim.global_batch_size": 8,
        "heads.ibot_separate_head": separate_ibot_head,
    })
    torch.manual_seed(0)
    models = build_models(config)
    ref_student, ref_teacher = reference_network(config, models.student), reference_network(config, models.teacher)
    ref_student.train()
    reference = ReferenceLosses(config)
    models.student.train()
    for step in range(2):  # the second step uses the centers the first one updated (softmax centering)
        batch = random_batch(config, 8, seed=10 + step)
        total, ours = compute_losses(models, batch, teacher_temp=0.05, config=config)
        theirs = reference(ref_student, ref_teacher, batch, 0.05)
        for name in ("dino_local", "dino_global", "ibot", "koleo", "total"):
            _close(ours[name], theirs[name].detach(), f"step {step} {centering} {name}")
        assert math.isfinite(total.item()) and total.item() > 0

    # one backward each: every student gradient agrees
    batch = random_batch(config, 8, seed=99)
    total, _ = compute_losses(models, batch, teacher_temp=0.05, config=config)
    total.backward()
    reference(ref_student, ref_teacher, batch, 0.05)["total"].backward()
    ref_params = dict(ref_student.named_parameters())
    for name, p in models.student.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_whole_steps_match_the_reference_step(single_process_group):
    """Optimiser groups (layer decay, patch-embed x0.2, no wd on norms/bias/gamma, last-layer freeze), per-module
    clipping and the teacher EMA: after 4 steps student and teacher weights agree with the reference's."""
    config = resolve_config("tiny", overrides={
        "model.drop_path_rate": 0.0, "optim.global_batch_size": 8, "optim.warmup_iterations": 2,
        "optim.freeze_last_layer_iterations": 2, "optim.momentum_teacher": 0.9,
    })
    torch.manual_seed(0)
    models = build_models(config)
    reference = ReferenceStep(models, config, torch.device("cpu"))
    ours = TrainStep(models, config)
    for it in range(4):
        batch = random_batch(config, 8, seed=it)
        mine, theirs = ours(batch, it), reference(batch, it)
        for name in ("dino_local", "dino_global", "ibot", "koleo", "total"):
            assert mine[f"loss/{name}"] == pytest.approx(theirs[f"loss/{name}"], rel=1e-4, abs=1e-5), (it, name)
    for mine_net, ref_net in ((models.student, reference.student), (models.teacher, reference.teacher)):
        ref_state = ref_net.state_dict()
        moved = 0
        for name, value in mine_net.state_dict().items():
            torch.testing.assert_close(value, ref_state[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        for name, value in models.student.state_dict().items():
            moved += int(not torch.equal(value, models.teacher.state_dict()[name]))
        assert moved > 10  # the steps moved the weights: the comparison is not of two untouched copies
