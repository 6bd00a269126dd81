"""Parity with the public reference implementation (facebookresearch/dinov2, installed by scripts/setup.sh).

The same weights go into our modules and the reference's (strict state-dict loads both ways), the same inputs go
through both, and the outputs must agree to float32 tolerance: backbone features (also at another crop size, with
iBOT masks, in the chunked block layout, with SwiGLU), heads, and the whole loss computation of a training step, which
is composed here from the reference's modules exactly as its ``SSLMetaArch.forward_backward`` composes them (teacher
views swapped, heads, Sinkhorn-Knopp or softmax centering, DINO local/global terms, KoLeo per global crop, iBOT with
per-crop weights), with one student forward per crop size because the reference's list forward needs xformers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import find_free_port
from tests.reference_dinov2 import import_reference, reference_backbone
from trainer.batches import random_batch
from trainer.config import resolve_config
from trainer.meta_arch import build_models, compute_losses
from trainer.models import DINOHead, build_backbone
from trainer.models.checkpoint_io import load_backbone_state_dict


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


def _reference_losses(models, batch, *, teacher_temp, config, ref_modules):
    """The loss computation of the reference's ``SSLMetaArch.forward_backward``, from its own modules."""
    ref_student, ref_teacher, dino_loss, ibot_loss, koleo = ref_modules
    global_crops, local_crops, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
    mask_indices, mask_weights = batch["mask_indices"], batch["mask_weights"]
    n_local = config.data.crops.num_local
    n_terms = 2 * (2 - 1) + max(n_local * 2, 1)
    with torch.no_grad():
        out = ref_teacher["backbone"](global_crops, is_training=True)
        cls = out["x_norm_clstoken"].chunk(2)
        cls = torch.cat((cls[1], cls[0]))  # swapped: student view A meets teacher view B
        patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
        t_dino, t_ibot = ref_teacher["dino_head"](cls), ref_teacher["ibot_head"](patches)
        if config.loss.centering == "sinkhorn":
            dino_t = dino_loss.sinkhorn_knopp_teacher(t_dino, teacher_temp=teacher_temp).view(2, -1, t_dino.shape[-1])
            ibot_t = ibot_loss.sinkhorn_knopp_teacher(
                t_ibot, teacher_temp=teacher_temp, n_masked_patches_tensor=torch.tensor([patches.shape[0]])
            )
        else:
            dino_t = dino_loss.softmax_center_teacher(t_dino, teacher_temp=teacher_temp).view(2, -1, t_dino.shape[-1])
            dino_loss.update_center(t_dino)
            ibot_t = ibot_loss.softmax_center_teacher(t_ibot.unsqueeze(0), teacher_temp=teacher_temp).squeeze(0)
            ibot_loss.update_center(t_ibot.unsqueeze(0))
    s_global = ref_student["backbone"](global_crops, masks=masks, is_training=True)
    s_local = ref_student["backbone"](local_crops, is_training=True)
    local_logits = ref_student["dino_head"](s_local["x_norm_clstoken"])
    global_logits = ref_student["dino_head"](s_global["x_norm_clstoken"])
    ibot_logits = ref_student["ibot_head"](s_global["x_norm_patchtokens"].flatten(0, 1)[mask_indices])
    losses = {
        "dino_local": dino_loss(local_logits.chunk(n_local), dino_t) / n_terms,
        "dino_global": dino_loss([global_logits], [dino_t.flatten(0, 1)]) * 2 / n_terms,
        "koleo": sum(koleo(p) for p in s_global["x_norm_clstoken"].chunk(2)),
        "ibot": ibot_loss.forward_masked(
            ibot_logits, ibot_t, student_masks_flat=masks, n_masked_patches=ibot_logits.shape[0],
            masks_weight=mask_weights,
        ) * 2 * 0.5,
    }
    return losses


@pytest.fixture
def single_process_group():
    # the reference's iBOT Sinkhorn all-reduces its patch count unconditionally: give it a (1-rank) group
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("centering", ["sinkhorn", "softmax"])
def test_training_step_losses_and_gradients_equal_the_reference(centering, single_process_group):
    ref_layers, ref_loss = import_reference("dinov2.layers"), import_reference("dinov2.loss")
    config = resolve_config(
        "tiny", overrides={"model.drop_path_rate": 0.0, "loss.centering": centering, "optim.global_batch_size": 8}
    )
    torch.manual_seed(0)
    models = build_models(config)
    dim, depth, heads, _ = config.model.resolved()
    h = config.heads

    def network(source):
        net = torch.nn.ModuleDict({
            "backbone": reference_backbone(
                img_size=config.model.img_size, patch_size=config.model.patch_size, embed_dim=dim, depth=depth,
                num_heads=heads,
            ),
            "dino_head": ref_layers.DINOHead(dim, h.dino_prototypes, hidden_dim=h.dino_hidden,
                                             bottleneck_dim=h.dino_bottleneck),
            "ibot_head": ref_layers.DINOHead(dim, h.ibot_prototypes, hidden_dim=h.ibot_hidden,
                                             bottleneck_dim=h.ibot_bottleneck),
        })
        net.load_state_dict(source.state_dict(), strict=True)
        return net.train()

    ref_student, ref_teacher = network(models.student), network(models.teacher)
    ref_modules = (
        ref_student, ref_teacher,
        ref_loss.DINOLoss(h.dino_prototypes, student_temp=config.loss.student_temp),
        ref_loss.iBOTPatchLoss(h.ibot_prototypes, student_temp=config.loss.student_temp),
        ref_loss.KoLeoLoss(),
    )
    models.student.train()
    for step in range(2):  # the second step uses the centers the first one updated (softmax centering)
        batch = random_batch(config, 8, seed=10 + step)
        total, ours = compute_losses(models, batch, teacher_temp=0.05, config=config)
        theirs = _reference_losses(models, batch, teacher_temp=0.05, config=config, ref_modules=ref_modules)
        for name, value in theirs.items():
            _close(ours[name], value.detach(), f"step {step} {centering} {name}")
        ref_total = (theirs["dino_local"] + theirs["dino_global"] + theirs["ibot"]
                     + config.loss.koleo_loss_weight * theirs["koleo"])
        _close(total.detach(), ref_total.detach(), f"step {step} total")
        assert math.isfinite(total.item()) and total.item() > 0

    # one backward each: every student gradient agrees
    models.student.zero_grad()
    ref_student.zero_grad()
    batch = random_batch(config, 8, seed=99)
    total, _ = compute_losses(models, batch, teacher_temp=0.05, config=config)
    theirs = _reference_losses(models, batch, teacher_temp=0.05, config=config, ref_modules=ref_modules)
    total.backward()
    (theirs["dino_local"] + theirs["dino_global"] + theirs["ibot"]
     + config.loss.koleo_loss_weight * theirs["koleo"]).backward()
    ref_grads = dict(ref_student.named_parameters())
    for name, p in models.student.named_parameters():
        if p.grad is None:
            assert ref_grads[name].grad is None or not ref_grads[name].grad.any(), name
            continue
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
