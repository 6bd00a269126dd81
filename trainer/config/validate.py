"""Semantic checks of a resolved config, and the rules that depend on the world size.

:func:`validate_config` runs the checks that hold at any size (crop sizes fit the patch size, masks fit the grid,
...); :func:`validate_world_size` those that depend on the number of ranks (FSDP, batch share, micro-batches,
KoLeo's minimum). ``dino-ctl validate`` runs the second for every size a stage may run at, the trainer for the size it
got, and the runtime and data loader take their batch split from :func:`per_rank_batch` and :func:`micro_batches`.
"""

from __future__ import annotations

import math

from trainer.config.errors import ConfigError
from trainer.config.schema import ARCHS, ParallelConfig, TrainConfig

__all__ = ["micro_batches", "per_rank_batch", "validate_config", "validate_fsdp", "validate_world_size"]


def validate_config(config: TrainConfig, *, world_size: int | None = None) -> None:
    """Semantic checks; raises :class:`ConfigError` naming the first offending field. With ``world_size``, also
    the rules for that many ranks (:func:`validate_world_size`)."""
    _check_model(config)
    _check_crops(config)
    _check_masking(config)
    _check_optim(config)
    _check_data_and_stage(config)
    if world_size is not None:
        validate_world_size(config, world_size)


def _check_model(config: TrainConfig) -> None:
    m = config.model
    if m.arch not in ARCHS:
        raise ConfigError("model.arch", m.arch, "one of " + ", ".join(ARCHS))
    dim, _depth, heads, _ffn = m.resolved()
    if dim % heads:
        raise ConfigError("model.num_heads", heads, f"a divisor of embed_dim {dim}")
    if not 0 <= m.drop_path_rate < 1:
        raise ConfigError("model.drop_path_rate", m.drop_path_rate, "0 <= rate < 1")
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


def _check_data_and_stage(config: TrainConfig) -> None:
    if config.data.dataset == "mds" and not config.data.streams:
        raise ConfigError("data.streams", [], "at least one stream with a remote or local MDS location")
    proportions = [s.proportion for s in config.data.streams]
    if any(p is not None for p in proportions) and any(p is None for p in proportions):
        raise ConfigError("data.streams[].proportion", proportions, "set on every stream or on none")
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
