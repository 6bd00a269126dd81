"""The training step as a whole: determinism, packed == unpacked, NaN reporting, distillation, accumulation split."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.batches import random_batch
from trainer.config import ModelConfig, resolve_config
from trainer.meta_arch import NonFiniteLossError, TrainStep, build_models, compute_losses, split_batch

BATCH = 8


def _config(**overrides):
    return resolve_config("tiny", overrides={"optim.global_batch_size": BATCH, **overrides})


def _losses(config, steps: int, *, seed: int = 0) -> list[dict[str, float]]:
    torch.manual_seed(seed)
    models = build_models(config)
    step = TrainStep(models, config)
    return [step(random_batch(config, BATCH, seed=i), i) for i in range(steps)]


def test_same_seed_gives_bit_identical_losses_for_five_steps():
    config = _config()
    first, second = _losses(config, 5), _losses(config, 5)
    assert first == second  # exact float equality, every loss, grad norm and schedule value
    assert first[0]["loss/total"] != first[4]["loss/total"]  # and training actually moves


def test_teacher_starts_as_a_copy_of_the_student_and_follows_by_ema():
    config = _config(**{"optim.momentum_teacher": 0.5, "optim.momentum_teacher_end": 0.5})
    torch.manual_seed(0)
    models = build_models(config)
    for (name, s), (_, t) in zip(models.student.state_dict().items(), models.teacher.state_dict().items()):
        assert torch.equal(s, t), name
    before_teacher = {k: v.clone() for k, v in models.teacher.state_dict().items()}
    step = TrainStep(models, config)
    step(random_batch(config, BATCH, seed=0), 25)  # past warm-up and the last-layer freeze: every weight moves
    student = models.student.state_dict()
    name = "backbone.blocks.0.attn.qkv.weight"
    expected = 0.5 * before_teacher[name] + 0.5 * student[name]
    torch.testing.assert_close(models.teacher.state_dict()[name], expected, rtol=0, atol=1e-7)


def test_packed_forward_gives_the_same_losses_as_separate_forwards():
    config = _config(**{"model.drop_path_rate": 0.0})
    torch.manual_seed(0)
    models = build_models(config)
    batch = random_batch(config, BATCH, seed=3)
    packed, packed_parts = compute_losses(models, batch, teacher_temp=0.05, config=config, packed=True)
    separate, separate_parts = compute_losses(models, batch, teacher_temp=0.05, config=config, packed=False)
    for name in packed_parts:
        torch.testing.assert_close(packed_parts[name], separate_parts[name], rtol=1e-5, atol=1e-6)


def test_initial_dino_losses_match_log_k_fractions_with_uniform_student():
    # With zero prototype norms (weight_g) the student distribution is uniform, so every cross-entropy term is ln K and the
    # normalised DINO losses are (2L / (2L+2)) ln K (local) and (2 / (2L+2)) ln K (global).
    config = _config()
    torch.manual_seed(0)
    models = build_models(config)
    for head in ("dino_head", "ibot_head"):
        torch.nn.init.zeros_(models.student[head].last_layer.weight_g)
    _, parts = compute_losses(models, random_batch(config, BATCH, seed=0), teacher_temp=0.04, config=config)
    k, num_local = config.heads.dino_prototypes, config.data.crops.num_local
    terms = 2 * num_local + 2
    assert float(parts["dino_local"]) == pytest.approx(2 * num_local / terms * math.log(k), rel=1e-4)  # targets sum to 1 in float32
    assert float(parts["dino_global"]) == pytest.approx(2 / terms * math.log(k), rel=1e-4)  # targets sum to 1 in float32
    assert float(parts["ibot"]) == pytest.approx(math.log(config.heads.ibot_prototypes) / 2, rel=1e-4)


def test_nonfinite_loss_stops_with_iteration_and_breakdown():
    config = _config()
    torch.manual_seed(0)
    models = build_models(config)
    with torch.no_grad():
        models.student["backbone"].patch_embed.proj.weight.fill_(float("nan"))
    step = TrainStep(models, config)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration 7: .*dino_global=nan") as info:
        step(random_batch(config, BATCH, seed=0), 7)
    assert info.value.iteration == 7
    assert set(info.value.losses) >= {"dino_global", "dino_local", "ibot", "koleo", "total"}


def test_split_batch_keeps_crop_major_order_and_recomputes_mask_weights():
    config = _config()
    batch = random_batch(config, BATCH, seed=1)
    chunks = split_batch(batch, 2)
    half = BATCH // 2
    assert [c["sample_ids"] for c in chunks] == [batch["sample_ids"][:half], batch["sample_ids"][half:]]
    # crop-major: global crop 0 of images 0..3 then global crop 1 of images 0..3
    expected = torch.cat([batch["global_crops"][:half], batch["global_crops"][BATCH : BATCH + half]])
    assert torch.equal(chunks[0]["global_crops"], expected)
    for chunk in chunks:
        masks = chunk["masks"]
        assert chunk["mask_indices"].numel() == int(masks.sum())
        per_crop = masks.sum(1)
        crop_of = chunk["mask_indices"] // masks.shape[1]
        torch.testing.assert_close(chunk["mask_weights"], 1.0 / per_crop[crop_of].float())
    uneven = split_batch(batch, 3)  # 8 images: 3 + 3 + 2, contiguous, larger first
    ids = batch["sample_ids"]
    assert [c["sample_ids"] for c in uneven] == [ids[:3], ids[3:6], ids[6:]]
    assert torch.equal(uneven[2]["global_crops"], torch.cat([batch["global_crops"][6:8], batch["global_crops"][14:16]]))
    with pytest.raises(ValueError, match="cannot be split into 9 non-empty micro-batches"):
        split_batch(batch, 9)


def test_accumulated_step_trains_and_reports_the_same_loss_names():
    config = _config()
    torch.manual_seed(0)
    models = build_models(config)
    record = TrainStep(models, config, num_micro_batches=2)(random_batch(config, BATCH, seed=0), 0)
    assert {"loss/total", "loss/koleo", "grad_norm/backbone", "lr", "teacher_temp"} <= set(record)
    assert math.isfinite(record["loss/total"])


def test_distillation_freezes_teacher_and_keeps_student_ema():
    teacher_model = ModelConfig(arch="vit_pico", patch_size=4, img_size=32, depth=6, drop_path_rate=0.0)
    config = _config(**{"stage.kind": "distill", "stage.teacher_from": "/unused", "model.depth": 2})
    torch.manual_seed(0)
    models = build_models(config, teacher_model=teacher_model)
    assert models.distill and len(models.teacher["backbone"].blocks) == 6
    assert len(models.student["backbone"].blocks) == 2
    assert models.student["backbone"].blocks[0].drop_path_rate == 0.0  # no stochastic depth when distilling
    teacher_before = {k: v.clone() for k, v in models.teacher.state_dict().items()}
    ema_before = {k: v.clone() for k, v in models.student_ema.state_dict().items()}
    record = TrainStep(models, config)(random_batch(config, BATCH, seed=0), 30)
    assert "loss/koleo" not in record and math.isfinite(record["loss/ibot"])
    for name, value in models.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    changed = [n for n, v in models.student_ema.state_dict().items() if not torch.equal(v, ema_before[n])]
    assert changed  # the student EMA follows the student


def test_autocast_runs_backbones_in_bf16_and_heads_and_losses_in_float32():
    """One-GPU mixed precision (parallelize.autocast_dtype): backbone matmuls in bf16, heads in float32, same split
    as FSDP2's policies. CPU autocast has the same semantics, so the split is checked here."""
    config = _config()
    torch.manual_seed(0)
    models = build_models(config)
    batch = random_batch(config, BATCH, seed=0)
    seen: dict[str, set] = {}

    def record(name):
        return lambda module, args, out: seen.setdefault(name, set()).add(out.dtype)

    for net in ("student", "teacher"):
        getattr(models, net)["backbone"].blocks[0].mlp.fc1.register_forward_hook(record(f"{net}_block"))
        getattr(models, net)["dino_head"].register_forward_hook(record(f"{net}_head"))
    reference, _ = compute_losses(models, batch, teacher_temp=0.04, config=config)
    assert seen == {name: {torch.float32} for name in ("student_block", "teacher_block", "student_head", "teacher_head")}
    seen.clear()
    total, parts = compute_losses(models, batch, teacher_temp=0.04, config=config, autocast_dtype=torch.bfloat16)
    assert seen["student_block"] == seen["teacher_block"] == {torch.bfloat16}
    assert seen["student_head"] == seen["teacher_head"] == {torch.float32}
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
    assert total.item() != reference.item()  # it really ran in lower precision ...
    torch.testing.assert_close(total, reference, rtol=0.02, atol=0.02)  # ... and stays close
    total.backward()
    grads = [p.grad for p in models.student.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_train_step_passes_its_autocast_dtype_to_every_micro_batch():
    config = _config()
    torch.manual_seed(0)
    models = build_models(config)
    dtypes = set()
    models.student["backbone"].blocks[0].mlp.fc1.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    TrainStep(models, config, num_micro_batches=2, autocast_dtype=torch.bfloat16)(random_batch(config, BATCH, seed=0), 0)
    assert dtypes == {torch.bfloat16}
