"""The public reference implementation (facebookresearch/dinov2, PyPI ``dinov2==0.0.1.dev2``) driven from here.

``scripts/setup.sh`` installs it without its dependencies (its metadata pins torch 2.0 and xformers 0.0.18) into
``.venv/reference``; only the parity tests (tests/trainer/test_reference_parity.py) and ``bench/train_step.py``
put that directory on sys.path. Nothing of it is copied into this project: its own classes and functions run.

:class:`ReferenceStep` is the reference's own training iteration: its ``SSLMetaArch`` (built by its constructor from
its default config, ``ssl_default_config.yaml``, with our config's values mapped onto it by :func:`reference_config`
and its own sqrt batch-scaling rule), its ``build_optimizer(cfg, SSLMetaArch.get_params_groups())``, its
``build_schedulers(cfg)``, and per iteration the body of its ``do_train`` loop: ``apply_optim_scheduler``,
``forward_backward`` (teacher, packed list forward of the student, heads, losses, backward), per-module clipping,
``optimizer.step()`` and ``update_teacher``. What it needs that a CPU (or this project's environment) lacks comes from
stand-ins, installed by :func:`reference_training_code` only for the names that are missing:

* xformers, which its training code requires (``bench/reference_standins.py``: block-diagonal attention
  through PyTorch SDPA, ``scaled_index_add``, ``index_select_cat``); on CUDA a real xformers is used when installed;
* fvcore and omegaconf, imported by ``dinov2.train`` but not used by a step (import-time stand-ins);
* FSDP: ``do_train`` clips with each FSDP unit's ``clip_grad_norm_`` and ``update_teacher`` walks the FSDP units'
  parameters. FSDP needs an accelerator, and on one rank without sharding a unit is its module: the clip is
  ``nn.utils.clip_grad_norm_`` over the module (the same norm and ``max / (norm + 1e-6)`` factor), and the
  ``get_fsdp_modules`` that ``update_teacher`` calls yields one unit per module holding all its parameters;
* ``forward_backward`` moves its inputs with ``.cuda()``: the batch's tensors are handed over in a wrapper whose
  ``.cuda()`` returns the tensor where it already is.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import TrainConfig
from trainer.meta_arch import SSLModels

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


def ensure_process_group(device: torch.device) -> None:
    """The reference's iBOT Sinkhorn-Knopp all-reduces its patch count unconditionally: give it a 1-rank group."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


# ---- the reference's own training iteration --------------------------------------------------------------------------

_REFERENCE_VITS = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16),
                   "vit_giant2": (1536, 40, 24)}
"""(embed dim, depth, heads) of the reference's ``vit_*`` factories."""


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: a stand-in without __spec__ is in sys.modules
        return False


def _standins() -> ModuleType:
    """bench/reference_standins.py (imported lazily: only the reference's own training step needs it)."""
    return importlib.import_module("bench.reference_standins")


@contextmanager
def reference_training_code(device: torch.device) -> Iterator[SimpleNamespace]:
    """Import the reference's training code, with stand-ins (see the module docstring) for the missing packages.

    Yields the modules used here: ``meta_arch`` (``dinov2.train.ssl_meta_arch``), ``train`` (``dinov2.train.train``),
    ``configs``, ``config`` (``dinov2.utils.config``), ``vits``, ``collate``, ``masking``, and ``xformers``
    ("xformers" or "stand-in"). The reference is imported afresh inside, because its modules decide at import time
    whether xformers is there; on exit ``sys.modules`` is as before, so the reference the other parity tests import
    (without xformers) is untouched. Objects built inside keep working afterwards.
    """
    standins = _standins()
    injected: dict[str, ModuleType] = {}
    for package, entries in standins.modules().items():
        if package == "xformers":  # its kernels are CUDA kernels: a CPU always gets the stand-in
            real = device.type == "cuda" and _importable("xformers.ops")
        else:
            real = _importable(package)
        if not real:
            injected.update(entries)
    replaced = {"dinov2"} | {name.split(".")[0] for name in injected}

    def swapped(name: str) -> bool:
        return name.split(".")[0] in replaced

    saved = {name: module for name, module in sys.modules.items() if swapped(name)}
    for name in saved:
        del sys.modules[name]
    sys.modules.update(injected)
    try:
        yield SimpleNamespace(
            meta_arch=import_reference("dinov2.train.ssl_meta_arch"),
            train=import_reference("dinov2.train.train"),
            configs=import_reference("dinov2.configs"),
            config=import_reference("dinov2.utils.config"),
            vits=import_reference("dinov2.models.vision_transformer"),
            collate=import_reference("dinov2.data.collate"),
            masking=import_reference("dinov2.data.masking"),
            xformers="stand-in" if "xformers" in injected else "xformers",
        )
    finally:
        for name in [name for name in sys.modules if swapped(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


def _reference_arch(code: SimpleNamespace, config: TrainConfig) -> str:
    """``cfg.student.arch`` for our model: the reference's own ``vit_*`` factory when its sizes are ours, otherwise
    (``vit_pico``, explicit sizes) one more factory written as the reference writes its own (its
    ``DinoVisionTransformer``, ``NestedTensorBlock`` with ``MemEffAttention``, MLP ratio 4), added to its module."""
    dim, depth, heads, _ = config.model.resolved()
    if _REFERENCE_VITS.get(config.model.arch) == (dim, depth, heads):
        return config.model.arch
    vits, name = code.vits, f"vit_{dim}d_{depth}x{heads}h"

    def factory(patch_size: int = 16, **kwargs: Any) -> nn.Module:
        return vits.DinoVisionTransformer(
            patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4,
            block_fn=partial(vits.Block, attn_class=vits.MemEffAttention), **kwargs,
        )

    setattr(vits, name, factory)
    return name


def _set(node: Any, **values: Any) -> None:
    for key, value in values.items():
        assert key in node, key  # only fields the reference's default config has
        node[key] = value


def reference_config(code: SimpleNamespace, config: TrainConfig, *, epoch_length: int = 1) -> Any:
    """The reference's default config (``ssl_default_config.yaml``) with ``config``'s values in its fields.

    Its schedules count "epochs" of ``train.OFFICIAL_EPOCH_LENGTH`` iterations; ``epoch_length`` (1 by default, its
    own 1,250 for the real recipes) must divide every iteration count. Its lr is set by its own scaling rule
    (``apply_scaling_rules_to_cfg``: base_lr x sqrt(batch_size_per_gpu x world size / 1024), one rank here).
    """
    m, h, c, o = config.model, config.heads, config.loss, config.optim
    crops, masking = config.data.crops, config.data.masking
    if (c.student_temp, c.center_momentum) != (0.1, 0.9):
        raise ValueError(
            f"loss.student_temp={c.student_temp}, loss.center_momentum={c.center_momentum}: the reference's "
            "SSLMetaArch builds its losses with their defaults, 0.1 and 0.9"
        )

    def epochs(key: str, iterations: int) -> int:
        if iterations % epoch_length:
            raise ValueError(f"{key}={iterations}: not a whole number of reference epochs of {epoch_length}")
        return iterations // epoch_length

    cfg = copy.deepcopy(code.configs.dinov2_default_config)
    cfg.compute_precision.grad_scaler = False  # float32 here: its fp16 loss scaler goes with fp16 FSDP parameters
    _set(cfg.student, arch=_reference_arch(code, config), patch_size=m.patch_size, drop_path_rate=m.drop_path_rate,
         layerscale=m.layerscale_init, ffn_layer="swiglufused" if m.resolved()[3] == "swiglu" else "mlp",
         block_chunks=0)
    _set(cfg.crops, global_crops_size=crops.global_size, local_crops_size=crops.local_size,
         local_crops_number=crops.num_local)
    _set(cfg.dino, loss_weight=c.dino_loss_weight, koleo_loss_weight=c.koleo_loss_weight,
         head_n_prototypes=h.dino_prototypes, head_bottleneck_dim=h.dino_bottleneck, head_hidden_dim=h.dino_hidden,
         head_nlayers=h.num_layers)
    _set(cfg.ibot, loss_weight=c.ibot_loss_weight, separate_head=h.ibot_separate_head,
         head_n_prototypes=h.ibot_prototypes, head_bottleneck_dim=h.ibot_bottleneck, head_hidden_dim=h.ibot_hidden,
         head_nlayers=h.num_layers, mask_sample_probability=masking.mask_sample_probability,
         mask_ratio_min_max=[masking.mask_ratio_min, masking.mask_ratio_max])
    _set(cfg.train, centering={"softmax": "centering", "sinkhorn": "sinkhorn_knopp"}[c.centering],
         OFFICIAL_EPOCH_LENGTH=epoch_length, batch_size_per_gpu=o.global_batch_size)
    _set(cfg.teacher, momentum_teacher=o.momentum_teacher, final_momentum_teacher=o.momentum_teacher_end,
         warmup_teacher_temp=c.warmup_teacher_temp, teacher_temp=c.teacher_temp,
         warmup_teacher_temp_epochs=epochs("loss.warmup_teacher_temp_iterations", c.warmup_teacher_temp_iterations))
    _set(cfg.optim, epochs=epochs("optim.iterations", o.iterations),
         warmup_epochs=epochs("optim.warmup_iterations", o.warmup_iterations),
         freeze_last_layer_epochs=epochs("optim.freeze_last_layer_iterations", o.freeze_last_layer_iterations),
         base_lr=o.base_lr, min_lr=o.min_lr, weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end,
         clip_grad=o.clip_grad, patch_embed_lr_mult=o.patch_embed_lr_mult, layerwise_decay=o.layerwise_decay,
         adamw_beta1=o.adamw_beta1, adamw_beta2=o.adamw_beta2)
    return code.config.apply_scaling_rules_to_cfg(cfg)


class _Resident:
    """A batch tensor for ``forward_backward``: its ``.cuda(non_blocking=...)`` returns the tensor where it is."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def cuda(self, non_blocking: bool = False) -> torch.Tensor:
        return self.tensor


def reference_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Our batch (docs/contracts.md) under the keys of the reference's ``collate_data_and_cast``, for
    ``forward_backward``; a batch made by that collate keeps its own values. ``upperbound`` (the length the
    reference zero-pads its masked-patch buffers to, slicing the padding off again) is then the exact count."""
    if "collated_global_crops" not in batch:
        indices = batch["mask_indices"]
        batch = {
            "collated_global_crops": batch["global_crops"],
            "collated_local_crops": batch["local_crops"],
            "collated_masks": batch["masks"],
            "mask_indices_list": indices,
            "masks_weight": batch["mask_weights"],
            "n_masked_patches": torch.full((1,), indices.numel(), dtype=torch.long, device=indices.device),
            "upperbound": int(indices.numel()),
        }
    return {key: _Resident(value) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def reference_losses(loss_dict: dict[str, torch.Tensor], cfg: Any) -> dict[str, float]:
    """``forward_backward``'s loss dict in our names and scales (trainer.meta_arch.compute_losses): it logs KoLeo
    as ``weight x sum / 2`` and iBOT as half the loss it backpropagates."""
    values = {key: float(value) for key, value in loss_dict.items()}
    losses = {"dino_local": values["dino_local_crops_loss"], "dino_global": values["dino_global_crops_loss"],
              "ibot": 2 * values["ibot_loss"]}
    losses["koleo"] = 2 * values["koleo_loss"] / cfg.dino.koleo_loss_weight if "koleo_loss" in values else 0.0
    losses["total"] = (
        cfg.dino.loss_weight * (losses["dino_local"] + losses["dino_global"])
        + cfg.dino.koleo_loss_weight * losses["koleo"] + cfg.ibot.loss_weight * losses["ibot"]
    )
    return losses


def _one_rank_fsdp_units(module: nn.Module) -> list[SimpleNamespace]:
    """What ``update_teacher`` reads from ``get_fsdp_modules``: on one unsharded rank, one unit with all parameters."""
    return [SimpleNamespace(params=list(module.parameters()))]


class ReferenceStep:
    """The reference's training iteration (module docstring), from the same weights as ``models``.

    Build it inside :func:`reference_training_code`. ``arch`` is its ``SSLMetaArch``; calling the step with a batch
    (ours, or one from the reference's collate) and the iteration returns our ``TrainStep`` record's ``loss/*`` keys
    and the schedule values it applied.
    """

    def __init__(self, code: SimpleNamespace, models: SSLModels, config: TrainConfig, device: torch.device) -> None:
        if config.loss.centering == "sinkhorn":
            ensure_process_group(device)
        self.code, self.cfg = code, reference_config(code, config)
        arch = code.meta_arch.SSLMetaArch(self.cfg).to(device)
        arch.student.load_state_dict(models.student.state_dict(), strict=True)  # our names are the reference's
        arch.teacher.load_state_dict(models.teacher.state_dict(), strict=True)
        arch.need_to_synchronize_fsdp_streams = False  # the FSDP stream hand-over after the first backward
        code.meta_arch.get_fsdp_modules = _one_rank_fsdp_units
        arch.train()  # do_train: student in training mode, teacher in eval
        self.arch = arch
        self.optimizer = code.train.build_optimizer(self.cfg, arch.get_params_groups())
        (self.lr_schedule, self.wd_schedule, self.momentum_schedule, self.teacher_temp_schedule,
         self.last_layer_lr_schedule) = code.train.build_schedulers(self.cfg)
        self.xformers = code.xformers

    def forward_backward(self, batch: dict[str, Any], teacher_temp: float) -> dict[str, float]:
        """Its ``forward_backward`` alone (losses and the backward, nothing stepped), losses in our names."""
        return reference_losses(self.arch.forward_backward(reference_batch(batch), teacher_temp=teacher_temp), self.cfg)

    def __call__(self, batch: dict[str, Any], iteration: int) -> dict[str, float]:
        schedules = {
            "lr": float(self.lr_schedule[iteration]),
            "weight_decay": float(self.wd_schedule[iteration]),
            "teacher_momentum": float(self.momentum_schedule[iteration]),
            "teacher_temp": float(self.teacher_temp_schedule[iteration]),
            "last_layer_lr": float(self.last_layer_lr_schedule[iteration]),
        }
        self.code.train.apply_optim_scheduler(
            self.optimizer, schedules["lr"], schedules["weight_decay"], schedules["last_layer_lr"]
        )
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.forward_backward(batch, schedules["teacher_temp"])
        if self.cfg.optim.clip_grad:
            for module in self.arch.student.values():  # FSDP's clip_grad_norm_ of each unit, on one rank
                nn.utils.clip_grad_norm_(module.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.arch.update_teacher(schedules["teacher_momentum"])
        return {**{f"loss/{key}": value for key, value in losses.items()}, **schedules}
