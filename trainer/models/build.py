"""Build a backbone from a preset name or a ``ModelConfig``, optionally loading released-layout weights."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from trainer.config import ConfigError, ModelConfig
from trainer.models.checkpoint_io import load_backbone_state_dict, read_checkpoint
from trainer.models.vision_transformer import DinoVisionTransformer

__all__ = ["build_backbone"]

_FIELDS = tuple(field.name for field in dataclasses.fields(ModelConfig))


def build_backbone(
    model: str | ModelConfig, *, checkpoint: str | os.PathLike[str] | None = None, **overrides: Any
) -> DinoVisionTransformer:
    """A :class:`DinoVisionTransformer` on the current default device (``with torch.device("meta")`` works).

    Args:
        model: a preset name of ``trainer.config.ARCHS`` (the other fields take ``ModelConfig`` defaults) or a
            ``ModelConfig``.
        checkpoint: a released-layout ``.pth``/``.safetensors`` file (flat or chunked blocks) to load, strictly.
        **overrides: ``ModelConfig`` fields replacing the given ones, e.g. ``drop_path_rate=0.0``.

    Example: the released ViT-S/14 with registers is ``build_backbone("vit_small", patch_size=14, img_size=518,
    num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0, checkpoint=path)``.
    """
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"model.{unknown[0]}", overrides[unknown[0]], "a ModelConfig field: " + ", ".join(_FIELDS))
    config = ModelConfig(arch=model) if isinstance(model, str) else model
    config = dataclasses.replace(config, **overrides)
    backbone = DinoVisionTransformer(config)
    if checkpoint is not None:
        load_backbone_state_dict(backbone, read_checkpoint(checkpoint))
    return backbone
