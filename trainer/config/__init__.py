"""The trainer's typed configuration: one contract shared by the trainer, the control plane and curation.

A small package, standard library (and PyYAML) only, so ``dino-ctl validate`` never loads torch:

- :mod:`~trainer.config.schema`: the dataclass tree (``TrainConfig`` and its sections), a docstring under every field;
- :mod:`~trainer.config.recipes`: the named DINOv2 recipes as values over the defaults;
- :mod:`~trainer.config.resolve`: defaults <- recipe <- file <- dotted overrides, type-checked with field paths;
- :mod:`~trainer.config.validate`: semantic checks, and the rules that depend on the world size;
- :mod:`~trainer.config.loading`: the one reader of YAML spec and config files (one bounded UTF-8 mapping, no
  duplicate keys, no alias bombs, JSON types only);
- :mod:`~trainer.config.errors`: :class:`ConfigError` (field path, bad value, what is allowed) and the translation of
  pydantic's errors into it.

Everything is re-exported here: ``from trainer.config import TrainConfig, resolve_config`` is the public import.
"""

from __future__ import annotations

from trainer.config.errors import ConfigError, pydantic_errors, short_repr
from trainer.config.loading import MAX_ALIAS_NODES, MAX_BYTES, MAX_DEPTH, parse_yaml_mapping, read_yaml_mapping
from trainer.config.recipes import RECIPES
from trainer.config.resolve import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config_file,
    model_config_from_dict,
    parse_override,
    resolve_config,
    with_overrides,
)
from trainer.config.schema import (
    ARCHS,
    CheckpointConfig,
    CropConfig,
    DataConfig,
    HeadConfig,
    LossConfig,
    MaskConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    StageConfig,
    StreamConfig,
    TrainConfig,
)
from trainer.config.validate import (
    LIMITS,
    backbone_num_parameters,
    batch_share,
    micro_batches,
    per_rank_batch,
    split_sizes,
    validate_config,
    validate_fsdp,
    validate_world_size,
)

__all__ = [
    "ARCHS",
    "LIMITS",
    "MAX_ALIAS_NODES",
    "MAX_BYTES",
    "MAX_DEPTH",
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
    "backbone_num_parameters",
    "batch_share",
    "config_from_dict",
    "config_to_dict",
    "load_config_file",
    "micro_batches",
    "model_config_from_dict",
    "parse_override",
    "parse_yaml_mapping",
    "per_rank_batch",
    "pydantic_errors",
    "read_yaml_mapping",
    "resolve_config",
    "short_repr",
    "split_sizes",
    "validate_config",
    "validate_fsdp",
    "validate_world_size",
    "with_overrides",
]
