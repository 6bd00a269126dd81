"""The trainer's typed configuration tree and the named DINOv2 recipes.

This module is the one contract shared by the trainer, the control plane (``dino_ctl`` validates specs with it)
and curation. It imports only the standard library, so ``dino-ctl validate`` never loads torch.

Resolution order: dataclass defaults <- recipe preset <- YAML file <- dotted overrides. Unknown keys are errors that
name their dotted path; values are type-checked against the annotations; :func:`validate_config` runs the semantic
checks (crop sizes fit the patch size, KoLeo has at least two samples per rank, ...).

Every number of the recipes comes from ``shared/design/recipe.md`` (DINOv2 paper, appendix B and the reference code);
the comment beside each derived value says where it comes from.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ARCHS",
    "RECIPES",
    "CheckpointConfig",
    "ConfigError",
    "CropConfig",
    "DataConfig",
    "HeadConfig",
    "LossConfig",
    "MaskConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "StageConfig",
    "StreamConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config_file",
    "model_config_from_dict",
    "parse_override",
    "resolve_config",
    "micro_batches",
    "per_rank_batch",
    "validate_config",
    "validate_fsdp",
    "validate_world_size",
    "with_overrides",
]


class ConfigError(ValueError):
    """A user mistake in a configuration: names the dotted field path, the bad value and what is allowed.

    ``context`` says under which circumstance the value is invalid (``with world size 16``) where that is not the
    value alone. Every configuration error of the project has this shape: the control plane's ``SpecError`` is a
    subclass and the curation spec raises this class.
    """

    def __init__(self, path: str, value: Any, allowed: str, *, context: str = "") -> None:
        self.path, self.value, self.allowed, self.context = path, value, allowed, context
        where = f" {context}" if context else ""
        super().__init__(f"{path}: invalid value {value!r}{where}; allowed: {allowed}")


# name -> (embed_dim, depth, num_heads, ffn). vit_giant2's SwiGLU hidden is round_up(int(4*D*2/3), 8) = 4096.
ARCHS: dict[str, tuple[int, int, int, str]] = {
    "vit_pico": (96, 4, 3, "mlp"),  # not a DINOv2 release: a CPU-sized model for tests and the quickstart
    "vit_tiny": (192, 12, 3, "mlp"),
    "vit_small": (384, 12, 6, "mlp"),
    "vit_base": (768, 12, 12, "mlp"),
    "vit_large": (1024, 24, 16, "mlp"),
    "vit_giant2": (1536, 40, 24, "swiglu"),
}


@dataclass(kw_only=True)
class ModelConfig:
    """The ViT backbone (student; the teacher is a copy, or in distillation comes from ``stage.teacher_from``)."""

    arch: str = "vit_large"
    """Preset name, one of :data:`ARCHS`; sets embed_dim/depth/num_heads/ffn unless those are given."""
    embed_dim: int | None = None
    """Overrides the preset's width when set."""
    depth: int | None = None
    """Overrides the preset's number of blocks when set."""
    num_heads: int | None = None
    """Overrides the preset's number of attention heads when set."""
    ffn: Literal["mlp", "swiglu"] | None = None
    """Feed-forward type; None takes the preset's. SwiGLU hidden = round_up(int(4*D*2/3), 8)."""
    patch_size: int = 16
    """Patch size in pixels (14 for the long recipes, 16 for the short ImageNet-1k recipe)."""
    img_size: int = 224
    """Crop size the position embedding is sized for (518 for the released backbones, 224 when training)."""
    num_register_tokens: int = 0
    """Register tokens (4 in the ``_reg4`` releases); they get no position embedding."""
    layerscale_init: float = 1e-5
    """LayerScale gamma initial value on both residual branches."""
    drop_path_rate: float = 0.3
    """Stochastic depth rate, uniform over blocks as in the reference (student only; the teacher has none)."""
    drop_path_mode: Literal["efficient", "classic"] = "efficient"
    """``efficient`` runs each branch on the kept subset of samples and rescales; ``classic`` masks per sample."""
    interpolate_antialias: bool = False
    """Position-embedding interpolation: False for the original releases, True for ``_reg4`` releases."""
    interpolate_offset: float = 0.1
    """Scale-factor offset of the interpolation: 0.1 for the original releases, 0.0 for ``_reg4`` releases."""
    attention_backend: Literal["auto", "sdpa", "xformers"] = "auto"
    """``auto`` uses xformers memory-efficient attention on CUDA when installed, else PyTorch SDPA."""

    def resolved(self) -> tuple[int, int, int, str]:
        """(embed_dim, depth, num_heads, ffn) after applying the explicit overrides to the preset."""
        dim, depth, heads, ffn = ARCHS[self.arch]
        return (
            self.embed_dim or dim,
            self.depth or depth,
            self.num_heads or heads,
            self.ffn or ffn,
        )


@dataclass(kw_only=True)
class HeadConfig:
    """DINO and iBOT projection heads: MLP (num_layers) -> L2-normalise -> weight-normalised prototypes."""

    dino_prototypes: int = 65536
    """K for the DINO head (65,536 short recipe, 131,072 long)."""
    dino_bottleneck: int = 256
    dino_hidden: int = 2048
    ibot_separate_head: bool = False
    """False: iBOT shares the DINO head (short recipe). True: untied iBOT head (long recipes)."""
    ibot_prototypes: int = 65536
    ibot_bottleneck: int = 256
    ibot_hidden: int = 2048
    num_layers: int = 3


@dataclass(kw_only=True)
class StreamConfig:
    """One MDS stream of the training data (mosaicml-streaming ``Stream``)."""

    remote: str | None = None
    """Object-store or local URI holding the shards (s3://, gs://, file://, or a path)."""
    local: str | None = None
    """Local cache directory; defaults to a directory under ``data.cache_dir`` derived from ``remote``."""
    proportion: float | None = None
    """Share of each epoch drawn from this stream (set on all streams or none)."""
    repeat: float | None = None
    choose: int | None = None


@dataclass(kw_only=True)
class CropConfig:
    """Multi-crop augmentation (recipe.md, 'Multi-crop data')."""

    global_size: int = 224
    local_size: int = 96
    num_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop's aspect-ratio range (log-uniform draw), global and local crops alike."""
    flip_probability: float = 0.5
    """Horizontal flip of each crop; 0 where left and right differ in meaning (text, some medical images)."""
    jitter_probability: float = 0.8
    """Colour jitter of each crop (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in random order)."""
    grayscale_probability: float = 0.2
    """Grayscale conversion of each crop (after the jitter)."""
    blur_probabilities: Literal["reference", "paper", "disabled"] = "reference"
    """``reference`` (what the released models saw): global1 0.0, global2 0.9, locals 0.5; ``paper``: 1.0/0.1/0.5;
    ``disabled``: no blur."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range in pixels of the output crop (9-tap kernel). The recipe's (0.1, 2.0) was chosen for
    224/96 px crops; configs with much smaller crops may scale it with the crop size (on the 28 px quickstart,
    scaling it by 28/224 changed the k-NN result by less than run-to-run noise, so the quickstart keeps the recipe's)."""
    solarize_probability: float = 0.2
    """Solarize on global crop 2 only."""
    fast_path: bool = True
    """JPEG draft-mode decode at reduced size and separable blur (statistically the same crops)."""
    gpu_augment: bool = False
    """Run colour jitter, grayscale, blur and solarize on the GPU on batched crops."""


@dataclass(kw_only=True)
class MaskConfig:
    """iBOT masking of the global crops (recipe.md)."""

    mask_sample_probability: float = 0.5
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    min_block_patches: int = 4
    """Smallest BEiT mask block (4 in the reference). On grids of a few patches (2x2, 3x3) blocks of 4 rarely or
    never fit under the 50% cap, so iBOT would see no masked patch at all; 1 lets single patches be masked."""


@dataclass(kw_only=True)
class DataConfig:
    """Streaming MDS input."""

    streams: list[StreamConfig] = field(default_factory=list)
    """One or more MDS streams; a stage with none is invalid (except ``dataset: synthetic``)."""
    dataset: Literal["mds", "synthetic"] = "mds"
    """``synthetic`` generates random images (benchmarks and unit tests only)."""
    cache_dir: str = "/tmp/dino-ctl-cache"
    num_canonical_nodes: int | None = None
    """Fixes the global sample order across world sizes; set it explicitly for elastic runs."""
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    shuffle_block_size: int | None = None
    num_workers: int = 8
    """DataLoader workers per rank (decoding and augmentation run there)."""
    prefetch_factor: int = 2
    crops: CropConfig = field(default_factory=CropConfig)
    masking: MaskConfig = field(default_factory=MaskConfig)


@dataclass(kw_only=True)
class LossConfig:
    """DINO + iBOT + KoLeo (recipe.md, 'Losses')."""

    centering: Literal["softmax", "sinkhorn"] = "softmax"
    """``softmax``: EMA center (short recipe); ``sinkhorn``: Sinkhorn-Knopp, 3 iterations (long recipes)."""
    sinkhorn_iterations: int = 3
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_iterations: int = 37500
    """Linear 0.04 -> 0.07 over the first 30 'epochs' of 1,250 iterations."""
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW, schedules and clipping (recipe.md, 'Optimiser and schedules'). Schedules span ``iterations``."""

    global_batch_size: int = 2048
    """Images per optimiser step over all ranks; per-rank batch (or accumulation) is derived from the world size."""
    iterations: int = 125000
    base_lr: float = 4e-3
    """Scaled by sqrt(global_batch_size / 1024)."""
    min_lr: float = 1e-6
    warmup_iterations: int = 12500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    momentum_teacher_end: float = 1.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_iterations: int = 1250
    clip_grad: float = 3.0
    """Max-norm, applied separately to the backbone, the DINO head and the iBOT head. 0 disables."""
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    max_micro_batch_size: int | None = None
    """Cap on the per-rank micro-batch; larger per-rank batches use gradient accumulation."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Sharded torch.distributed.checkpoint checkpoints, published atomically."""

    dir: str = "./checkpoints"
    """Local path or fsspec URI; the trainer resumes from the newest complete checkpoint here."""
    interval_iterations: int = 1000
    keep_last: int = 3
    """Retention: complete checkpoints kept (0 keeps all)."""
    async_save: bool = False
    preemption_grace_seconds: float = 120.0
    """Time budget after SIGTERM to finish the step and write a checkpoint."""


@dataclass(kw_only=True)
class MetricsConfig:
    """Prometheus endpoint and structured logs."""

    port: int = 9400
    """Port of the /metrics endpoint on each node's local rank 0; 0 picks a free port, -1 disables."""
    log_interval: int = 10
    """Iterations between JSON-lines log records."""
    log_file: str | None = None
    """JSON-lines log path; defaults to ``<checkpoint.dir>/train_log.jsonl`` on rank 0."""


@dataclass(kw_only=True)
class ParallelConfig:
    """How the single-device models are parallelised (order: activation checkpointing, compile, FSDP2)."""

    fsdp: Literal["auto", "on", "off"] = "auto"
    """``auto``: FSDP2 when world size > 1."""
    param_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Mixed-precision dtype of the backbones on CUDA (CPU always runs float32). ``float16`` is refused by
    validation: it needs loss scaling, which the trainer does not do."""
    reduce_dtype: Literal["bfloat16", "float32"] = "float32"
    allow_tf32: bool = True
    """float32 matmuls (the float32 heads; every matmul of a float32 run) on TF32 tensor cores on CUDA, as the
    reference's ``train.py`` sets."""
    activation_checkpointing: bool = False
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(kw_only=True)
class StageConfig:
    """What kind of stage this is and where it starts from."""

    kind: Literal["pretrain", "highres", "distill"] = "pretrain"
    init_from: str | None = None
    """``highres``: checkpoint directory (or URI) of the previous stage to initialise student and teacher from."""
    teacher_from: str | None = None
    """``distill``: checkpoint directory of the frozen teacher (backbone + heads)."""
    teacher_model: ModelConfig | None = None
    """``distill``: the teacher's architecture; read from the teacher checkpoint's resolved config when None."""


@dataclass(kw_only=True)
class TrainConfig:
    """One stage of training: everything ``python -m trainer.train`` needs."""

    recipe: str = "short_vitl16"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stage: StageConfig = field(default_factory=StageConfig)


# --------------------------------------------------------------------------------------------------------------------
# Recipes: nested dicts of values over the dataclass defaults (which are the short ViT-L/16 ImageNet-1k recipe).
# --------------------------------------------------------------------------------------------------------------------

_LONG = {
    # long recipe (ViT-L/14, ViT-g/14): batch 3072, lr 2e-4, 625k iterations, 100k warm-up, wd -> 0.2,
    # momentum 0.994, no layer decay, drop path 0.4, Sinkhorn-Knopp centering, untied 131k-prototype heads.
    "model": {"patch_size": 14, "drop_path_rate": 0.4, "ffn": "swiglu"},
    "heads": {
        "dino_prototypes": 131072,
        "dino_bottleneck": 384,
        "ibot_separate_head": True,
        "ibot_prototypes": 131072,
        "ibot_bottleneck": 256,
    },
    "loss": {"centering": "sinkhorn"},
    "data": {"crops": {"local_size": 98}},
    "optim": {
        "global_batch_size": 3072,
        "base_lr": 2e-4,
        "iterations": 625000,
        "warmup_iterations": 100000,
        "weight_decay_end": 0.2,
        "momentum_teacher": 0.994,
        "layerwise_decay": 1.0,
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


RECIPES: dict[str, dict[str, Any]] = {
    # short recipe: ViT-L/16 on ImageNet-1k, batch 2048, lr 4e-3, 125k its, 12.5k warm-up, drop path 0.3, decay 0.9.
    "short_vitl16": {"model": {"arch": "vit_large", "patch_size": 16}},
    "long_vitl14": _merge(_LONG, {"model": {"arch": "vit_large"}}),
    "long_vitg14": _merge(_LONG, {"model": {"arch": "vit_giant2"}}),
    # distilled S/B/L: batch 2048, lr 1e-3, 625k its, 100k warm-up, no drop path, no layer decay, ViT-g/14 teacher.
    **{
        f"distill_vit{size[0]}14": _merge(
            _LONG,
            {
                "model": {"arch": f"vit_{size}", "drop_path_rate": 0.0, "ffn": "mlp"},
                "optim": {"global_batch_size": 2048, "base_lr": 1e-3},
                "stage": {"kind": "distill"},
            },
        )
        for size in ("small", "base", "large")
    },
    # high-resolution adaptation: 518 px for the last 10k iterations, schedules compressed into the window,
    # lower lr. Applied on top of the pretraining stage's model/head settings (the control plane merges them).
    "highres518": _merge(
        _LONG,
        {
            "model": {"arch": "vit_large", "img_size": 518},
            "data": {"crops": {"global_size": 518, "local_size": 224}},
            "optim": {"iterations": 10000, "warmup_iterations": 1000, "base_lr": 5e-5},
            "loss": {"warmup_teacher_temp_iterations": 0},
            "stage": {"kind": "highres"},
        },
    ),
    # ViT-S/14 with the long recipe at full crop sizes: the realistic CPU/GPU benchmark.
    "vits14": _merge(_LONG, {"model": {"arch": "vit_small", "ffn": "mlp"}}),
    # A CPU-sized recipe (seconds per step on 2 cores) for tests and the quickstart: every mechanism of the full
    # recipe (multi-crop, masking, DINO+iBOT+KoLeo, Sinkhorn, EMA, layer decay, efficient drop path) at toy scale.
    "tiny": {
        # LayerScale 0.1 instead of 1e-5: with 4 blocks and ~1k steps the residual branches must matter from the
        # start, or every image gets the same CLS token and the teacher targets stay uniform for most of the run.
        "model": {
            "arch": "vit_pico", "patch_size": 4, "img_size": 32, "drop_path_rate": 0.1, "layerscale_init": 0.1,
        },
        "heads": {
            "dino_prototypes": 256,
            "dino_bottleneck": 64,
            "dino_hidden": 256,
            "ibot_separate_head": True,
            "ibot_prototypes": 256,
            "ibot_bottleneck": 64,
            "ibot_hidden": 256,
        },
        # a constant sharp teacher (0.04): the 0.04 -> 0.07 warm-up spans 37.5k iterations in the full recipes
        "loss": {"centering": "sinkhorn", "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
                 "warmup_teacher_temp_iterations": 0},
        "data": {
            "dataset": "synthetic",
            "num_workers": 0,
            "crops": {"global_size": 32, "local_size": 16, "num_local": 4},
        },
        "optim": {
            "global_batch_size": 32,
            "iterations": 200,
            "base_lr": 1e-2,  # x sqrt(batch / 1024): 1.8e-3 at batch 32, 2.5e-3 at 64
            "warmup_iterations": 20,
            "freeze_last_layer_iterations": 10,
            "layerwise_decay": 0.9,
            "momentum_teacher": 0.99,
        },
        "checkpoint": {"interval_iterations": 50, "keep_last": 2},
        "metrics": {"port": 0, "log_interval": 5},
        "parallel": {"param_dtype": "float32"},
    },
}
# Highres keeps the pretraining recipe's architecture; only the crop/schedule keys above are the stage's own.


# --------------------------------------------------------------------------------------------------------------------
# dict <-> dataclass with path-naming errors
# --------------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` (converting lists to tuples, ints to floats, dicts to dataclasses)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(path, value, _type_name(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(path, value, _type_name(tp))
    if tp is type(None):
        if value is not None:
            raise ConfigError(path, value, "null")
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, value, f"a mapping of {tp.__name__} fields")
        return _from_dict(tp, value, path)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(path, value, f"a list of {len(args)} numbers")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, f"a list of {_type_name(arg)}")
        return [_coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, "a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, value, "a string")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # internal: a field type this module cannot check


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            raise ConfigError(path, value, f"a known key of {prefix or 'the config'}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested dict; unknown keys and wrong types raise :class:`ConfigError`."""
    return _from_dict(TrainConfig, data)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from a dict (an export's ``model.json``), checked like the full tree."""
    return _coerce(data, ModelConfig, "model")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested plain-Python dict (tuples become lists) suitable for YAML/JSON."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.path=value``; the value is read as YAML-ish JSON (numbers, true/false, null, lists) or a string."""
    if "=" not in text:
        raise ConfigError("override", text, "KEY=VALUE with a dotted key, e.g. optim.iterations=1000")
    key, raw = text.split("=", 1)
    raw = raw.strip()
    lowered = {"true": True, "false": False, "null": None, "none": None, "~": None}
    if raw.lower() in lowered:
        return key.strip(), lowered[raw.lower()]
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted ``{"optim.iterations": 10}`` overrides onto a nested dict. Keys are checked later, with paths."""
    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(dotted, value, f"{part} is not a mapping, so it has no sub-keys")
            node = nxt
        node[parts[-1]] = value
    return out


def resolve_config(
    recipe: str,
    *,
    file_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """defaults <- ``RECIPES[recipe]`` <- ``file_values`` <- dotted ``overrides``, then :func:`validate_config`."""
    if recipe not in RECIPES:
        raise ConfigError("recipe", recipe, "one of " + ", ".join(sorted(RECIPES)))
    data = _merge(RECIPES[recipe], file_values or {})
    data["recipe"] = recipe
    data = apply_overrides(data, overrides or {})
    config = config_from_dict(data)
    validate_config(config)
    return config


def with_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``config`` with dotted ``overrides`` on top, resolved and validated again (same recipe)."""
    values = config_to_dict(config)
    values.pop("recipe", None)
    return resolve_config(config.recipe, file_values=values, overrides=overrides)


def load_config_file(path: str | None, overrides: list[str], *, recipe: str | None = None) -> TrainConfig:
    """defaults <- recipe <- YAML file <- ``key=value`` overrides; the recipe comes from the file's ``recipe`` key
    unless ``recipe`` is given (default ``tiny`` when neither names one)."""
    import yaml  # noqa: PLC0415 - keeps importing this module cheap

    file_values: dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as handle:
            file_values = yaml.safe_load(handle) or {}
        if not isinstance(file_values, dict):
            raise ConfigError("config", type(file_values).__name__, f"a mapping at the top of {path}")
    name = recipe or file_values.pop("recipe", None) or "tiny"
    file_values.pop("recipe", None)
    parsed = dict(parse_override(item) for item in overrides)
    return resolve_config(name, file_values=file_values, overrides=parsed)


def validate_config(config: TrainConfig, *, world_size: int | None = None) -> None:
    """Semantic checks; raises :class:`ConfigError` naming the first offending field."""
    m, crops, optim = config.model, config.data.crops, config.optim
    if m.arch not in ARCHS:
        raise ConfigError("model.arch", m.arch, "one of " + ", ".join(ARCHS))
    dim, _depth, heads, _ffn = m.resolved()
    if dim % heads:
        raise ConfigError("model.num_heads", heads, f"a divisor of embed_dim {dim}")
    for name, size in (("global_size", crops.global_size), ("local_size", crops.local_size), ("img_size", m.img_size)):
        path = f"data.crops.{name}" if name != "img_size" else "model.img_size"
        if size <= 0 or size % m.patch_size:
            raise ConfigError(path, size, f"a positive multiple of model.patch_size ({m.patch_size})")
    for name in ("global_scale", "local_scale"):
        lo, hi = getattr(crops, name)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.crops.{name}", [lo, hi], "0 < min <= max <= 1")
    lo, hi = crops.aspect_ratio
    if not 0 < lo <= hi:
        raise ConfigError("data.crops.aspect_ratio", [lo, hi], "0 < min <= max (width / height)")
    for name in ("flip_probability", "jitter_probability", "grayscale_probability", "solarize_probability"):
        value = getattr(crops, name)
        if not 0 <= value <= 1:
            raise ConfigError(f"data.crops.{name}", value, "0..1")
    lo, hi = crops.blur_sigma
    if not 0 < lo <= hi:
        raise ConfigError("data.crops.blur_sigma", [lo, hi], "0 < min <= max (pixels)")
    if crops.num_local < 0:
        raise ConfigError("data.crops.num_local", crops.num_local, ">= 0")
    if config.parallel.param_dtype == "float16":
        # float16 gradients underflow without loss scaling (the reference pairs fp16 with a GradScaler); this trainer
        # does no loss scaling, so it refuses rather than silently losing small gradients.
        raise ConfigError(
            "parallel.param_dtype", "float16", "bfloat16 or float32 (float16 needs loss scaling, which is not implemented)"
        )
    mask = config.data.masking
    if not 0 <= mask.mask_ratio_min <= mask.mask_ratio_max <= 0.5:
        raise ConfigError("data.masking.mask_ratio_max", mask.mask_ratio_max, "0 <= mask_ratio_min <= max <= 0.5")
    if not 0 <= mask.mask_sample_probability <= 1:
        raise ConfigError("data.masking.mask_sample_probability", mask.mask_sample_probability, "0..1")
    if mask.min_block_patches < 1:
        raise ConfigError("data.masking.min_block_patches", mask.min_block_patches, "an integer >= 1")
    grid = crops.global_size // m.patch_size
    if config.loss.ibot_loss_weight > 0 and mask.mask_sample_probability > 0 and mask.mask_ratio_max > 0:
        # iBOT needs masked patches: a block (strictly smaller than the grid in both directions, as in BEiT) of at
        # least min_block_patches must fit under the cap of int(ratio_max * grid^2) patches, or iBOT silently sees
        # no masked patch in the whole run.
        cap = int(mask.mask_ratio_max * grid * grid)
        largest = max((h * w for h in range(1, grid) for w in range(1, grid) if h * w <= cap), default=0)
        if largest < mask.min_block_patches:
            raise ConfigError(
                "data.masking.min_block_patches", mask.min_block_patches,
                f"at most {largest} with a {grid}x{grid} global-crop grid and mask_ratio_max {mask.mask_ratio_max} "
                "(no mask block fits otherwise, so iBOT would see no masked patch); or set loss.ibot_loss_weight=0"
                if largest else
                f"nothing: a {grid}x{grid} global-crop grid leaves no room for an iBOT mask block under "
                f"mask_ratio_max {mask.mask_ratio_max}; use smaller patches or larger global crops, or set "
                "loss.ibot_loss_weight=0",
            )
    if not 0 <= m.drop_path_rate < 1:
        raise ConfigError("model.drop_path_rate", m.drop_path_rate, "0 <= rate < 1")
    if optim.iterations <= 0:
        raise ConfigError("optim.iterations", optim.iterations, "a positive integer")
    if not 0 <= optim.warmup_iterations <= optim.iterations:
        raise ConfigError("optim.warmup_iterations", optim.warmup_iterations, f"0..optim.iterations ({optim.iterations})")
    if optim.global_batch_size <= 0:
        raise ConfigError("optim.global_batch_size", optim.global_batch_size, "a positive integer")
    if optim.max_micro_batch_size is not None and optim.max_micro_batch_size < 1:
        raise ConfigError("optim.max_micro_batch_size", optim.max_micro_batch_size, "null (no cap) or an integer >= 1")
    if config.data.dataset == "mds" and not config.data.streams:
        raise ConfigError("data.streams", [], "at least one stream with a remote or local MDS location")
    proportions = [s.proportion for s in config.data.streams]
    if any(p is not None for p in proportions) and any(p is None for p in proportions):
        raise ConfigError("data.streams[].proportion", proportions, "set on every stream or on none")
    if config.stage.kind == "highres" and not config.stage.init_from:
        raise ConfigError("stage.init_from", None, "a checkpoint directory of the previous stage for a highres stage")
    if config.stage.kind == "distill" and not config.stage.teacher_from:
        raise ConfigError("stage.teacher_from", None, "a teacher checkpoint directory for a distill stage")
    if config.metrics.port < -1 or config.metrics.port > 65535:
        raise ConfigError("metrics.port", config.metrics.port, "-1 (off), 0 (any free port) or 1..65535")
    if config.loss.centering == "sinkhorn" and config.loss.sinkhorn_iterations < 1:
        raise ConfigError("loss.sinkhorn_iterations", config.loss.sinkhorn_iterations, ">= 1")
    if not math.isfinite(optim.base_lr) or optim.base_lr < 0:
        raise ConfigError("optim.base_lr", optim.base_lr, "a finite non-negative number")
    if world_size is not None:
        validate_world_size(config, world_size)


# --------------------------------------------------------------------------------------------------------------------
# Rules that depend on the world size: ``dino-ctl validate`` runs them for every size a stage may run at, the trainer
# for the size it got, and the runtime takes its batch split from the same functions.
# --------------------------------------------------------------------------------------------------------------------


def validate_fsdp(parallel: ParallelConfig, *, world_size: int) -> None:
    """``parallel.fsdp: off`` runs on one rank only: without FSDP2 nothing synchronises the gradients."""
    if parallel.fsdp == "off" and world_size > 1:
        raise ConfigError(
            "parallel.fsdp", "off", "'auto' or 'on' (gradients are synchronised by FSDP2)",
            context=f"with world size {world_size}",
        )


def per_rank_batch(config: TrainConfig, world_size: int) -> int:
    """Images per rank and step: ``optim.global_batch_size`` split evenly over ``world_size`` ranks."""
    global_batch = config.optim.global_batch_size
    if global_batch % world_size:
        raise ConfigError(
            "optim.global_batch_size",
            global_batch,
            f"a multiple of the world size ({world_size}) so every rank gets the same batch",
        )
    return global_batch // world_size


def micro_batches(config: TrainConfig, world_size: int) -> tuple[int, int]:
    """(number, size) of the equal micro-batches a rank's batch is split into (gradient accumulation): as few as
    ``optim.max_micro_batch_size`` allows."""
    per_rank = per_rank_batch(config, world_size)
    cap = config.optim.max_micro_batch_size or per_rank
    count = -(-per_rank // cap)
    if per_rank % count:
        fits = max(d for d in range(1, cap + 1) if per_rank % d == 0)
        raise ConfigError(
            "optim.max_micro_batch_size",
            cap,
            f"a cap that splits the per-rank batch into equal micro-batches, such as {fits} (a divisor of {per_rank})",
            context=f"with world size {world_size} ({per_rank} per rank gives {count} unequal micro-batches)",
        )
    return count, per_rank // count


def validate_world_size(config: TrainConfig, world_size: int) -> None:
    """Every rule that depends on the world size: FSDP on several ranks, an even batch share per rank, micro-batches
    that split it evenly, and at least two samples per micro-batch for KoLeo (its nearest neighbour)."""
    validate_fsdp(config.parallel, world_size=world_size)
    per_rank = per_rank_batch(config, world_size)
    count, size = micro_batches(config, world_size)
    if config.loss.koleo_loss_weight > 0 and size < 2:
        if count == 1:
            raise ConfigError(
                "optim.global_batch_size",
                config.optim.global_batch_size,
                f"at least 2 samples per rank with KoLeo enabled (world size {world_size} gives {per_rank}); "
                "KoLeo needs a nearest neighbour, or set loss.koleo_loss_weight=0",
            )
        raise ConfigError(
            "optim.max_micro_batch_size",
            config.optim.max_micro_batch_size,
            f"at least 2 with KoLeo enabled: KoLeo runs on each micro-batch and needs a nearest neighbour (world size "
            f"{world_size} gives {per_rank} per rank); or set loss.koleo_loss_weight=0",
        )
