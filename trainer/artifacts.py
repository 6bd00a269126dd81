"""Trained backbones as files: export in the released DINOv2 layout, and load from any source for eval/curation.

An export directory holds ``backbone.safetensors`` and ``backbone.pth`` (identical tensors, released key names) and
``model.json`` (the ``ModelConfig`` to rebuild the architecture). The one-line loader::

    backbone = trainer.models.build_backbone(ModelConfig(**json.load(open("model.json"))), checkpoint="backbone.pth")

:func:`load_backbone` accepts a released-layout file, an export directory, a stage directory (newest complete or
promoted checkpoint) or one ``ckpt-*`` directory, and returns the backbone with its ``ModelConfig``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from typing import Literal

import fsspec
import torch
import torch.nn as nn
import yaml

from trainer import layout, storage
from trainer.checkpoint import load_model_weights
from trainer.config import ModelConfig, model_config_from_dict
from trainer.models import build_backbone
from trainer.models.checkpoint_io import export_backbone_state_dict

logger = logging.getLogger(__name__)

__all__ = ["export_backbone", "load_backbone", "read_model_config", "Network"]

Network = Literal["teacher", "student", "student_ema", "final"]
EXPORT_FILES = ("backbone.safetensors", "backbone.pth")
MODEL_FILE = "model.json"


def export_backbone(model: nn.Module, model_config: ModelConfig, directory: str, *, write: bool = True) -> str:
    """Write ``model`` (any backbone, FSDP-sharded too) as released-layout safetensors + .pth + model.json.

    Gathering a sharded model is collective: call on every rank, with ``write=True`` on one of them.
    """
    state_dict = export_backbone_state_dict(model)
    if not write:
        return directory
    fs, root = fsspec.core.url_to_fs(directory)
    storage.check_reachable(directory)
    storage.makedirs(fs, root)
    from safetensors.torch import save as save_safetensors

    payloads = {
        "backbone.safetensors": save_safetensors(state_dict, metadata={"format": "pt"}),
        MODEL_FILE: json.dumps(dataclasses.asdict(model_config), indent=2).encode(),
    }
    for name, data in payloads.items():
        _atomic_write(fs, f"{root}/{name}", data)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    _atomic_write(fs, f"{root}/backbone.pth", buffer.getvalue())
    logger.info("exported backbone (%d tensors) to %s", len(state_dict), directory)
    return directory


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    partial = path + ".partial"
    with fs.open(partial, "wb") as handle:
        handle.write(data)
    fs.mv(partial, path)


def read_model_config(path: str) -> ModelConfig:
    """A ``model.json`` of an export, or the ``model`` section of a stage's ``config.yaml``."""
    with fsspec.open(path, "r") as handle:
        text = handle.read()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        data = yaml.safe_load(text)["model"]
    return model_config_from_dict(data)


def _stage_dir_of(path: str) -> str:
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(f"{root.rstrip('/')}/{layout.COMPLETE_MARKER}"):  # a ckpt-* directory: its parent is the stage
        return path.rstrip("/").rsplit("/", 1)[0]
    return path


def load_backbone(
    source: str | os.PathLike[str], *, network: Network = "final", model: ModelConfig | None = None
) -> tuple[nn.Module, ModelConfig]:
    """Load a backbone for inference (eval mode, CPU) from a file, export dir, stage dir or checkpoint dir."""
    source = str(source)
    fs, root = fsspec.core.url_to_fs(source)
    if fs.isfile(root):
        sidecar = layout.join(source.rsplit("/", 1)[0] if "/" in source else ".", MODEL_FILE)
        config = model or (read_model_config(sidecar) if fs.exists(fsspec.core.url_to_fs(sidecar)[1]) else None)
        if config is None:
            raise ValueError(f"{source}: no {MODEL_FILE} beside the weights; pass the architecture (--arch)")
        return build_backbone(config, checkpoint=source).eval(), config
    if fs.exists(f"{root.rstrip('/')}/{MODEL_FILE}"):  # an export directory
        config = model or read_model_config(layout.join(source, MODEL_FILE))
        return build_backbone(config, checkpoint=layout.join(source, "backbone.safetensors")).eval(), config
    stage_dir = _stage_dir_of(source)
    if network == "final" and stage_dir == source and fs.exists(f"{root.rstrip('/')}/export/{MODEL_FILE}"):
        return load_backbone(layout.join(source, "export"), model=model)
    return _load_from_training_checkpoint(source, stage_dir, network, model)


def _load_from_training_checkpoint(
    source: str, stage_dir: str, network: Network, model: ModelConfig | None
) -> tuple[nn.Module, ModelConfig]:
    stage_config = layout.read_stage_config(stage_dir)
    if network == "final":
        network = "student_ema" if stage_config.stage.kind == "distill" else "teacher"
    config = model or stage_config.model
    if stage_config.stage.kind == "distill" and network == "teacher":
        config = stage_config.stage.teacher_model or layout.read_stage_config(stage_config.stage.teacher_from).model
    backbone = build_backbone(config, drop_path_rate=0.0)
    load_model_weights(source, {f"{network}.backbone": backbone})
    return backbone.eval(), config
