"""Semantic checks of a resolved config, and the rules that depend on the world size.

:func:`validate_config` runs the checks that hold at any size (crop sizes fit the patch size, masks fit the grid,
...); :func:`validate_world_size` those that depend on the number of ranks (FSDP, batch share, micro-batches,
KoLeo's minimum). ``dino-ctl validate`` runs the second for every size a stage may run at, the trainer for the size it
got, and the runtime and data loader take their batch split from :func:`batch_share` and :func:`micro_batches`.
"""

from __future__ import annotations

import math

from trainer.config.errors import ConfigError
from trainer.config.schema import ARCHS, ModelConfig, ParallelConfig, TrainConfig

MAX_SEED = 2**32 - 1
"""Largest seed (NumPy's legacy seed range, which the data loaders and streaming's shuffle use)."""
SHUFFLE_ALGOS = ("py1e", "py1br", "py1s", "py2s", "naive")
"""mosaicml-streaming's shuffle algorithms."""

__all__ = [
    "LIMITS",
    "backbone_num_parameters",
    "batch_share",
    "micro_batches",
    "per_rank_batch",
    "split_sizes",
    "validate_config",
    "validate_fsdp",
    "validate_world_size",
]

LIMITS: dict[str, int] = {
    # Sane upper bounds: far above every DINOv2 recipe (in brackets), low enough that a typo (an extra digit or
    # three) is an error instead of a run that cannot start, and that validation itself stays fast.
    "model.img_size": 4096,  # [518]
    "data.crops.global_size": 4096,  # [518]
    "data.crops.local_size": 4096,  # [224]
    "data.crops.num_local": 32,  # [8; 10 in some ablations]
    "model.num_register_tokens": 64,  # [4]
    "heads.dino_prototypes": 1 << 20,  # [131,072]
    "heads.ibot_prototypes": 1 << 20,  # [131,072]
    "optim.global_batch_size": 1 << 20,  # [3,072]
    "optim.iterations": 100_000_000,  # [625,000]
    "loss.sinkhorn_iterations": 1000,  # [3]
    "data.num_workers": 256,  # [10]
}
"""Upper bound of each count (inclusive)."""


def validate_config(config: TrainConfig, *, world_size: int | None = None) -> None:
    """Semantic checks; raises :class:`ConfigError` naming the first offending field. With ``world_size``, also
    the rules for that many ranks (:func:`validate_world_size`)."""
    _check_bounds(config)
    _check_model(config)
    _check_crops(config)
    _check_masking(config)
    _check_optim(config)
    _check_loss(config)
    _check_data_and_stage(config)
    _check_distillation(config)
    if world_size is not None:
        validate_world_size(config, world_size)


def _value(config: TrainConfig, path: str) -> object:
    value: object = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _check_bounds(config: TrainConfig) -> None:
    """The counts first: later checks loop over grids and batch divisors, which must stay small."""
    for path, limit in LIMITS.items():
        value = _value(config, path)
        if isinstance(value, int) and value > limit:
            raise ConfigError(path, value, f"at most {limit:,} (a sane upper bound; is there an extra digit?)")


def _check_range(path: str, value: float, *, low: float, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False, why: str = "") -> None:
    """``value`` finite and within ``[low, high]`` (``(`` / ``)`` where open)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        span = f">= {low}" if high == math.inf and not low_open else (
            f"> {low}" if high == math.inf else f"{left}{low}, {high}{right}")
        raise ConfigError(path, value, f"a finite number {span}" + (f" ({why})" if why else ""))


def backbone_num_parameters(model: ModelConfig) -> int:
    """Parameters of the ViT backbone ``model`` describes (``trainer.models.DinoVisionTransformer``; a test checks
    the two agree): tokens, position embedding, patch embedding, blocks and the final norm."""
    dim, depth, _heads, ffn = model.resolved()
    grid = model.img_size // model.patch_size if model.patch_size > 0 else 0
    tokens = dim * (1 + (1 + grid * grid) + model.num_register_tokens + 1)  # cls, pos_embed, registers, mask token
    patch_embed = 3 * model.patch_size**2 * dim + dim
    if ffn == "swiglu":
        hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8  # trainer.models.layers.swiglu_hidden_dim
        feed_forward = dim * 2 * hidden + 2 * hidden + hidden * dim + dim
    else:
        feed_forward = 8 * dim * dim + 5 * dim
    block = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + dim + 2 * dim + feed_forward + dim
    return tokens + patch_embed + depth * block + 2 * dim


def _check_model(config: TrainConfig) -> None:
    m = config.model
    if m.arch not in ARCHS:
        raise ConfigError("model.arch", m.arch, "one of " + ", ".join(ARCHS))
    for name in ("embed_dim", "depth", "num_heads"):
        value = getattr(m, name)
        if value is not None and value < 1:  # 0 would silently fall back to the preset's value
            raise ConfigError(f"model.{name}", value, f"null (the {m.arch} preset's) or an integer >= 1")
    if m.patch_size < 1:
        raise ConfigError("model.patch_size", m.patch_size, "an integer >= 1 (pixels)")
    if m.num_register_tokens < 0:
        raise ConfigError("model.num_register_tokens", m.num_register_tokens, "an integer >= 0")
    dim, _depth, heads, _ffn = m.resolved()
    if dim % heads:
        raise ConfigError("model.num_heads", heads, f"a divisor of embed_dim {dim}")
    if not 0 <= m.drop_path_rate < 1:
        raise ConfigError("model.drop_path_rate", m.drop_path_rate, "0 <= rate < 1")
    _check_range("model.layerscale_init", m.layerscale_init, low=0)
    _check_range("model.interpolate_offset", m.interpolate_offset, low=0)
    if config.parallel.param_dtype == "float16":
        # float16 gradients underflow without loss scaling (the reference pairs fp16 with a GradScaler); this trainer
        # does no loss scaling, so it refuses rather than silently losing small gradients.
        raise ConfigError(
            "parallel.param_dtype", "float16", "bfloat16 or float32 (float16 needs loss scaling, which is not implemented)"
        )


def _check_crops(config: TrainConfig) -> None:
    m, crops = config.model, config.data.crops
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


def _check_masking(config: TrainConfig) -> None:
    mask = config.data.masking
    if not 0 <= mask.mask_ratio_min <= mask.mask_ratio_max <= 0.5:
        raise ConfigError("data.masking.mask_ratio_max", mask.mask_ratio_max, "0 <= mask_ratio_min <= max <= 0.5")
    if not 0 <= mask.mask_sample_probability <= 1:
        raise ConfigError("data.masking.mask_sample_probability", mask.mask_sample_probability, "0..1")
    if mask.min_block_patches < 1:
        raise ConfigError("data.masking.min_block_patches", mask.min_block_patches, "an integer >= 1")
    if config.loss.ibot_loss_weight <= 0 or mask.mask_sample_probability <= 0 or mask.mask_ratio_max <= 0:
        return
    # iBOT needs masked patches: a block (strictly smaller than the grid in both directions, as in BEiT) of at least
    # min_block_patches must fit under the cap of int(ratio_max * grid^2) patches, or iBOT silently sees no masked
    # patch in the whole run.
    grid = config.data.crops.global_size // config.model.patch_size
    cap = int(mask.mask_ratio_max * grid * grid)
    # the largest h x w block with 1 <= h, w < grid and h * w <= cap: for each height the widest width that fits
    largest = max((h * min(grid - 1, cap // h) for h in range(1, min(grid, cap + 1))), default=0)
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


def _check_optim(config: TrainConfig) -> None:
    optim = config.optim
    if optim.iterations <= 0:
        raise ConfigError("optim.iterations", optim.iterations, "a positive integer")
    if not 0 <= optim.warmup_iterations <= optim.iterations:
        raise ConfigError("optim.warmup_iterations", optim.warmup_iterations, f"0..optim.iterations ({optim.iterations})")
    if optim.global_batch_size <= 0:
        raise ConfigError("optim.global_batch_size", optim.global_batch_size, "a positive integer")
    if optim.max_micro_batch_size is not None and optim.max_micro_batch_size < 1:
        raise ConfigError("optim.max_micro_batch_size", optim.max_micro_batch_size, "null (no cap) or an integer >= 1")
    if not math.isfinite(optim.base_lr) or optim.base_lr < 0:
        raise ConfigError("optim.base_lr", optim.base_lr, "a finite non-negative number")
    if config.loss.centering == "sinkhorn" and config.loss.sinkhorn_iterations < 1:
        raise ConfigError("loss.sinkhorn_iterations", config.loss.sinkhorn_iterations, ">= 1")
    _check_range("optim.min_lr", optim.min_lr, low=0)
    for name in ("weight_decay", "weight_decay_end", "patch_embed_lr_mult", "clip_grad"):
        _check_range(f"optim.{name}", getattr(optim, name), low=0, why="0 switches it off" if name == "clip_grad"
                     else "")
    for name in ("momentum_teacher", "momentum_teacher_end"):  # EMA: teacher = m * teacher + (1 - m) * student
        _check_range(f"optim.{name}", getattr(optim, name), low=0, high=1,
                     why="an EMA momentum: above 1 the teacher diverges, below 0 it oscillates")
    _check_range("optim.layerwise_decay", optim.layerwise_decay, low=0, high=1, low_open=True,
                 why="a factor per block below the top; 1 switches it off")
    for name in ("adamw_beta1", "adamw_beta2"):
        _check_range(f"optim.{name}", getattr(optim, name), low=0, high=1, high_open=True,
                     why="a moment's decay rate")
    if optim.freeze_last_layer_iterations < 0:
        raise ConfigError("optim.freeze_last_layer_iterations", optim.freeze_last_layer_iterations, "an integer >= 0")


def _check_loss(config: TrainConfig) -> None:
    loss = config.loss
    _check_range("loss.center_momentum", loss.center_momentum, low=0, high=1, why="an EMA momentum")
    for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        _check_range(f"loss.{name}", getattr(loss, name), low=0, low_open=True, why="logits are divided by it")
    if loss.warmup_teacher_temp_iterations < 0:
        raise ConfigError("loss.warmup_teacher_temp_iterations", loss.warmup_teacher_temp_iterations, ">= 0")
    for name in ("dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight"):
        _check_range(f"loss.{name}", getattr(loss, name), low=0, why="0 switches the term off")
    if loss.dino_loss_weight == 0 and loss.ibot_loss_weight == 0:
        raise ConfigError("loss.dino_loss_weight", 0.0, "> 0 unless loss.ibot_loss_weight is (no term would train "
                          "the heads)")


def _check_data_and_stage(config: TrainConfig) -> None:
    data = config.data
    if data.dataset == "mds" and not data.streams:
        raise ConfigError("data.streams", [], "at least one stream with a remote or local MDS location")
    proportions = [s.proportion for s in data.streams]
    if any(p is not None for p in proportions) and any(p is None for p in proportions):
        raise ConfigError("data.streams[].proportion", proportions, "set on every stream or on none")
    for i, stream in enumerate(data.streams):
        chosen = [name for name in ("proportion", "repeat", "choose") if getattr(stream, name) is not None]
        if len(chosen) > 1:
            raise ConfigError(f"data.streams[{i}].{chosen[1]}", getattr(stream, chosen[1]),
                              f"null: at most one of proportion, repeat, choose per stream ({chosen[0]} is set)")
        for name in ("proportion", "repeat"):
            if getattr(stream, name) is not None:
                _check_range(f"data.streams[{i}].{name}", getattr(stream, name), low=0, low_open=True)
        if stream.choose is not None and stream.choose < 1:
            raise ConfigError(f"data.streams[{i}].choose", stream.choose, "an integer >= 1")
    for name, low in (("num_workers", 0), ("prefetch_factor", 1)):
        if getattr(data, name) < low:
            raise ConfigError(f"data.{name}", getattr(data, name), f"an integer >= {low}")
    for name in ("num_canonical_nodes", "shuffle_block_size"):
        if getattr(data, name) is not None and getattr(data, name) < 1:
            raise ConfigError(f"data.{name}", getattr(data, name), "null or an integer >= 1")
    if data.shuffle_algo not in SHUFFLE_ALGOS:
        raise ConfigError("data.shuffle_algo", data.shuffle_algo, "one of " + ", ".join(SHUFFLE_ALGOS))
    _check_range("checkpoint.preemption_grace_seconds", config.checkpoint.preemption_grace_seconds, low=0,
                 low_open=True)
    if config.metrics.log_interval < 1:
        raise ConfigError("metrics.log_interval", config.metrics.log_interval, "an integer >= 1")
    heads = config.heads
    for name in ("dino_prototypes", "dino_bottleneck", "dino_hidden", "ibot_prototypes", "ibot_bottleneck",
                 "ibot_hidden"):
        if getattr(heads, name) < 1:
            raise ConfigError(f"heads.{name}", getattr(heads, name), "an integer >= 1")
    if config.stage.kind == "highres" and not config.stage.init_from:
        raise ConfigError("stage.init_from", None, "a checkpoint directory of the previous stage for a highres stage")
    if config.stage.kind == "distill" and not config.stage.teacher_from:
        raise ConfigError("stage.teacher_from", None, "a teacher checkpoint directory for a distill stage")
    if config.checkpoint.keep_last < 0:
        raise ConfigError("checkpoint.keep_last", config.checkpoint.keep_last, ">= 0 (0 keeps all)")
    if config.checkpoint.interval_iterations < 1:
        raise ConfigError("checkpoint.interval_iterations", config.checkpoint.interval_iterations, "an integer >= 1")
    if config.heads.num_layers < 1:
        raise ConfigError("heads.num_layers", config.heads.num_layers, "an integer >= 1")
    if config.metrics.port < -1 or config.metrics.port > 65535:
        raise ConfigError("metrics.port", config.metrics.port, "-1 (off), 0 (any free port) or 1..65535")
    if not 0 <= config.seed <= MAX_SEED:
        raise ConfigError("seed", config.seed, f"0..{MAX_SEED} (NumPy's seed range; negative seeds fail)")


def _check_distillation(config: TrainConfig) -> None:
    """A distillation student learns the teacher's patch-token targets (iBOT) patch for patch, and is the smaller
    model (that is what distillation is for): same patch size, no more backbone parameters than the teacher."""
    teacher = config.stage.teacher_model
    if config.stage.kind != "distill" or teacher is None:
        return
    student = config.model
    if student.patch_size != teacher.patch_size:
        raise ConfigError("model.patch_size", student.patch_size,
                          f"the teacher's patch size ({teacher.patch_size}): iBOT matches patch tokens one to one")
    if teacher.arch not in ARCHS:
        return
    ours, theirs = backbone_num_parameters(student), backbone_num_parameters(teacher)
    if ours > theirs:
        dim, depth, _, _ = student.resolved()
        t_dim, t_depth, _, _ = teacher.resolved()
        raise ConfigError(
            "model.arch", student.arch,
            f"a student no larger than its teacher: the teacher ({teacher.arch}, width {t_dim}, depth {t_depth}) has "
            f"{theirs:,} backbone parameters, this student (width {dim}, depth {depth}) {ours:,}",
        )


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


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` contiguous sizes that differ by at most one, the larger ones first."""
    base, extra = divmod(total, parts)
    return [base + 1 if index < extra else base for index in range(parts)]


def batch_share(config: TrainConfig, world_size: int, rank: int) -> range:
    """Offsets (within each step's global batch) of the images rank ``rank`` of ``world_size`` trains on.

    The global batch of ``optim.global_batch_size`` = B images is cut into ``world_size`` contiguous shares of
    ``ceil(B / W)`` images (the first ``B % W`` ranks) or ``floor(B / W)`` (the others), so any ``W <= B`` is valid and
    a step sees the same images at every world size. Losses and gradients are weighted by the share
    (:class:`trainer.meta_arch.TrainStep`), so uneven shares still give the full-batch result.
    """
    global_batch = config.optim.global_batch_size
    if not 1 <= world_size <= global_batch:
        raise ConfigError(
            "optim.global_batch_size", global_batch,
            f"at least the world size ({world_size}): every rank trains on at least one image per step",
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank}: allowed 0 <= rank < world size {world_size}")
    sizes = split_sizes(global_batch, world_size)
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])


def per_rank_batch(config: TrainConfig, world_size: int, rank: int = 0) -> int:
    """Images rank ``rank`` trains on per step (``len(batch_share(...))``): ``ceil`` or ``floor`` of B / W."""
    return len(batch_share(config, world_size, rank))


def micro_batches(config: TrainConfig, world_size: int) -> tuple[int, int]:
    """``(count, smallest)``: every rank splits its share into ``count`` contiguous micro-batches (gradient
    accumulation), as few as ``optim.max_micro_batch_size`` allows for the largest share; ``smallest`` is the size of
    the smallest micro-batch on any rank. The count is the same on every rank: each micro-batch has collectives (the
    centering statistics, Sinkhorn-Knopp), so ranks must step through micro-batches together.
    """
    largest, smallest_share = per_rank_batch(config, world_size, 0), per_rank_batch(config, world_size, world_size - 1)
    cap = config.optim.max_micro_batch_size or largest
    count = -(-largest // cap)
    if count > smallest_share:
        needed = -(-largest // smallest_share)
        raise ConfigError(
            "optim.max_micro_batch_size",
            cap,
            f"at least {needed}: every rank splits its share into the same number of micro-batches ({count} for "
            f"the largest share of {largest} images), and the smallest share ({smallest_share}) must give each "
            "of them at least one image",
            context=f"with world size {world_size}",
        )
    return count, smallest_share // count


def validate_world_size(config: TrainConfig, world_size: int) -> None:
    """Every rule that depends on the world size: FSDP on several ranks, at least one image per rank (any world size
    up to the global batch is valid: shares may differ by one image), micro-batches every rank can fill, and at least
    two images per micro-batch for KoLeo (its nearest neighbour)."""
    validate_fsdp(config.parallel, world_size=world_size)
    smallest_share = per_rank_batch(config, world_size, world_size - 1)
    count, size = micro_batches(config, world_size)
    if config.loss.koleo_loss_weight > 0 and size < 2:
        if count == 1:
            raise ConfigError(
                "optim.global_batch_size",
                config.optim.global_batch_size,
                f"at least 2 images on every rank with KoLeo enabled (world size {world_size} gives "
                f"{smallest_share} to the smallest share); KoLeo needs a nearest neighbour, or set "
                "loss.koleo_loss_weight=0",
            )
        raise ConfigError(
            "optim.max_micro_batch_size",
            config.optim.max_micro_batch_size,
            f"a cap that leaves at least 2 images in every micro-batch with KoLeo enabled: KoLeo runs on each "
            f"micro-batch and needs a nearest neighbour (world size {world_size}: {count} micro-batches, the "
            f"smallest share {smallest_share} images); or set loss.koleo_loss_weight=0",
        )
