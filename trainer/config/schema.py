"""The trainer's typed configuration tree: one keyword-only dataclass per section, a docstring under every field.

Standard library only, so ``dino-ctl validate`` never loads torch. The defaults are the short ViT-L/16 ImageNet-1k
recipe; :mod:`trainer.config.recipes` holds the others as values over these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ARCHS",
    "CheckpointConfig",
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
]

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
    """Width of the DINO head's MLP output before L2 normalisation (256 short recipe, 384 long)."""
    dino_hidden: int = 2048
    """Hidden width of the DINO head's MLP layers."""
    ibot_separate_head: bool = False
    """False: iBOT shares the DINO head (short recipe). True: untied iBOT head (long recipes)."""
    ibot_prototypes: int = 65536
    """K for the untied iBOT head; unused when ``ibot_separate_head`` is False."""
    ibot_bottleneck: int = 256
    """Bottleneck width of the untied iBOT head; unused when ``ibot_separate_head`` is False."""
    ibot_hidden: int = 2048
    """Hidden width of the untied iBOT head; unused when ``ibot_separate_head`` is False."""
    num_layers: int = 3
    """MLP layers of each head before the prototype layer (3 in the reference)."""


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
    """Times each sample of this stream is seen per epoch (up- or down-sampling); at most one of proportion, repeat,
    choose."""
    choose: int | None = None
    """Samples drawn from this stream per epoch; at most one of proportion, repeat, choose."""


@dataclass(kw_only=True)
class CropConfig:
    """Multi-crop augmentation (recipe.md, 'Multi-crop data')."""

    global_size: int = 224
    """Side in pixels of the two global crops (224; 518 in the high-resolution stage); a multiple of the patch size."""
    local_size: int = 96
    """Side in pixels of each local crop (96 short recipe, 98 long); a multiple of the patch size."""
    num_local: int = 8
    """Local crops per image (8); 0 trains on the global crops only."""
    global_scale: tuple[float, float] = (0.32, 1.0)
    """RandomResizedCrop area range of the global crops, as fractions of the image."""
    local_scale: tuple[float, float] = (0.05, 0.32)
    """RandomResizedCrop area range of the local crops, as fractions of the image."""
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
    """Share of the global crops of a batch that get an iBOT block mask."""
    mask_ratio_min: float = 0.1
    """Smallest share of patches masked in a masked crop (a batch's ratios are stratified over [min, max])."""
    mask_ratio_max: float = 0.5
    """Largest share of patches masked in a masked crop; at most 0.5."""
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
    """Root of the local shard caches of streams that set no ``local``."""
    num_canonical_nodes: int | None = None
    """Fixes the global sample order across world sizes; set it explicitly for elastic runs."""
    shuffle: bool = True
    """Shuffle the sample order (streaming's shuffle, fixed by the seed and ``num_canonical_nodes``)."""
    shuffle_algo: str = "py1e"
    """mosaicml-streaming shuffle algorithm (``py1e``, ``py1br``, ``py1s``, ``py2s``, ``naive``)."""
    shuffle_block_size: int | None = None
    """streaming's shuffle block size in samples; None lets streaming derive it from ``num_canonical_nodes``."""
    num_workers: int = 8
    """DataLoader workers per rank (decoding and augmentation run there)."""
    prefetch_factor: int = 2
    """Batches each DataLoader worker prepares ahead."""
    crops: CropConfig = field(default_factory=CropConfig)
    """Multi-crop augmentation."""
    masking: MaskConfig = field(default_factory=MaskConfig)
    """iBOT masking of the global crops."""


@dataclass(kw_only=True)
class LossConfig:
    """DINO + iBOT + KoLeo (recipe.md, 'Losses')."""

    centering: Literal["softmax", "sinkhorn"] = "softmax"
    """``softmax``: EMA center (short recipe); ``sinkhorn``: Sinkhorn-Knopp, 3 iterations (long recipes)."""
    sinkhorn_iterations: int = 3
    """Sinkhorn-Knopp iterations when ``centering`` is ``sinkhorn``."""
    center_momentum: float = 0.9
    """EMA momentum of the softmax centering's centers (DINO and iBOT)."""
    student_temp: float = 0.1
    """Temperature of the student's softmax."""
    teacher_temp: float = 0.07
    """Temperature of the teacher's softmax after the warm-up."""
    warmup_teacher_temp: float = 0.04
    """Temperature of the teacher's softmax at iteration 0."""
    warmup_teacher_temp_iterations: int = 37500
    """Linear 0.04 -> 0.07 over the first 30 'epochs' of 1,250 iterations."""
    dino_loss_weight: float = 1.0
    """Weight of the DINO (image-level, CLS token) loss."""
    ibot_loss_weight: float = 1.0
    """Weight of the iBOT (masked patch tokens) loss; 0 switches masking's iBOT checks off."""
    koleo_loss_weight: float = 0.1
    """Weight of the KoLeo regulariser on the student's global CLS tokens; it needs at least two samples per micro-
    batch (a nearest neighbour)."""


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW, schedules and clipping (recipe.md, 'Optimiser and schedules'). Schedules span ``iterations``."""

    global_batch_size: int = 2048
    """Images per optimiser step over all ranks; per-rank batch (or accumulation) is derived from the world size."""
    iterations: int = 125000
    """Optimiser steps of the stage; every schedule spans them."""
    base_lr: float = 4e-3
    """Scaled by sqrt(global_batch_size / 1024)."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine decay."""
    warmup_iterations: int = 12500
    """Linear learning-rate warm-up from 0 to the scaled ``base_lr``."""
    weight_decay: float = 0.04
    """Weight decay at iteration 0 (cosine schedule to ``weight_decay_end``)."""
    weight_decay_end: float = 0.4
    """Weight decay at the last iteration."""
    momentum_teacher: float = 0.992
    """Teacher EMA momentum at iteration 0 (cosine schedule to ``momentum_teacher_end``)."""
    momentum_teacher_end: float = 1.0
    """Teacher EMA momentum at the last iteration."""
    layerwise_decay: float = 0.9
    """Learning-rate factor per backbone block below the top, ``decay ** (L + 1 - layer)``; 1.0 disables it."""
    patch_embed_lr_mult: float = 0.2
    """Extra learning-rate factor of the patch embedding."""
    freeze_last_layer_iterations: int = 1250
    """First iterations during which the heads' prototype layers (``last_layer``) are not updated."""
    clip_grad: float = 3.0
    """Max-norm, applied separately to the backbone, the DINO head and the iBOT head. 0 disables."""
    adamw_beta1: float = 0.9
    """AdamW's first-moment decay."""
    adamw_beta2: float = 0.999
    """AdamW's second-moment decay."""
    max_micro_batch_size: int | None = None
    """Cap on the per-rank micro-batch; larger per-rank batches use gradient accumulation."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Sharded torch.distributed.checkpoint checkpoints, published atomically."""

    dir: str = "./checkpoints"
    """Local path or fsspec URI; the trainer resumes from the newest complete checkpoint here."""
    interval_iterations: int = 1000
    """Iterations between periodic checkpoints (the final one and a SIGTERM one are written regardless)."""
    keep_last: int = 3
    """Retention: complete checkpoints kept (0 keeps all)."""
    async_save: bool = False
    """Write periodic checkpoints in the background: tensors are staged to host memory and training goes on."""
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
    log_sample_ids: bool = False
    """Add each logged step's sample ids (the whole global batch: every rank's share, in rank order) to its JSON-lines
    record, to check the data order across restarts and resizes; costs an all-gather of the ids every step."""


@dataclass(kw_only=True)
class ParallelConfig:
    """How the single-device models are parallelised (order: activation checkpointing, compile, FSDP2)."""

    fsdp: Literal["auto", "on", "off"] = "auto"
    """``auto``: FSDP2 when world size > 1."""
    param_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Mixed-precision dtype of the backbones on CUDA (CPU always runs float32). ``float16`` is refused by
    validation: it needs loss scaling, which the trainer does not do."""
    reduce_dtype: Literal["bfloat16", "float32"] = "float32"
    """dtype of FSDP2's gradient reduce-scatter for the backbones (heads always reduce in float32)."""
    allow_tf32: bool = True
    """float32 matmuls (the float32 heads; every matmul of a float32 run) on TF32 tensor cores on CUDA, as the
    reference's ``train.py`` sets."""
    activation_checkpointing: bool = False
    """Recompute each student block's activations in backward (less memory, more compute)."""
    compile: bool = False
    """``torch.compile`` each block in place."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when available (the rank's local GPU), else CPU."""


@dataclass(kw_only=True)
class StageConfig:
    """What kind of stage this is and where it starts from."""

    kind: Literal["pretrain", "highres", "distill"] = "pretrain"
    """``pretrain`` from scratch, ``highres`` from ``init_from`` at a higher resolution, ``distill`` against a frozen
    teacher."""
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
    """Name of the :data:`~trainer.config.recipes.RECIPES` preset the config was resolved from."""
    seed: int = 0
    """Seed of initialisation, data order and augmentation (per-rank streams derive from it)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone."""
    heads: HeadConfig = field(default_factory=HeadConfig)
    """The DINO and iBOT projection heads."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The loss terms and their weights."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser, batch and schedules."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data and augmentation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Where and how often checkpoints are written."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Prometheus endpoint and JSON-lines log."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Device, precision and parallelisation."""
    stage: StageConfig = field(default_factory=StageConfig)
    """Kind of stage and where it starts from."""
