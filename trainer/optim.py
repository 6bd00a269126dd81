"""AdamW with DINOv2's per-parameter multipliers, per-module gradient clipping and the teacher EMA.

Parameter groups (recipe.md, "Optimiser and schedules"):

* layer-wise lr decay ``layerwise_decay ** (L + 1 - layer_id)`` with L backbone blocks: layer 0 is the patch
  embedding, position embedding and the cls/register/mask tokens; block i is layer i + 1 (flat ``blocks.i`` and
  chunked ``blocks.c.i`` names); the final norm and the heads are layer L + 1 (multiplier 1);
* ``patch_embed`` parameters get an extra ``patch_embed_lr_mult``;
* no weight decay on biases, norm weights and LayerScale gammas (every parameter with fewer than two dimensions);
* the heads' ``last_layer`` (prototypes) is flagged ``is_last_layer`` and follows ``last_layer_lr`` (0 at first).

Parameters with the same (lr multiplier, wd multiplier, is_last_layer) share one group, so a ViT-L has ~2 x 26
groups, not one per tensor. :func:`set_schedules` turns the scheduled values into each group's lr/weight decay.
Everything works unchanged on FSDP2-sharded modules (DTensor parameters and gradients).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.config import TrainConfig
from trainer.schedules import Schedules

__all__ = ["build_optimizer", "build_param_groups", "clip_grad_norms", "ema_update", "layer_id", "set_schedules"]

logger = logging.getLogger(__name__)

_EMBEDDING_NAMES = frozenset({"patch_embed", "pos_embed", "cls_token", "register_tokens", "mask_token"})
# Name components inserted by wrappers (torch.compile, activation checkpointing, FSDP1/DDP); not part of the model.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", "module"})
_INT = re.compile(r"^\d+$")


def _name_parts(name: str) -> list[str]:
    return [part for part in name.split(".") if part not in _WRAPPER_PARTS]


def layer_id(backbone_param_name: str, num_blocks: int) -> int:
    """Depth of a backbone parameter for layer-wise decay: 0 embeddings, i + 1 block i, ``num_blocks + 1`` the rest."""
    parts = _name_parts(backbone_param_name)
    if parts[0] in _EMBEDDING_NAMES:
        return 0
    if parts[0] == "blocks" and len(parts) > 1 and _INT.match(parts[1]):
        # Chunked checkpoints name block i "blocks.<chunk>.<i>" with i the global block index.
        block = parts[2] if len(parts) > 2 and _INT.match(parts[2]) else parts[1]
        return int(block) + 1
    return num_blocks + 1


def _num_blocks(backbone: nn.Module) -> int:
    num_blocks = getattr(backbone, "n_blocks", None)
    if num_blocks is not None:
        return int(num_blocks)
    ids = [layer_id(name, 0) for name, _ in backbone.named_parameters() if _name_parts(name)[0] == "blocks"]
    return max(ids, default=0)


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # Biases, LayerNorm weights and LayerScale gammas are all 1-D; the name checks keep the rule explicit.
    parts = _name_parts(name)
    return param.ndim < 2 or parts[-1] in ("bias", "gamma") or any(part.startswith("norm") for part in parts)


def _multipliers(
    module_key: str, name: str, param: torch.Tensor, *, num_blocks: int, config: TrainConfig
) -> tuple[float, float, bool]:
    """(lr multiplier, weight-decay multiplier, is_last_layer) of one parameter: its group key."""
    optim = config.optim
    depth = layer_id(name, num_blocks) if module_key == "backbone" else num_blocks + 1
    lr_mult = optim.layerwise_decay ** (num_blocks + 1 - depth)
    if module_key == "backbone" and _name_parts(name)[0] == "patch_embed":
        lr_mult *= optim.patch_embed_lr_mult
    wd_mult = 0.0 if _no_weight_decay(name, param) else 1.0
    is_last_layer = module_key != "backbone" and "last_layer" in _name_parts(name)
    return lr_mult, wd_mult, is_last_layer


def build_param_groups(student: nn.ModuleDict, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups of the student with ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer`` keys.

    Args:
        student: ``nn.ModuleDict`` with ``backbone``, ``dino_head`` and optionally ``ibot_head``; any other key is
            treated like a head (layer L + 1). Frozen parameters (``requires_grad=False``) are left out.
        config: reads ``optim.layerwise_decay`` and ``optim.patch_embed_lr_mult``.
    """
    if "backbone" not in student:
        raise ValueError(f"build_param_groups: student must have a 'backbone' module, got keys {list(student.keys())}")
    num_blocks = _num_blocks(student["backbone"])
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for module_key, module in student.items():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            key = _multipliers(module_key, name, param, num_blocks=num_blocks, config=config)
            if key not in groups:
                lr_mult, wd_mult, is_last_layer = key
                groups[key] = {
                    "params": [],
                    "lr_multiplier": lr_mult,
                    "wd_multiplier": wd_mult,
                    "is_last_layer": is_last_layer,
                }
            groups[key]["params"].append(param)
    logger.info("%d parameter groups over %d blocks", len(groups), num_blocks)
    return list(groups.values())


def set_schedules(optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float, last_layer_lr: float) -> None:
    """Set every group's lr and weight decay from the scheduled values and the group's multipliers."""
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]


def build_optimizer(student: nn.ModuleDict, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups` with ``optim.adamw_beta1/2``, set to the schedules at iteration 0.

    Uses the fused CUDA kernel when every parameter is on CUDA, else the foreach implementation.
    """
    groups = build_param_groups(student, config)
    on_cuda = all(p.device.type == "cuda" for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(
        groups,
        lr=0.0,
        betas=(config.optim.adamw_beta1, config.optim.adamw_beta2),
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )
    schedules = Schedules(config)
    set_schedules(
        optimizer, lr=schedules.lr(0), weight_decay=schedules.weight_decay(0), last_layer_lr=schedules.last_layer_lr(0)
    )
    return optimizer


def clip_grad_norms(
    modules: Mapping[str, nn.Module], max_norm: float, *, return_tensors: bool = False
) -> dict[str, float] | dict[str, torch.Tensor]:
    """Clip each module's gradients to ``max_norm`` separately; return each module's norm BEFORE clipping.

    ``max_norm <= 0`` only measures. Works with FSDP2 (DTensor gradients: the norm is reduced over the shards).
    A module without gradients reports 0.

    Args:
        modules: name -> module (e.g. ``{"backbone": ..., "dino_head": ..., "ibot_head": ...}``).
        max_norm: the recipe's 3.0 (``optim.clip_grad``).
        return_tensors: return 0-d tensors (no host synchronisation) instead of python floats (one sync in all).
    """
    norms: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            first = next(module.parameters(), None)
            norms[name] = torch.zeros((), device=first.device if first is not None else "cpu")
            continue
        total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # sum of the shards' squared norms: the same value on every rank
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        norms[name] = total
    if return_tensors:
        return norms
    if not norms:
        return {}
    device = next(iter(norms.values())).device
    values = torch.stack([norm.float().to(device) for norm in norms.values()]).tolist()  # the one host sync
    return dict(zip(norms, values, strict=True))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` over parameters with the same names.

    Both modules must have the same parameter names and be sharded the same way (FSDP2: each rank updates its
    local shards, no communication). One ``torch._foreach_lerp_`` over all tensors.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update momentum: invalid value {momentum!r}; allowed: 0 <= momentum <= 1")
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        missing = sorted(student_params.keys() - teacher_params.keys())[:5]
        extra = sorted(teacher_params.keys() - student_params.keys())[:5]
        raise ValueError(f"ema_update: teacher and student parameters differ (missing {missing}, extra {extra})")
    targets = [_local(teacher_params[name]) for name in student_params]
    sources = [_local(param.detach()) for param in student_params.values()]
    # lerp: t + (1 - m) (s - t), the EMA in one fused pass per tensor; exact no-op at momentum 1.
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)
