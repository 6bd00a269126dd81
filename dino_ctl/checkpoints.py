"""The checkpoint registry as stored: list, describe and promote checkpoints of each stage (torch-free, fsspec).

The layout is :mod:`trainer.layout`'s: ``<storage.checkpoints>/<stage>/ckpt-NNNNNNNNN/`` with ``COMPLETE.json``
written last, and ``PUBLISHED.json`` naming the promoted checkpoint a later stage (``init``/``teacher``) starts from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec
from trainer import layout
from trainer.storage import check_reachable, storage_errors

from dino_ctl.errors import SpecError
from dino_ctl.spec import DinoExperiment

__all__ = ["StageCheckpoints", "find_checkpoint", "promote", "published_name", "readable_location", "stage_checkpoints"]


def readable_location(uri: str) -> str:
    """A location this machine can read: file:// and paths as-is, object stores as URIs; pvc:// is refused."""
    if uri.startswith("pvc://"):
        raise SpecError("storage.checkpoints", uri, "s3://, gs:// or a local path: a PVC is readable only inside "
                        "the cluster; mount it and pass --dir with the local path")
    return uri[len("file://"):] if uri.startswith("file://") else uri


def published_name(directory: str) -> str | None:
    """The checkpoint name ``PUBLISHED.json`` names, or None."""
    fs, root = fsspec.core.url_to_fs(directory)
    path = f"{root.rstrip('/')}/{layout.PUBLISHED_FILE}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as handle:
        return json.load(handle).get("checkpoint")


@dataclass(frozen=True)
class StageCheckpoints:
    """The checkpoints of one stage directory."""

    stage: str
    directory: str
    checkpoints: list[layout.CheckpointInfo]
    published: str | None

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per checkpoint (for tables and JSON)."""
        return [
            {
                "stage": self.stage,
                "name": info.path.rstrip("/").rsplit("/", 1)[-1],
                "iteration": info.iteration,
                "complete": info.complete,
                "published": info.path.endswith("/" + (self.published or "\0")),
                "path": info.path,
                "meta": info.meta,
            }
            for info in self.checkpoints
        ]


def _read_stage(name: str, location: str) -> StageCheckpoints:
    """One stage directory as stored; a missing bucket, refused credentials or an unreachable endpoint raise
    :class:`trainer.storage.StorageError` (an object store answers "nothing there" to all three otherwise)."""
    with storage_errors(location):
        check_reachable(location)
        return StageCheckpoints(name, location, layout.list_checkpoints(location), published_name(location))


def stage_checkpoints(experiment: DinoExperiment | None, *, directory: str | None = None,
                      stage: str | None = None) -> list[StageCheckpoints]:
    """Checkpoints of every stage of ``experiment`` (or of ``stage``), or of one ``directory``."""
    if directory is not None:
        return [_read_stage(stage or "-", readable_location(directory))]
    assert experiment is not None, "an experiment or a directory is required"
    root = readable_location(experiment.spec.storage.checkpoints).rstrip("/")
    # Curation stages write a dataset, not checkpoints: only training stages are listed unless one is named.
    names = [stage] if stage else [s.name for s in experiment.spec.stages if not s.is_curation]
    found = []
    for name in names:
        experiment.spec.stage(name)  # SpecError listing the stages when unknown
        found.append(_read_stage(name, layout.join(root, name)))
    return found


def find_checkpoint(stage: StageCheckpoints, name: str | None) -> layout.CheckpointInfo:
    """The checkpoint called ``name`` (``ckpt-000001000`` or an iteration), or the newest complete one when None."""
    complete = [info for info in stage.checkpoints if info.complete]
    if name is None:
        if not complete:
            raise SpecError("checkpoint", None, f"a complete checkpoint; {stage.directory} has none")
        return complete[-1]
    wanted = layout.checkpoint_name(int(name)) if name.isdigit() else name
    for info in stage.checkpoints:
        if info.path.rstrip("/").endswith("/" + wanted):
            return info
    names = ", ".join(info.path.rsplit("/", 1)[-1] for info in stage.checkpoints) or "none exist"
    raise SpecError("checkpoint", name, f"one of the checkpoints in {stage.directory}: {names}")


def promote(stage: StageCheckpoints, name: str | None) -> layout.CheckpointInfo:
    """Write ``PUBLISHED.json`` naming checkpoint ``name``; an incomplete checkpoint is refused."""
    info = find_checkpoint(stage, name)
    if not info.complete:
        raise SpecError("checkpoint", info.path.rsplit("/", 1)[-1],
                        f"a complete checkpoint (with {layout.COMPLETE_MARKER}); this one is an interrupted write")
    fs, root = fsspec.core.url_to_fs(stage.directory)
    text = json.dumps({"checkpoint": info.path.rstrip("/").rsplit("/", 1)[-1], "iteration": info.iteration})
    # Write beside, then move: a reader never sees a half-written marker (a rename on local disks and PVCs; on an
    # object store a server-side copy, which publishes the whole object at once).
    temporary = f"{root.rstrip('/')}/.{layout.PUBLISHED_FILE}.tmp"
    with storage_errors(stage.directory, fs):
        fs.pipe_file(temporary, text.encode())
        fs.mv(temporary, f"{root.rstrip('/')}/{layout.PUBLISHED_FILE}")
    return info
