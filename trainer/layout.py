"""Checkpoint directory layout, shared by the trainer and the control plane (torch-free, fsspec only).

::

    <checkpoint.dir>/                    local path or fsspec URI (s3://, gs://, file://)
        config.yaml                      the resolved TrainConfig of the stage (:func:`write_stage_config`: by
                                         ``dino-ctl run`` before launch and by rank 0 at start; the same text is
                                         the stage ConfigMap's ``config.yaml``)
        ckpt-000001000/                  one torch.distributed.checkpoint (DCP) directory per saved iteration
            .metadata, __0_0.distcp ...  DCP files (sharded: one file per rank)
            extra-rank00000.json ...     per-rank non-tensor state (data-loader position, RNG) where needed
            COMPLETE.json                written LAST: iteration, world_size, time, losses. No marker = not a checkpoint
        PUBLISHED.json                   optional: {"checkpoint": "ckpt-000001000"}, set by ``dino-ctl checkpoints promote``
        export/                          released-DINOv2-layout backbone (safetensors / .pth) of the final model

A directory without ``COMPLETE.json`` is an interrupted write and is never used for resume or promotion.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import fsspec
import yaml

from trainer import storage
from trainer.config import TrainConfig, config_from_dict, config_to_dict

__all__ = [
    "COMPLETE_MARKER",
    "PREEMPTED_EXIT_CODE",
    "CONFIG_FILE",
    "PUBLISHED_FILE",
    "CheckpointInfo",
    "checkpoint_name",
    "list_checkpoints",
    "latest_complete",
    "published_or_latest",
    "join",
    "read_stage_config",
    "stage_config_text",
    "write_stage_config",
]

COMPLETE_MARKER = "COMPLETE.json"
CONFIG_FILE = "config.yaml"
PUBLISHED_FILE = "PUBLISHED.json"
PREEMPTED_EXIT_CODE = 143
"""Exit code of a trainer stopped by SIGTERM after publishing a checkpoint (128 + SIGTERM): the control plane
resubmits such a stage without counting a failure. Defined here, torch-free, for trainer and control plane alike."""
_NAME = re.compile(r"^ckpt-(\d{9})$")


def stage_config_text(config: TrainConfig) -> str:
    """The YAML text of a stage's resolved config: the one serialisation of :data:`CONFIG_FILE`, on disk and in the
    stage's ConfigMap alike."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def write_stage_config(directory: str, config: TrainConfig) -> str:
    """Write ``config`` as ``<directory>/config.yaml`` (creating ``directory``); returns the file's location."""
    fs, root = fsspec.core.url_to_fs(directory)
    storage.makedirs(fs, root)
    path = join(directory, CONFIG_FILE)
    with fsspec.open(path, "w") as handle:
        handle.write(stage_config_text(config))
    return path


def read_stage_config(directory: str) -> TrainConfig:
    """The resolved config a stage wrote next to its checkpoints (:func:`write_stage_config`)."""
    with fsspec.open(join(directory, CONFIG_FILE), "r") as handle:
        return config_from_dict(yaml.safe_load(handle))


def checkpoint_name(iteration: int) -> str:
    return f"ckpt-{iteration:09d}"


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint directory as found in storage."""

    path: str
    iteration: int
    complete: bool
    meta: dict[str, Any]


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root


def list_checkpoints(directory: str) -> list[CheckpointInfo]:
    """All ``ckpt-*`` directories under ``directory`` sorted by iteration, complete or not."""
    fs, root = _fs(directory)
    if not fs.exists(root):
        return []
    found = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = _NAME.match(name)
        if not match:
            continue
        marker = f"{entry.rstrip('/')}/{COMPLETE_MARKER}"
        meta: dict[str, Any] = {}
        complete = fs.exists(marker)
        if complete:
            with fs.open(marker, "r") as handle:
                meta = json.load(handle)
        found.append(CheckpointInfo(join(directory, name), int(match.group(1)), complete, meta))
    return sorted(found, key=lambda info: info.iteration)


def latest_complete(directory: str) -> CheckpointInfo | None:
    """The newest checkpoint that has its completion marker, or None."""
    complete = [info for info in list_checkpoints(directory) if info.complete]
    return complete[-1] if complete else None


def published_or_latest(directory: str) -> CheckpointInfo | None:
    """The promoted checkpoint if ``PUBLISHED.json`` names a complete one, else the newest complete one."""
    fs, root = _fs(directory)
    published = f"{root.rstrip('/')}/{PUBLISHED_FILE}"
    if fs.exists(published):
        with fs.open(published, "r") as handle:
            name = json.load(handle)["checkpoint"]
        for info in list_checkpoints(directory):
            if info.path.endswith("/" + name) and info.complete:
                return info
    return latest_complete(directory)
