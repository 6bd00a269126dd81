"""The public reference implementation (facebookresearch/dinov2, PyPI ``dinov2==0.0.1.dev2``) driven from here.

``scripts/setup.sh`` installs it without its dependencies (its metadata pins torch 2.0 and xformers 0.0.18) into
``.venv/reference``; only the parity tests (tests/trainer/test_reference_parity.py) and ``bench/train_step.py``
put that directory on sys.path. Nothing of it is copied into this project: its own classes and functions run.

:class:`ReferenceStep` is the reference's training step (``SSLMetaArch.forward_backward`` + the optimiser part of
``dinov2/train/train.py``) assembled from the reference's modules: its backbone (with its efficient stochastic depth
above a 0.1 drop rate), its heads, ``DINOLoss`` / ``iBOTPatchLoss`` / ``KoLeoLoss``, its parameter groups, AdamW,
per-module clipping and the ``_foreach`` teacher EMA. The one change: the reference's student forward over the list
``[global crops, local crops]`` needs xformers (nested tensors); where xformers is missing (any CPU) the student runs
one forward per crop size instead, which is what its list forward computes.
"""

from __future__ import annotations

import importlib
import sys
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import TrainConfig
from trainer.meta_arch import SSLModels
from trainer.schedules import Schedules

REFERENCE_DIR = Path(__file__).resolve().parents[1] / ".venv" / "reference"
REFERENCE_VERSION = "dinov2==0.0.1.dev2"


def import_reference(module: str = "dinov2") -> ModuleType:
    """Import ``module`` from the reference package; a clear error when scripts/setup.sh has not installed it."""
    if not (REFERENCE_DIR / "dinov2").is_dir():
        raise RuntimeError(
            f"the DINOv2 reference implementation is not installed in {REFERENCE_DIR}; run scripts/setup.sh "
            f"(it runs: .venv/bin/pip install --no-deps --target .venv/reference {REFERENCE_VERSION})"
        )
    if str(REFERENCE_DIR) not in sys.path:
        sys.path.insert(0, str(REFERENCE_DIR))
    return importlib.import_module(module)


def xformers_available() -> bool:
    try:
        importlib.import_module("xformers.ops")
    except ImportError:
        return False
    return True


def reference_backbone(
    *, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, ffn: str = "mlp",
    init_values: float = 1.0, block_chunks: int = 0, drop_path_rate: float = 0.0,
) -> nn.Module:
    """The reference ``DinoVisionTransformer`` as its ``vit_*`` factories build it, with explicit sizes."""
    vit = import_reference("dinov2.models.vision_transformer")
    layers = import_reference("dinov2.layers")
    return vit.DinoVisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        init_values=init_values,
        block_fn=partial(layers.NestedTensorBlock, attn_class=layers.MemEffAttention),
        ffn_layer="swiglufused" if ffn == "swiglu" else "mlp",
        drop_path_rate=drop_path_rate,
        drop_path_uniform=True,  # ssl_default_config.yaml
        block_chunks=block_chunks,
    )


def reference_network(config: TrainConfig, source: nn.Module | None = None, *, drop_path_rate: float = 0.0) -> nn.ModuleDict:
    """Reference backbone + heads for ``config`` (iBOT head only when separate), optionally loaded from ``source``."""
    layers = import_reference("dinov2.layers")
    dim, depth, heads, ffn = config.model.resolved()
    h = config.heads
    modules: dict[str, nn.Module] = {
        "backbone": reference_backbone(
            img_size=config.model.img_size, patch_size=config.model.patch_size, embed_dim=dim, depth=depth,
            num_heads=heads, ffn=ffn, init_values=config.model.layerscale_init, drop_path_rate=drop_path_rate,
        ),
        "dino_head": layers.DINOHead(dim, h.dino_prototypes, nlayers=h.num_layers, hidden_dim=h.dino_hidden,
                                     bottleneck_dim=h.dino_bottleneck),
    }
    if h.ibot_separate_head:
        modules["ibot_head"] = layers.DINOHead(dim, h.ibot_prototypes, nlayers=h.num_layers,
                                               hidden_dim=h.ibot_hidden, bottleneck_dim=h.ibot_bottleneck)
    net = nn.ModuleDict(modules)
    if source is not None:
        net.load_state_dict(source.state_dict(), strict=True)  # our names and shapes are the reference's
    return net


class ReferenceLosses:
    """The loss part of the reference's ``SSLMetaArch.forward_backward`` (its modules, its order, its scales)."""

    def __init__(self, config: TrainConfig) -> None:
        loss = import_reference("dinov2.loss")
        h, c = config.heads, config.loss
        self.config = config
        self.dino = loss.DINOLoss(h.dino_prototypes, student_temp=c.student_temp, center_momentum=c.center_momentum)
        ibot_dim = h.ibot_prototypes if h.ibot_separate_head else h.dino_prototypes
        self.ibot = loss.iBOTPatchLoss(ibot_dim, student_temp=c.student_temp, center_momentum=c.center_momentum)
        self.koleo = loss.KoLeoLoss()

    def to(self, device: torch.device) -> "ReferenceLosses":
        self.dino.to(device)
        self.ibot.to(device)
        return self

    def __call__(
        self, student: nn.ModuleDict, teacher: nn.ModuleDict, batch: dict[str, Any], teacher_temp: float,
        *, list_forward: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Named losses: ``dino_local``, ``dino_global``, ``koleo`` (unweighted), ``ibot``; ``total`` weighted."""
        cfg = self.config
        global_crops, local_crops, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
        mask_indices, mask_weights = batch["mask_indices"], batch["mask_weights"]
        n_local = local_crops.shape[0] // (global_crops.shape[0] // 2)
        n_terms = 2 * (2 - 1) + max(n_local * 2, 1)
        separate = "ibot_head" in teacher
        with torch.no_grad():
            out = teacher["backbone"](global_crops, is_training=True)
            cls = out["x_norm_clstoken"].chunk(2)
            cls = torch.cat((cls[1], cls[0]))  # swapped: student view A meets teacher view B
            patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
            if separate:
                t_dino, t_ibot = teacher["dino_head"](cls), teacher["ibot_head"](patches)
            else:
                both = teacher["dino_head"](torch.cat([cls, patches]))
                t_dino, t_ibot = both[: cls.shape[0]], both[cls.shape[0]:]
            if cfg.loss.centering == "sinkhorn":
                dino_t = self.dino.sinkhorn_knopp_teacher(t_dino, teacher_temp=teacher_temp)
                ibot_t = self.ibot.sinkhorn_knopp_teacher(
                    t_ibot, teacher_temp=teacher_temp,
                    n_masked_patches_tensor=torch.tensor([patches.shape[0]], device=patches.device),
                )
            else:
                dino_t = self.dino.softmax_center_teacher(t_dino, teacher_temp=teacher_temp)
                self.dino.update_center(t_dino)
                ibot_t = self.ibot.softmax_center_teacher(t_ibot.unsqueeze(0), teacher_temp=teacher_temp).squeeze(0)
                self.ibot.update_center(t_ibot.unsqueeze(0))
            dino_t = dino_t.view(2, -1, t_dino.shape[-1])
        if list_forward:  # the reference's own packed path (xformers nested tensors)
            s_global, s_local = student["backbone"]([global_crops, local_crops], masks=[masks, None],
                                                    is_training=True)
        else:
            s_global = student["backbone"](global_crops, masks=masks, is_training=True)
            s_local = student["backbone"](local_crops, is_training=True)
        s_patches = s_global["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
        local_logits = student["dino_head"](s_local["x_norm_clstoken"])
        global_logits = student["dino_head"](s_global["x_norm_clstoken"])
        ibot_logits = (student["ibot_head"] if separate else student["dino_head"])(s_patches)
        losses = {
            "dino_local": self.dino(local_logits.chunk(n_local), dino_t) / n_terms,
            "dino_global": self.dino([global_logits], [dino_t.flatten(0, 1)]) * 2 / n_terms,
            "koleo": sum(self.koleo(p) for p in s_global["x_norm_clstoken"].chunk(2)),
            # x 2 (loss_scales) x 1/2 (ibot_loss_scale), as the reference writes it
            "ibot": self.ibot.forward_masked(
                ibot_logits, ibot_t, student_masks_flat=masks, n_masked_patches=ibot_logits.shape[0],
                masks_weight=mask_weights,
            ) * 2 * 0.5,
        }
        c = cfg.loss
        losses["total"] = (
            c.dino_loss_weight * (losses["dino_local"] + losses["dino_global"])
            + c.ibot_loss_weight * losses["ibot"] + c.koleo_loss_weight * losses["koleo"]
        )
        return losses


def ensure_process_group(device: torch.device) -> None:
    """The reference's iBOT Sinkhorn-Knopp all-reduces its patch count unconditionally: give it a 1-rank group."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class ReferenceStep:
    """The reference's whole training step, initialised from the same weights as ``models``."""

    def __init__(self, models: SSLModels, config: TrainConfig, device: torch.device) -> None:
        param_groups = import_reference("dinov2.utils.param_groups")
        if config.loss.centering == "sinkhorn":
            ensure_process_group(device)
        self.config, self.device = config, device
        self.student = reference_network(config, models.student, drop_path_rate=config.model.drop_path_rate).to(device)
        self.teacher = reference_network(config, models.teacher).to(device)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.student.train()
        self.teacher.eval()
        self.losses = ReferenceLosses(config).to(device)
        groups = []
        for module in self.student.values():  # SSLMetaArch.get_params_groups
            fused = param_groups.fuse_params_groups(param_groups.get_params_groups_with_decay(
                module, lr_decay_rate=config.optim.layerwise_decay,
                patch_embed_lr_mult=config.optim.patch_embed_lr_mult,
            ))
            for g in fused:
                g["foreach"] = True
            groups += fused
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
        self.schedules = Schedules(config)
        self.list_forward = device.type == "cuda" and xformers_available()
        self.student_params = [p for p in self.student.parameters()]
        self.teacher_params = [p for p in self.teacher.parameters()]

    def __call__(self, batch: dict[str, Any], iteration: int) -> dict[str, float]:
        s = self.schedules
        lr, wd, last_lr = s.lr(iteration), s.weight_decay(iteration), s.last_layer_lr(iteration)
        for g in self.optimizer.param_groups:  # train.py apply_optim_scheduler
            g["weight_decay"] = wd * g["wd_multiplier"]
            g["lr"] = (last_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.losses(self.student, self.teacher, batch, s.teacher_temp(iteration),
                             list_forward=self.list_forward)
        losses["total"].backward()
        for module in self.student.values():
            nn.utils.clip_grad_norm_(module.parameters(), self.config.optim.clip_grad)
        self.optimizer.step()
        m = s.teacher_momentum(iteration)
        with torch.no_grad():  # SSLMetaArch.update_teacher
            torch._foreach_mul_(self.teacher_params, m)
            torch._foreach_add_(self.teacher_params, self.student_params, alpha=1 - m)
        return {f"loss/{k}": float(v.detach()) for k, v in losses.items()}
