"""The DINOv2 meta-architecture: student and teacher networks, the loss computation and one training step.

Models stay single-device code: this module builds plain ``nn.ModuleDict``s (``backbone``, ``dino_head`` and, when
untied, ``ibot_head``); :mod:`trainer.parallelize` shards them afterwards. One training step is

1. teacher forward on the two global crops only (no grad) -> centred targets (softmax EMA center or Sinkhorn-Knopp),
2. ONE packed student forward over global (masked) and local crops,
3. DINO (18-term) + iBOT (masked patches) + KoLeo losses, one backward,
4. per-module gradient clipping, AdamW step with scheduled lr / wd, teacher EMA.

Distillation (``stage.kind == distill``) swaps the EMA teacher for a frozen, larger one, trains the student without
masking or stochastic depth, and keeps an EMA of the student (``student_ema``) as the final model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from trainer.config import ModelConfig, TrainConfig, split_sizes
from trainer.distributed import all_reduce_sum, get_world_size
from trainer.losses.centering import SoftmaxCenter, sinkhorn_knopp
from trainer.losses.dino import dino_cross_entropy
from trainer.losses.ibot import ibot_masked_loss
from trainer.losses.koleo import koleo_loss
from trainer.masking import mask_weights_and_indices
from trainer.models import DINOHead, build_backbone
from trainer.optim import build_optimizer, clip_grad_norms, ema_update, set_schedules
from trainer.schedules import Schedules

logger = logging.getLogger(__name__)

__all__ = [
    "NonFiniteLossError",
    "SSLModels",
    "TrainStep",
    "build_centers",
    "build_models",
    "compute_losses",
    "select_images",
    "split_batch",
]


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss: carries the iteration and the full loss breakdown so the run can be diagnosed."""

    def __init__(self, iteration: int, losses: dict[str, float]) -> None:
        self.iteration, self.losses = iteration, losses
        detail = ", ".join(f"{k}={v:.6g}" for k, v in losses.items())
        super().__init__(f"non-finite loss at iteration {iteration}: {detail}")


def _build_network(model: ModelConfig, config: TrainConfig, *, drop_path_rate: float) -> nn.ModuleDict:
    backbone = build_backbone(model, drop_path_rate=drop_path_rate)
    heads = config.heads
    net = nn.ModuleDict({"backbone": backbone})
    net["dino_head"] = DINOHead(
        backbone.embed_dim, heads.dino_prototypes, heads.dino_hidden, heads.dino_bottleneck, heads.num_layers
    )
    if heads.ibot_separate_head:
        net["ibot_head"] = DINOHead(
            backbone.embed_dim, heads.ibot_prototypes, heads.ibot_hidden, heads.ibot_bottleneck, heads.num_layers
        )
    return net


@dataclass
class SSLModels:
    """Everything with weights: ``student`` is trained; ``teacher`` gives targets; ``student_ema`` only in distill."""

    student: nn.ModuleDict
    teacher: nn.ModuleDict
    centers: nn.ModuleDict
    student_ema: nn.ModuleDict | None = None

    @property
    def distill(self) -> bool:
        return self.student_ema is not None


def build_models(config: TrainConfig, *, teacher_model: ModelConfig | None = None) -> SSLModels:
    """Build student, teacher and centering state on the current default device (meta works too).

    Pretraining/highres: the teacher is an exact copy of the student without stochastic depth.
    Distill: the teacher is built from ``teacher_model`` (weights are loaded by the caller) and frozen.
    """
    distill = config.stage.kind == "distill"
    student_drop = 0.0 if distill else config.model.drop_path_rate  # recipe: no stochastic depth when distilling
    student = _build_network(config.model, config, drop_path_rate=student_drop)
    if distill:
        if teacher_model is None:
            raise ValueError("stage.teacher_model: a distill stage needs the teacher architecture")
        teacher = _build_network(teacher_model, config, drop_path_rate=0.0)
        student_ema = copy.deepcopy(student)
    else:
        teacher = _build_network(config.model, config, drop_path_rate=0.0)
        teacher.load_state_dict(student.state_dict())
        student_ema = None
    for param in teacher.parameters():
        param.requires_grad_(False)
    if student_ema is not None:
        for param in student_ema.parameters():
            param.requires_grad_(False)
    return SSLModels(student=student, teacher=teacher, centers=build_centers(config), student_ema=student_ema)


def build_centers(config: TrainConfig) -> nn.ModuleDict:
    """The softmax centering state of the DINO and iBOT targets (buffers only; unused with Sinkhorn-Knopp)."""
    return nn.ModuleDict(
        {
            "dino": SoftmaxCenter(config.heads.dino_prototypes, momentum=config.loss.center_momentum),
            "ibot": SoftmaxCenter(
                config.heads.ibot_prototypes if config.heads.ibot_separate_head else config.heads.dino_prototypes,
                momentum=config.loss.center_momentum,
            ),
        }
    )


def _ibot_head(net: nn.ModuleDict) -> nn.Module:
    return net["ibot_head"] if "ibot_head" in net else net["dino_head"]


def _backbone_precision(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for a backbone forward (``dtype`` None: as the parameters are; see ``parallelize.autocast_dtype``).
    Only the backbone: callers hand the heads float32 tokens, so heads and losses run in float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _teacher_targets(
    models: SSLModels, batch: dict[str, Any], teacher_temp: float, config: TrainConfig,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred teacher distributions for the DINO (global CLS) and iBOT (masked patch) losses."""
    teacher = models.teacher
    with _backbone_precision(autocast_dtype, batch["global_crops"].device):
        out = teacher["backbone"].forward_features(batch["global_crops"])
    cls = out["x_norm_clstoken"].float()  # [2B, D], crop-major
    patches = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]].float()  # [M, D]
    num_global = cls.shape[0]
    if "ibot_head" in teacher:
        dino_logits = teacher["dino_head"](cls)
        ibot_logits = teacher["ibot_head"](patches)
    else:  # one head call for both: cheaper and what the shared-head recipe does
        logits = teacher["dino_head"](torch.cat([cls, patches]))
        dino_logits, ibot_logits = logits[:num_global], logits[num_global:]
    # (the swap of the two global views happens inside dino_cross_entropy)
    if config.loss.centering == "sinkhorn":
        dino_probs = sinkhorn_knopp(dino_logits.float(), teacher_temp, config.loss.sinkhorn_iterations)
        ibot_probs = sinkhorn_knopp(ibot_logits.float(), teacher_temp, config.loss.sinkhorn_iterations)
    else:
        dino_probs = models.centers["dino"].probs(dino_logits.float(), teacher_temp)
        ibot_probs = models.centers["ibot"].probs(ibot_logits.float(), teacher_temp)
        models.centers["dino"].update(dino_logits.float())
        models.centers["ibot"].update(ibot_logits.float())
    return dino_probs.unflatten(0, (2, -1)), ibot_probs


def _all_patches(batch: dict[str, Any]) -> dict[str, Any]:
    """Distillation: the student is not masked and iBOT matches every patch of the global crops (weight 1/N)."""
    num_crops, num_patches = batch["masks"].shape
    device = batch["masks"].device
    return {
        **batch,
        "mask_indices": torch.arange(num_crops * num_patches, device=device),
        "mask_weights": torch.full((num_crops * num_patches,), 1.0 / num_patches, device=device),
    }


def compute_losses(
    models: SSLModels, batch: dict[str, Any], *, teacher_temp: float, config: TrainConfig, packed: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss (to backpropagate) and its named components (detached), for one (micro-)batch.

    ``packed=False`` runs one student forward per crop size instead of the packed forward (the benchmark baseline).
    ``autocast_dtype``: the backbones' forwards run under autocast to it, the heads and losses in float32.
    """
    loss_cfg = config.loss
    if models.distill:
        batch = _all_patches(batch)
    with torch.no_grad():
        dino_targets, ibot_targets = _teacher_targets(models, batch, teacher_temp, config, autocast_dtype)

    student = models.student
    global_crops, local_crops = batch["global_crops"], batch["local_crops"]
    student_masks = None if models.distill else batch["masks"]
    crops = [global_crops] + ([local_crops] if local_crops.numel() else [])
    crop_masks = [student_masks] + [None] * (len(crops) - 1)
    with _backbone_precision(autocast_dtype, global_crops.device):
        if packed:
            outputs = student["backbone"].forward_features_list(crops, crop_masks)
        else:
            outputs = [student["backbone"].forward_features(x, masks=m) for x, m in zip(crops, crop_masks)]
    # heads in float32 (as FSDP2's head policy does); a no-op for float32 tokens
    global_cls = outputs[0]["x_norm_clstoken"].float()  # [2B, D]
    masked_patches = outputs[0]["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]].float()  # [M, D]
    cls_tokens = torch.cat([global_cls] + ([outputs[1]["x_norm_clstoken"].float()] if len(crops) > 1 else []))

    num_global = global_cls.shape[0]
    batch_size = num_global // 2
    if "ibot_head" in student:
        cls_logits = student["dino_head"](cls_tokens)
        ibot_logits = student["ibot_head"](masked_patches)
    else:
        logits = student["dino_head"](torch.cat([cls_tokens, masked_patches]))
        cls_logits, ibot_logits = logits[: cls_tokens.shape[0]], logits[cls_tokens.shape[0] :]
    student_global = cls_logits[:num_global].unflatten(0, (2, batch_size))
    student_local = cls_logits[num_global:].unflatten(0, (-1, batch_size)) if len(crops) > 1 else None

    dino_global, dino_local = dino_cross_entropy(
        student_global.float(), None if student_local is None else student_local.float(), dino_targets,
        loss_cfg.student_temp,
    )
    ibot = ibot_masked_loss(
        ibot_logits.float(), ibot_targets, batch["mask_weights"], num_global, loss_cfg.student_temp
    )
    parts = {"dino_global": dino_global, "dino_local": dino_local, "ibot": ibot}
    total = loss_cfg.dino_loss_weight * (dino_global + dino_local) + loss_cfg.ibot_loss_weight * ibot
    if loss_cfg.koleo_loss_weight > 0 and not models.distill:
        koleo = sum(koleo_loss(chunk) for chunk in global_cls.float().chunk(2))
        parts["koleo"] = koleo
        total = total + loss_cfg.koleo_loss_weight * koleo
    parts["total"] = total
    return total, {name: value.detach() for name, value in parts.items()}


def select_images(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Images ``[start, stop)`` of a crop-major batch, as a crop-major batch (mask indices and weights recomputed)."""
    batch_size = len(batch["sample_ids"])
    sl = slice(start, stop)

    def crop_major(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(0, (-1, batch_size))[:, sl].flatten(0, 1)

    masks = crop_major(batch["masks"])
    indices, weights = mask_weights_and_indices(masks)
    return {
        "sample_ids": batch["sample_ids"][sl],
        "global_crops": crop_major(batch["global_crops"]),
        "local_crops": crop_major(batch["local_crops"]) if batch["local_crops"].numel() else batch["local_crops"],
        "masks": masks,
        "mask_indices": torch.as_tensor(indices, device=masks.device),
        "mask_weights": torch.as_tensor(weights, device=masks.device, dtype=torch.float32),
        "labels": batch["labels"][sl] if batch.get("labels") is not None else None,
        "num_bad_samples": 0,
    }


def split_batch(batch: dict[str, Any], num_chunks: int) -> list[dict[str, Any]]:
    """Split a crop-major batch into ``num_chunks`` contiguous micro-batches (gradient accumulation) whose sizes differ
    by at most one (the larger first), keeping crop-major order inside each."""
    if num_chunks == 1:
        return [batch]
    batch_size = len(batch["sample_ids"])
    if not 1 <= num_chunks <= batch_size:
        raise ValueError(f"a batch of {batch_size} images cannot be split into {num_chunks} non-empty micro-batches")
    chunks, start = [], 0
    for size in split_sizes(batch_size, num_chunks):
        chunks.append(select_images(batch, start, start + size))
        start += size
    return chunks


class TrainStep:
    """One optimiser step: losses, backward, clipping, AdamW with scheduled lr/wd, EMA. Checkpointable position."""

    def __init__(
        self, models: SSLModels, config: TrainConfig, *, num_micro_batches: int = 1, packed: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        """``autocast_dtype``: see :func:`compute_losses` (``parallelize.autocast_dtype`` picks it for a run)."""
        self.models, self.config, self.num_micro_batches, self.packed = models, config, num_micro_batches, packed
        self.autocast_dtype = autocast_dtype
        self.schedules = Schedules(config)
        self.optimizer = build_optimizer(models.student, config)

    def _clip_modules(self) -> dict[str, nn.Module]:
        return {name: module for name, module in self.models.student.items()}

    def accumulate_gradients(self, batch: dict[str, Any], *, teacher_temp: float) -> dict[str, float]:
        """Forward and backward of this rank's share of one global batch (its micro-batches in turn), adding to the
        student's gradients; returns the global batch's losses (the same on every rank).

        After the gradient reduction (FSDP2's reduce-scatter averages over ranks) the gradients are those of the
        full global batch in one process, whatever the shares: each micro-batch's loss is weighted by its share of
        the global batch. ``tests/trainer/test_elastic.py`` checks it at uneven shares.
        """
        micros = split_batch(batch, self.num_micro_batches)
        # Every loss term is a mean over the images of a micro-batch on one rank, and the recipe's losses are means over
        # the GLOBAL batch: a micro-batch of n of the N images counts n / N, times W in the backward because the
        # gradient reduction averages over the W ranks. With equal shares that is the usual 1 / (micro-batches per
        # rank). N is all-reduced (on the batch's device, no host sync) rather than read from the config, so a
        # caller's batch size can never be silently mis-weighted.
        sizes = [len(m["sample_ids"]) for m in micros]
        device = batch["global_crops"].device
        global_images = all_reduce_sum(torch.tensor([float(sum(sizes))], device=device))
        world_size = get_world_size()
        totals: dict[str, torch.Tensor] = {}
        for micro, size in zip(micros, sizes):
            share = size / global_images  # [1] tensor: this micro-batch's fraction of the global batch
            loss, parts = compute_losses(
                self.models, micro, teacher_temp=teacher_temp, config=self.config, packed=self.packed,
                autocast_dtype=self.autocast_dtype,
            )
            (loss * (share[0] * world_size)).backward()
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + value * share[0]

        # The global batch's losses: every rank's share-weighted sum, added up over ranks (one all-reduce, one host
        # sync). Every rank sees the same values, so a non-finite loss stops every rank at the same step.
        names = sorted(totals)
        packed_losses = all_reduce_sum(torch.stack([totals[name].float() for name in names]))
        return dict(zip(names, packed_losses.tolist()))

    def __call__(self, batch: dict[str, Any], iteration: int) -> dict[str, float]:
        sched = self.schedules
        lr, wd = sched.lr(iteration), sched.weight_decay(iteration)
        momentum, teacher_temp = sched.teacher_momentum(iteration), sched.teacher_temp(iteration)
        set_schedules(self.optimizer, lr=lr, weight_decay=wd, last_layer_lr=sched.last_layer_lr(iteration))
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.accumulate_gradients(batch, teacher_temp=teacher_temp)
        if not all(math.isfinite(v) for v in losses.values()):
            raise NonFiniteLossError(iteration, losses)

        grad_norms = clip_grad_norms(self._clip_modules(), self.config.optim.clip_grad)
        self.optimizer.step()
        with torch.no_grad():
            if self.models.distill:
                ema_update(self.models.student_ema, self.models.student, momentum)
            else:
                ema_update(self.models.teacher, self.models.student, momentum)
        record: dict[str, float] = {f"loss/{k}": v for k, v in losses.items()}
        record.update({f"grad_norm/{k}": float(v) for k, v in grad_norms.items()})
        record.update(lr=lr, weight_decay=wd, teacher_momentum=momentum, teacher_temp=teacher_temp)
        return record
