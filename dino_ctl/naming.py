"""Names, labels and annotations of every object dino-ctl creates (pure functions, shared by renderers and planner).

Child objects are called ``<experiment>-<stage>``. Kubernetes derives pod, service and host names from a job's name
(``<job>-worker-12`` for PyTorchJob, ``<job>-node-0-3`` for JobSet), and Services need DNS-1035 labels of at most 63
characters, so a job's name is capped at :data:`MAX_CHILD_NAME` characters: longer names keep a readable prefix and end
in a short hash of the full name, so two long names never collide.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "ANNOTATION_CANCEL",
    "ANNOTATION_RESTARTS",
    "ANNOTATION_SPEC_HASH",
    "LABEL_COMPONENT",
    "LABEL_EXPERIMENT",
    "LABEL_MANAGED_BY",
    "LABEL_NAME",
    "LABEL_STAGE",
    "MANAGED_BY",
    "MAX_CHILD_NAME",
    "child_name",
    "experiment_labels",
    "stage_labels",
    "truncate_name",
]

LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_EXPERIMENT = "dino-ctl.io/experiment"
LABEL_STAGE = "dino-ctl.io/stage"
MANAGED_BY = "dino-ctl"
APP_NAME = "dino-ctl"

ANNOTATION_RESTARTS = "dino-ctl.io/restarts"
"""JSON ``{"failure": n, "preemption": n, "eviction": n}``: resubmissions of the stage so far, by reason."""
ANNOTATION_CANCEL = "dino-ctl.io/cancel-requested"
"""``"true"`` on the experiment record: every stage is stopped and none is started."""
ANNOTATION_SPEC_HASH = "dino-ctl.io/spec-hash"
"""Hash of the stage's resolved trainer config, to tell an unchanged resubmission from an edited spec."""

# 63 (DNS-1035 label) minus "-worker-" and three digits of a replica index: PyTorchJob's longest derived name.
MAX_CHILD_NAME = 52
_HASH_LENGTH = 6


def truncate_name(name: str, max_length: int = MAX_CHILD_NAME) -> str:
    """``name`` unchanged when short enough, else a prefix plus ``-`` and a 6-hex-digit hash of the full name."""
    if len(name) <= max_length:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LENGTH]
    prefix = name[: max_length - _HASH_LENGTH - 1].rstrip("-")
    return f"{prefix}-{digest}"


def child_name(experiment: str, stage: str, suffix: str = "", *, max_length: int = MAX_CHILD_NAME) -> str:
    """Name of a stage's child object: ``<experiment>-<stage>[-<suffix>]``.

    When too long, the longest part is shortened first (so both experiment and stage stay recognisable), then a
    6-hex-digit hash of the full name is appended, which keeps distinct names distinct.
    """
    parts = [part for part in (experiment, stage, suffix) if part]
    full = "-".join(parts)
    if len(full) <= max_length:
        return full
    budget = max_length - _HASH_LENGTH - 1
    while len("-".join(parts)) > budget:
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        parts[longest] = parts[longest][:-1]
    digest = hashlib.sha256(full.encode()).hexdigest()[:_HASH_LENGTH]
    prefix = "-".join(part.rstrip("-") for part in parts if part.rstrip("-"))
    return f"{prefix}-{digest}"


def experiment_labels(experiment: str, *, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Labels every object of an experiment carries (user labels first so ours win)."""
    return {
        **(extra or {}),
        LABEL_NAME: APP_NAME,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_EXPERIMENT: experiment,
    }


def stage_labels(experiment: str, stage: str, *, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Labels of a stage's child objects: the experiment labels plus ``dino-ctl.io/stage``."""
    return {**experiment_labels(experiment, extra=extra), LABEL_STAGE: stage}
