"""What the cluster says about an experiment, as a typed model built by a pure function from raw objects.

:func:`observe` takes the plain dicts the Kubernetes API returns (child jobs of any backend, their pods, the per-stage
ConfigMaps that carry dino-ctl's state annotations, and the experiment record) and reduces them to one
:class:`StageObservation` per stage. The planner (:func:`dino_ctl.plan.plan`) reads only this model, so tests feed
recorded JSON and any machine (CLI or controller) reaches the same decisions from the same cluster state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from trainer.layout import PREEMPTED_EXIT_CODE

from dino_ctl.naming import ANNOTATION_CANCEL, ANNOTATION_RESTARTS, LABEL_EXPERIMENT, LABEL_STAGE

__all__ = [
    "ANNOTATION_COUNTED_JOB",
    "JOB_KINDS",
    "LABEL_ATTEMPT",
    "Condition",
    "JobPhase",
    "Observed",
    "Reason",
    "RestartCounts",
    "StageObservation",
    "observe",
]

LABEL_ATTEMPT = "dino-ctl.io/attempt"
"""Submission number of a stage's job (0 first); pods of older attempts are ignored."""
ANNOTATION_COUNTED_JOB = "dino-ctl.io/counted-job"
"""uid of the last job whose end was counted in the restart counts: counting twice is impossible."""
JOB_KINDS = ("PyTorchJob", "TrainJob", "Job")  # Job = batch.volcano.sh (TorchX on Kubernetes)
_TRAINER_CONTAINERS = ("pytorch", "node", "trainer")
_KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # = dino_ctl.render.common.KUEUE_QUEUE_LABEL (render imports this)
# Pod conditions/reasons that mean the pod was taken away, not that the training failed.
_EVICTION_REASONS = ("Evicted", "NodeLost", "Shutdown", "Terminated", "Preempting", "UnexpectedAdmissionError")


class JobPhase(StrEnum):
    """The phase of a stage's child job, the same for every backend."""

    ABSENT = "Absent"
    PENDING = "Pending"  # created, suspended by Kueue or waiting for pods
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    DELETING = "Deleting"


class Reason(StrEnum):
    """Why a stage ended without succeeding; each reason has its own restart count and budget."""

    FAILURE = "failure"
    PREEMPTION = "preemption"
    EVICTION = "eviction"


@dataclass(frozen=True, kw_only=True)
class RestartCounts:
    """Resubmissions of one stage so far, by reason (stored as JSON in the stage ConfigMap's annotation)."""

    failure: int = 0
    preemption: int = 0
    eviction: int = 0

    def bump(self, reason: Reason) -> RestartCounts:
        """A copy with the count of ``reason`` increased by one."""
        return replace(self, **{reason.value: getattr(self, reason.value) + 1})

    def get(self, reason: Reason) -> int:
        """The count of ``reason``."""
        return int(getattr(self, reason.value))

    @property
    def total(self) -> int:
        """Resubmissions for any reason (the attempt number of the next submission)."""
        return self.failure + self.preemption + self.eviction

    def to_json(self) -> str:
        """The annotation value."""
        return json.dumps({"failure": self.failure, "preemption": self.preemption, "eviction": self.eviction})

    @classmethod
    def from_json(cls, text: str | None) -> RestartCounts:
        """Parse the annotation; a missing or garbled one counts as zero (it is rewritten on the next change)."""
        try:
            data = json.loads(text or "{}")
            return cls(**{r.value: int(data.get(r.value, 0)) for r in Reason})
        except (ValueError, TypeError, AttributeError):
            return cls()


@dataclass(frozen=True, kw_only=True)
class Condition:
    """One status condition of a job (type, status, reason, message)."""

    type: str
    status: str
    reason: str = ""
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class StageObservation:
    """Everything the planner needs about one stage."""

    stage: str
    phase: JobPhase = JobPhase.ABSENT
    job_kind: str | None = None
    job_name: str | None = None
    job_uid: str | None = None
    attempt: int = 0
    conditions: tuple[Condition, ...] = ()
    exit_codes: tuple[int, ...] = ()
    """Exit codes of terminated trainer containers of the current attempt's pods."""
    evictions: tuple[str, ...] = ()
    """Reasons pods of the current attempt were evicted, preempted or lost their node."""
    restarts: RestartCounts = field(default_factory=RestartCounts)
    counted_job_uid: str | None = None
    latest_checkpoint: int | None = None
    """Iteration of the newest complete checkpoint, when the caller read storage (see ``Observed.checkpoints_read``)."""
    queue: str | None = None
    """The Kueue LocalQueue the job waits in: set while the job is suspended and labelled with a queue."""

    @property
    def end_reason(self) -> Reason:
        """Why a failed job ended: pods taken away (eviction) beats exit 143 (preemption) beats anything else."""
        if self.evictions:
            return Reason.EVICTION
        if PREEMPTED_EXIT_CODE in self.exit_codes:
            return Reason.PREEMPTION
        return Reason.FAILURE

    @property
    def message(self) -> str:
        """The newest condition message with a true status, for status output; for a queued job, that it waits."""
        if self.queue is not None and self.phase == JobPhase.PENDING:
            # The operator only says "suspended": say why, and that nothing failed.
            return f"queued in Kueue LocalQueue {self.queue}: suspended until Kueue admits it (quota)"
        true = [c for c in self.conditions if c.status == "True" and c.message]
        return true[-1].message if true else ""


@dataclass(frozen=True, kw_only=True)
class Observed:
    """The observed state of one experiment."""

    experiment: str
    stages: Mapping[str, StageObservation] = field(default_factory=dict)
    cancel_requested: bool = False
    checkpoints_read: bool = False
    """True when ``latest_checkpoint`` values come from storage (None then means: no complete checkpoint)."""

    def stage(self, name: str) -> StageObservation:
        """The observation of stage ``name`` (an absent job when nothing was seen)."""
        return self.stages.get(name) or StageObservation(stage=name)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _conditions(status: Mapping[str, Any]) -> tuple[Condition, ...]:
    return tuple(
        Condition(type=c.get("type", ""), status=str(c.get("status", "")), reason=c.get("reason") or "",
                  message=c.get("message") or "")
        for c in status.get("conditions") or []
    )


def _job_phase(kind: str, obj: Mapping[str, Any]) -> JobPhase:
    """Map each backend's status vocabulary onto :class:`JobPhase`."""
    if _meta(obj).get("deletionTimestamp"):
        return JobPhase.DELETING
    status = obj.get("status") or {}
    if kind == "Job":  # Volcano: status.state.phase
        phase = (status.get("state") or {}).get("phase", "Pending")
        if phase == "Completed":
            return JobPhase.SUCCEEDED
        if phase in ("Failed", "Aborted", "Terminated"):
            return JobPhase.FAILED
        return JobPhase.RUNNING if phase in ("Running", "Restarting", "Completing") else JobPhase.PENDING
    true = {c.type for c in _conditions(status) if c.status == "True"}
    if true & {"Succeeded", "Complete"}:
        return JobPhase.SUCCEEDED
    if "Failed" in true:
        return JobPhase.FAILED
    if "Suspended" in true or (obj.get("spec") or {}).get("suspend") or (
        ((obj.get("spec") or {}).get("runPolicy") or {}).get("suspend")
    ):
        return JobPhase.PENDING
    if true & {"Running", "Restarting"}:
        return JobPhase.RUNNING
    active = sum(int(j.get("active") or 0) for j in status.get("jobsStatus") or [])  # TrainJob
    return JobPhase.RUNNING if active else JobPhase.PENDING


def _pod_findings(pod: Mapping[str, Any]) -> tuple[list[int], list[str]]:
    """(exit codes of terminated trainer containers, eviction reasons) of one pod."""
    status = pod.get("status") or {}
    codes = []
    for container in status.get("containerStatuses") or []:
        if container.get("name") not in _TRAINER_CONTAINERS:
            continue
        for state in (container.get("state") or {}, container.get("lastState") or {}):
            terminated = state.get("terminated")
            if terminated and terminated.get("exitCode") is not None:
                codes.append(int(terminated["exitCode"]))
    evictions = [status["reason"]] if status.get("reason") in _EVICTION_REASONS else []
    evictions += [
        c.get("reason") or "DisruptionTarget"
        for c in status.get("conditions") or []
        if c.get("type") == "DisruptionTarget" and c.get("status") == "True"
    ]
    if _meta(pod).get("deletionTimestamp") and not evictions:
        # Deleted, not disrupted: the training-operator's cleanPodPolicy stops a failed job's other workers (their
        # SIGTERM checkpoint ends in 143), as does the job's own deletion. That exit says nothing about why the job
        # ended; counting it would turn a genuine failure (exit 1) into a preemption that spends no budget.
        codes = []
    return codes, evictions


def _stage_of(obj: Mapping[str, Any], experiment: str) -> str | None:
    labels = _meta(obj).get("labels") or {}
    if labels.get(LABEL_EXPERIMENT) != experiment:
        return None
    return labels.get(LABEL_STAGE)


def _attempt(obj: Mapping[str, Any]) -> int:
    try:
        return int((_meta(obj).get("labels") or {}).get(LABEL_ATTEMPT, 0))
    except ValueError:
        return 0


def _is_experiment_object(obj: Mapping[str, Any], experiment: str) -> bool:
    labels = _meta(obj).get("labels") or {}
    is_resource = obj.get("kind") == "DinoExperiment" and _meta(obj).get("name") == experiment
    return labels.get(LABEL_EXPERIMENT) == experiment or is_resource


def _stage_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What one job or stage ConfigMap contributes to its :class:`StageObservation` (empty for other objects)."""
    kind = obj.get("kind")
    annotations = _meta(obj).get("annotations") or {}
    if kind in JOB_KINDS:
        spec = obj.get("spec") or {}
        suspended = bool(spec.get("suspend") or (spec.get("runPolicy") or {}).get("suspend")) or any(
            c.type == "Suspended" and c.status == "True" for c in _conditions(obj.get("status") or {}))
        return {"job_kind": kind, "job_name": _meta(obj).get("name"), "job_uid": _meta(obj).get("uid"),
                "phase": _job_phase(kind, obj), "conditions": _conditions(obj.get("status") or {}),
                "attempt": _attempt(obj),
                "queue": (_meta(obj).get("labels") or {}).get(_KUEUE_QUEUE_LABEL) if suspended else None}
    if kind == "ConfigMap" and ANNOTATION_RESTARTS in annotations:
        return {"restarts": RestartCounts.from_json(annotations.get(ANNOTATION_RESTARTS)),
                "counted_job_uid": annotations.get(ANNOTATION_COUNTED_JOB)}
    return {}


def observe(
    objects: Iterable[Mapping[str, Any]],
    *,
    experiment: str,
    checkpoints: Mapping[str, int | None] | None = None,
) -> Observed:
    """Reduce raw Kubernetes objects (dicts, as the API returns them) to an :class:`Observed`.

    ``objects`` may hold anything; only objects labelled ``dino-ctl.io/experiment=<experiment>`` count: child jobs
    (PyTorchJob, TrainJob, Volcano Job), their pods, the per-stage ConfigMaps (restart counts) and the experiment
    record (ConfigMap or DinoExperiment; annotation ``dino-ctl.io/cancel-requested``). ``checkpoints`` maps a stage to
    the iteration of its newest complete checkpoint (None: none) when the caller read storage.
    """
    mine = [obj for obj in objects if _is_experiment_object(obj, experiment)]
    cancel = any((_meta(obj).get("annotations") or {}).get(ANNOTATION_CANCEL) == "true" for obj in mine)
    stages: dict[str, dict[str, Any]] = {}
    for obj in mine:
        stage = (_meta(obj).get("labels") or {}).get(LABEL_STAGE)
        fields = _stage_fields(obj)
        if stage is not None and fields:
            stages.setdefault(stage, {"stage": stage}).update(fields)
    for obj in mine:  # pods second: only those of the current attempt of their stage's job count
        stage = _stage_of(obj, experiment)
        if obj.get("kind") != "Pod" or stage not in stages or _attempt(obj) != stages[stage].get("attempt", 0):
            continue
        codes, evictions = _pod_findings(obj)
        stages[stage]["exit_codes"] = (*stages[stage].get("exit_codes", ()), *codes)
        stages[stage]["evictions"] = (*stages[stage].get("evictions", ()), *evictions)
    for stage, iteration in (checkpoints or {}).items():
        stages.setdefault(stage, {"stage": stage})["latest_checkpoint"] = iteration
    return Observed(
        experiment=experiment,
        stages={name: StageObservation(**values) for name, values in stages.items()},
        cancel_requested=cancel,
        checkpoints_read=checkpoints is not None,
    )
