"""Apply activation checkpointing, torch.compile and FSDP2 to single-device student/teacher networks.

The networks are ``nn.ModuleDict``s with ``backbone`` (whose ``blocks`` is an ``nn.ModuleList``), ``dino_head`` and
optionally ``ibot_head`` (see :mod:`trainer.meta_arch`). Models stay plain single-device code; everything distributed
happens here, after construction, in this order (torchtitan's):

1. activation checkpointing of every block (student only: the teacher never runs backward),
2. ``torch.compile`` of every block (``Module.compile``, in place),
3. FSDP2 ``fully_shard`` of every block, then of each head, then of the backbone.

Two choices keep parameter names identical to the single-device model (which the optimiser's layer-wise decay,
``ema_update`` between differently wrapped student and teacher, and released-layout export rely on): checkpointing
replaces a block's ``forward`` with a checkpointed call instead of wrapping the block in another module, and
compilation is in place. The ``ModuleDict`` itself is never called (the step calls the backbone's
``forward_features*`` and the heads), so the backbone and each head are FSDP roots of their own rather than children
of a ``ModuleDict`` root, and the backbone's entry points are registered with FSDP2 like ``forward``.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

from trainer.config import ParallelConfig, validate_fsdp

__all__ = [
    "apply_activation_checkpointing",
    "autocast_dtype",
    "build_on_meta",
    "configure_cuda_matmul",
    "materialize",
    "parallelize",
    "uses_fsdp",
]

logger = logging.getLogger(__name__)

# The training step and evaluation call these backbone methods instead of forward(); FSDP2 must wrap them too.
_BACKBONE_ENTRY_POINTS = ("forward_features", "forward_features_list", "get_intermediate_layers")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def uses_fsdp(config: ParallelConfig, *, world_size: int) -> bool:
    """Whether :func:`parallelize` shards with FSDP2 (``auto``: when there is more than one rank).

    Raises ``ConfigError`` for ``off`` on several ranks (:func:`trainer.config.validate_fsdp`, the rule
    ``dino-ctl validate`` checks for every world size a stage may run at).
    """
    validate_fsdp(config, world_size=world_size)
    return config.fsdp == "on" or (config.fsdp == "auto" and world_size > 1)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(block: nn.Module) -> None:
    """Recompute ``block``'s activations in backward (non-reentrant), keeping its parameter names."""
    # A bound method in the instance shadows the class's forward for nn.Module.__call__, so FSDP2's hooks still
    # run around it; copy.deepcopy rebinds it to the copy, and torch.compile traces it (it does not trace a
    # functools.partial of checkpoint: that compiles nothing).
    block.forward = types.MethodType(_checkpointed_forward, block)


def _heads(model: nn.ModuleDict) -> list[nn.Module]:
    """The distinct head modules (a tied iBOT head is the DINO head)."""
    heads: list[nn.Module] = []
    for name in ("dino_head", "ibot_head"):
        if name in model and all(model[name] is not head for head in heads):
            heads.append(model[name])
    return heads


def autocast_dtype(config: ParallelConfig, *, world_size: int, device: torch.device) -> torch.dtype | None:
    """The dtype the training step autocasts the backbones' forwards to, or None.

    Mixed precision is one split however the model runs: backbones compute in ``parallel.param_dtype``, heads and
    losses in float32. With FSDP2 the ``MixedPrecisionPolicy`` of :func:`parallelize` does it (None here); without
    FSDP (one rank) the step autocasts the backbone forwards and leaves the heads in float32. CPU runs float32.
    """
    if device.type != "cuda" or uses_fsdp(config, world_size=world_size):
        return None
    dtype = _DTYPES[config.param_dtype]
    return None if dtype == torch.float32 else dtype


def configure_cuda_matmul(config: ParallelConfig) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (``parallel.allow_tf32``); process-wide."""
    torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
    torch.backends.cudnn.allow_tf32 = config.allow_tf32


def _policies(config: ParallelConfig, device: torch.device, *, fp32_heads: bool) -> tuple[MixedPrecisionPolicy, ...]:
    # CPU kernels gain nothing from bf16 here and fp16 matmuls are slow or missing: run float32 on CPU.
    param_dtype = _DTYPES[config.param_dtype] if device.type == "cuda" else torch.float32
    backbone = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=_DTYPES[config.reduce_dtype])
    # Heads end in a softmax over up to 131k prototypes: their gradients are always reduced in float32.
    head = MixedPrecisionPolicy(param_dtype=torch.float32 if fp32_heads else param_dtype, reduce_dtype=torch.float32)
    return backbone, head


def parallelize(
    model: nn.ModuleDict,
    config: ParallelConfig,
    *,
    world_size: int,
    device: torch.device,
    is_teacher: bool = False,
    fp32_heads: bool = True,
) -> nn.ModuleDict:
    """Checkpoint, compile and shard ``model`` in place (order in the module docstring); returns it.

    Without FSDP (one rank and ``parallel.fsdp`` ``auto``/``off``) the model is only moved to ``device`` and runs
    in float32 (mixed precision is then the training step's autocast). A model on the meta device stays there:
    call :func:`materialize` after sharding. ``is_teacher``: no activation checkpointing, and parameters are
    resharded after every forward (the teacher runs forward only). ``fp32_heads``: heads compute in float32 even
    when the backbone runs in ``parallel.param_dtype``.
    """
    backbone = model["backbone"]
    if not isinstance(getattr(backbone, "blocks", None), nn.ModuleList):
        raise TypeError(f"parallelize: model['backbone'].blocks must be an nn.ModuleList, got {type(backbone)}")
    if config.activation_checkpointing and not is_teacher:
        for block in backbone.blocks:
            apply_activation_checkpointing(block)
    if config.compile:
        for block in backbone.blocks:
            block.compile()
    if not uses_fsdp(config, world_size=world_size):
        return model if _on_meta(model) else model.to(device)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("parallelize: FSDP2 needs an initialised process group (torch.distributed)")
    mesh = init_device_mesh(device.type, (world_size,))
    backbone_policy, head_policy = _policies(config, device, fp32_heads=fp32_heads)
    for block in backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=backbone_policy, reshard_after_forward=True)
    for head in _heads(model):
        fully_shard(head, mesh=mesh, mp_policy=head_policy, reshard_after_forward=is_teacher)
    fully_shard(backbone, mesh=mesh, mp_policy=backbone_policy, reshard_after_forward=is_teacher)
    for method in _BACKBONE_ENTRY_POINTS:  # FSDP2 hooks only forward(); the trainer calls these directly
        if hasattr(backbone, method):
            register_fsdp_forward_method(backbone, method)
    logger.info(
        "parallelised %s: FSDP2 over %d ranks, %s params, activation checkpointing %s, compile %s",
        "teacher" if is_teacher else "student", world_size, backbone_policy.param_dtype,
        config.activation_checkpointing and not is_teacher, config.compile,
    )
    return model


def _on_meta(module: nn.Module) -> bool:
    return any(param.is_meta for param in module.parameters())


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device) -> nn.Module:
    """Allocate a meta-device (possibly sharded) ``module`` on ``device`` and initialise it.

    Every submodule with ``init_weights()`` initialises its whole subtree (buffers included); elsewhere each module
    with ``reset_parameters()`` (nn.Linear, nn.LayerNorm, ...) initialises its own tensors. A module holding
    parameters that neither covers (e.g. a parametrised weight-norm layer outside an ``init_weights``) is an error:
    ``to_empty`` leaves uninitialised memory behind.
    """
    module.to_empty(device=device)
    _initialise(module, "")
    return module


def _initialise(module: nn.Module, name: str) -> None:
    if callable(getattr(module, "init_weights", None)):
        module.init_weights()
        return
    if callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()
    elif any(True for _ in module.parameters(recurse=False)):
        raise TypeError(
            f"materialize: {name or 'the root module'} ({type(module).__name__}) owns parameters but has neither "
            "init_weights() nor reset_parameters(), and no enclosing module with init_weights() covers it"
        )
    for child_name, child in module.named_children():
        _initialise(child, f"{name}.{child_name}" if name else child_name)


def build_on_meta(
    build: Callable[[], nn.Module],
    *,
    shard: Callable[[nn.Module], nn.Module] | None = None,
    device: torch.device,
) -> nn.Module:
    """``build()`` on the meta device (no memory), ``shard`` it (e.g. :func:`parallelize`), then
    :func:`materialize` it on ``device``: each rank only ever allocates its shards."""
    with torch.device("meta"):
        module = build()
    if shard is not None:
        module = shard(module)
    return materialize(module, device)
