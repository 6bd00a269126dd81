"""The planner: one pure function from (spec, observed cluster state) to the actions that move the experiment on.

Used by ``dino-ctl submit --wait`` / ``resume`` (client side) and by the in-cluster controller, so both make the same
decisions. It is level-triggered and idempotent: calling it again on the same state returns the same actions, and
executing an action twice does no harm (restart counts are keyed by the uid of the job they count).

Rules, per stage, in the stage graph's order:

- absent job, every dependency succeeded (and, when storage was read, every init/teacher source has a complete
  checkpoint) -> ``SUBMIT``; the trainer resumes from the newest complete checkpoint in the stage's directory, a
  curation stage from the shards its steps finished. A stage with ``data: {from: C}`` depends on curation stage C.
- failed job -> classify (:attr:`StageObservation.end_reason`): eviction or preemption (exit 143) resubmit without
  touching the failure budget (each has its own optional cap); a genuine failure is counted against
  ``failureBudget.failure``. Within budget -> ``DELETE`` (recording the new counts), then ``SUBMIT`` on the next pass;
  over budget -> ``FAIL_STAGE`` (the failed job is kept for inspection).
- cancel requested -> ``DELETE`` every unfinished (pending or running) job, submit nothing; succeeded and failed
  jobs stay, so ``resume`` continues from the stage that was stopped.
- every stage succeeded -> ``COMPLETE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import ClassVar, Literal

from dino_ctl.observe import JobPhase, Observed, Reason, RestartCounts, StageObservation, observe
from dino_ctl.spec import DinoExperiment, FailureBudget
from dino_ctl.stages import resolve_experiment

__all__ = [
    "Action",
    "ActionKind",
    "Complete",
    "DeleteJob",
    "ExperimentPhase",
    "FailStage",
    "JobPhase",
    "Observed",
    "Reason",
    "RestartCounts",
    "StageObservation",
    "SubmitStage",
    "experiment_phase",
    "observe",
    "plan",
    "stage_budget_left",
]


class ActionKind(StrEnum):
    SUBMIT = "submit"
    """Apply the stage's ConfigMap (carrying ``restarts`` and ``counted_job_uid``), then create its job."""
    DELETE = "delete"
    """Record ``restarts`` (and ``counted_job_uid``) on the stage ConfigMap, then delete the stage's job."""
    FAIL_STAGE = "fail-stage"
    """The stage is over its budget: report it failed; dependents never start."""
    COMPLETE = "complete"
    """Every stage succeeded."""


class ExperimentPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


@dataclass(frozen=True, kw_only=True)
class _ActionFields:
    """What every action answers, so an executor reads any of them the same way; each kind below makes the fields
    it needs required (``= field()``: a redeclared field would otherwise inherit the default)."""

    stage: str | None = None
    reason: str = ""
    """``start``, ``resubmit``, ``retry``, ``cancel`` or a :class:`Reason` value (why a job goes or comes back)."""
    restarts: RestartCounts | None = None
    attempt: int = 0
    counted_job_uid: str | None = None
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class SubmitStage(_ActionFields):
    """Apply the stage's ConfigMap (carrying ``restarts`` and ``counted_job_uid``), then create its job."""

    kind: ClassVar[ActionKind] = ActionKind.SUBMIT
    stage: str = field()
    reason: Literal["start", "resubmit"] = field()
    restarts: RestartCounts = field()
    """The counts the ConfigMap records (unchanged by a submission)."""
    attempt: int = field()
    """Number of this submission: every resubmission bumps one count, so the total numbers them (a pod label)."""


@dataclass(frozen=True, kw_only=True)
class DeleteJob(_ActionFields):
    """Record ``restarts`` (and ``counted_job_uid``) on the stage ConfigMap when set, then delete the stage's job."""

    kind: ClassVar[ActionKind] = ActionKind.DELETE
    stage: str = field()
    reason: str = field()
    """``cancel`` (nothing counted), ``retry`` (a spent budget reset) or the :class:`Reason` counted."""


@dataclass(frozen=True, kw_only=True)
class FailStage(_ActionFields):
    """The stage is over its budget: report it failed; dependents never start. The failed job is kept."""

    kind: ClassVar[ActionKind] = ActionKind.FAIL_STAGE
    stage: str = field()
    reason: str = field()
    restarts: RestartCounts = field()


@dataclass(frozen=True, kw_only=True)
class Complete(_ActionFields):
    """Every stage succeeded."""

    kind: ClassVar[ActionKind] = ActionKind.COMPLETE


Action = SubmitStage | DeleteJob | FailStage | Complete
"""One step for an executor (CLI or controller): one type per :class:`ActionKind`, each with the fields it needs."""


def _cap(budget: FailureBudget, reason: Reason) -> int | None:
    return {Reason.FAILURE: budget.failure, Reason.PREEMPTION: budget.preemption, Reason.EVICTION: budget.eviction}[
        reason
    ]


def stage_budget_left(budget: FailureBudget, observation: StageObservation, reason: Reason) -> int | None:
    """Resubmissions left for ``reason`` (None: unlimited)."""
    cap = _cap(budget, reason)
    return None if cap is None else max(cap - observation.restarts.get(reason), 0)


def _failed_stage(spec: DinoExperiment, obs: StageObservation, *, retry_failed: bool) -> Action:
    reason = obs.end_reason
    already_counted = obs.job_uid is not None and obs.job_uid == obs.counted_job_uid
    counts = obs.restarts if already_counted else obs.restarts.bump(reason)
    cap = _cap(spec.spec.failure_budget, reason)
    codes = ",".join(str(code) for code in sorted(set(obs.exit_codes))) or "none"
    detail = f"{reason.value} (exit codes {codes}; evictions {','.join(obs.evictions) or 'none'})"
    if cap is not None and counts.get(reason) > cap:
        if retry_failed:
            return DeleteJob(stage=obs.stage, reason="retry", counted_job_uid=obs.job_uid,
                             restarts=replace(counts, **{reason.value: 0}),
                             message=f"retrying after {detail}; {reason.value} count reset")
        return FailStage(stage=obs.stage, reason=reason.value, restarts=obs.restarts,
                         message=f"{detail}: {reason.value} budget of {cap} spent")
    # A curation stage has no checkpoints: its steps resume from the shards they finished.
    resume = "its finished curation shards" if spec.spec.stage(obs.stage).is_curation else "the latest checkpoint"
    return DeleteJob(stage=obs.stage, reason=reason.value, restarts=counts, counted_job_uid=obs.job_uid,
                     message=f"{detail}; resubmitting from {resume}")


def _blocked(spec: DinoExperiment, observed: Observed, stage_name: str) -> str | None:
    """Why stage ``stage_name`` may not start yet (None: it may)."""
    stage = spec.spec.stage(stage_name)
    for dep in stage.dependencies():
        if observed.stage(dep).phase != JobPhase.SUCCEEDED:
            return f"waiting for stage {dep}"
    sources = [ref.from_ for ref in (stage.init, stage.teacher) if ref is not None]
    for source in sources:
        if observed.checkpoints_read and observed.stage(source).latest_checkpoint is None:
            return f"stage {source} succeeded without a complete checkpoint"
    return None


def plan(spec: DinoExperiment, observed: Observed, *, retry_failed: bool = False) -> list[Action]:
    """The actions that move ``spec`` on from ``observed``: deletions first, then submissions, then completion.

    ``retry_failed`` (``dino-ctl resume --retry-failed``) gives stages over their failure budget a fresh budget.
    Pure: no I/O, no clock, no randomness.
    """
    stages = [observed.stage(name) for name in resolve_experiment(spec).order]
    if observed.cancel_requested:
        # Only unfinished jobs stop: a succeeded job is the record that its stage is done (resume must not run it
        # again) and a failed one is kept for inspection.
        return [
            DeleteJob(stage=obs.stage, reason="cancel", message="cancel requested")
            for obs in stages
            if obs.phase in (JobPhase.PENDING, JobPhase.RUNNING)
        ]
    if all(obs.phase == JobPhase.SUCCEEDED for obs in stages):
        return [Complete(message=f"all {len(stages)} stages succeeded")]
    deletes: list[Action] = []
    submits: list[Action] = []
    failures: list[Action] = []
    for obs in stages:
        if obs.phase == JobPhase.FAILED:
            action = _failed_stage(spec, obs, retry_failed=retry_failed)
            (failures if action.kind == ActionKind.FAIL_STAGE else deletes).append(action)
        elif obs.phase == JobPhase.ABSENT:
            if _blocked(spec, observed, obs.stage) is None:
                # Every resubmission bumps one count, so the total numbers the attempts (pods carry it as a label).
                attempt = obs.restarts.total
                submits.append(SubmitStage(stage=obs.stage, restarts=obs.restarts, attempt=attempt,
                                           counted_job_uid=obs.counted_job_uid,
                                           reason="start" if obs.restarts.total == 0 else "resubmit"))
    return [*deletes, *submits, *failures]


def experiment_phase(spec: DinoExperiment, observed: Observed) -> ExperimentPhase:
    """The experiment's phase as ``dino-ctl status`` and the controller's status report it."""
    stages = [observed.stage(name) for name in resolve_experiment(spec).order]
    active = [obs for obs in stages if obs.phase not in (JobPhase.ABSENT, JobPhase.SUCCEEDED, JobPhase.FAILED)]
    if observed.cancel_requested:
        return ExperimentPhase.CANCELLED
    if all(obs.phase == JobPhase.SUCCEEDED for obs in stages):
        return ExperimentPhase.SUCCEEDED
    if any(a.kind == ActionKind.FAIL_STAGE for a in plan(spec, observed)) and not active:
        return ExperimentPhase.FAILED
    if any(obs.phase != JobPhase.ABSENT for obs in stages):
        return ExperimentPhase.RUNNING
    return ExperimentPhase.PENDING
