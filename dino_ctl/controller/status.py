"""The ``status`` of a DinoExperiment, built by pure functions from the observation and the planned actions.

What ``kubectl get/describe dinoexperiment`` shows: the experiment's ``phase`` and ``currentStage`` (the CRD's printer
columns), a one-line ``message``, experiment conditions with transition times, and one entry per stage (in stage
order) with its phase, job, attempt, restarts by reason, latest checkpoint, the job's conditions mirrored and a
message saying what the stage waits for or why it restarted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dino_ctl.observe import JobPhase, Observed, Reason, StageObservation
from dino_ctl.plan import Action, ActionKind, ExperimentPhase
from dino_ctl.spec import DinoExperiment
from dino_ctl.validation import stage_order

__all__ = ["INVALID_PHASE", "StagePhase", "experiment_status", "invalid_status", "stage_phase"]

INVALID_PHASE = "Invalid"
"""Experiment phase when the spec does not validate (nothing is submitted until it is fixed)."""
_CONDITION_TYPES = ("Running", "Succeeded", "Failed")


class StagePhase:
    """Stage phases as users read them (a superset of the job's :class:`JobPhase`)."""

    WAITING = "Waiting"  # dependencies not done yet
    PENDING = "Pending"  # submitted now, or created and waiting for pods / Kueue admission
    RUNNING = "Running"
    RESTARTING = "Restarting"  # the failed/preempted job is being deleted and will be resubmitted
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"  # over its budget: dependents never start
    CANCELLED = "Cancelled"


def _waiting_for(experiment: DinoExperiment, observed: Observed, stage: str) -> str:
    dependencies = experiment.spec.stage(stage).dependencies()
    unfinished = [d for d in dependencies if observed.stage(d).phase != JobPhase.SUCCEEDED]
    if unfinished:
        return "waiting for stage " + ", ".join(unfinished)
    return "waiting for a complete checkpoint of its init/teacher stage"


def stage_phase(obs: StageObservation, action: Action | None, *, cancelled: bool) -> str:
    """The user-facing phase of one stage, given the action planned for it in this pass (if any)."""
    if obs.phase == JobPhase.SUCCEEDED:
        return StagePhase.SUCCEEDED
    if cancelled:
        return StagePhase.CANCELLED
    if action is not None and action.kind == ActionKind.FAIL_STAGE:
        return StagePhase.FAILED
    if obs.phase in (JobPhase.FAILED, JobPhase.DELETING) or (action and action.kind == ActionKind.DELETE):
        return StagePhase.RESTARTING
    if obs.phase == JobPhase.RUNNING:
        return StagePhase.RUNNING
    if obs.phase == JobPhase.PENDING or (action and action.kind == ActionKind.SUBMIT):
        return StagePhase.PENDING
    return StagePhase.WAITING


def _stage_message(experiment: DinoExperiment, observed: Observed, obs: StageObservation, phase: str,
                   action: Action | None) -> str:
    if action is not None and action.message:
        return action.message
    if phase == StagePhase.WAITING:
        return _waiting_for(experiment, observed, obs.stage)
    if phase == StagePhase.PENDING and action is not None:
        return f"submitting attempt {action.attempt}"
    return obs.message


def _stage_entry(experiment: DinoExperiment, observed: Observed, obs: StageObservation, action: Action | None) -> dict:
    phase = stage_phase(obs, action, cancelled=observed.cancel_requested)
    restarts = action.restarts if action is not None and action.restarts is not None else obs.restarts
    entry: dict[str, Any] = {
        "name": obs.stage,
        "phase": phase,
        "attempt": action.attempt if action is not None and action.kind == ActionKind.SUBMIT else obs.attempt,
        "restarts": {reason.value: restarts.get(reason) for reason in Reason},
    }
    if obs.job_name:
        entry["job"] = {"kind": obs.job_kind, "name": obs.job_name}
    if observed.checkpoints_read and not experiment.spec.stage(obs.stage).is_curation:  # curation writes none
        entry["latestCheckpoint"] = obs.latest_checkpoint
    if obs.conditions:
        entry["conditions"] = [
            {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message} for c in obs.conditions
        ]
    if obs.exit_codes:
        entry["exitCodes"] = sorted(set(obs.exit_codes))
    if obs.evictions:
        entry["evictions"] = sorted(set(obs.evictions))
    message = _stage_message(experiment, observed, obs, phase, action)
    if message:
        entry["message"] = message
    return entry


def _conditions(
    true_type: str, reason: str, message: str, previous: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """Experiment conditions (``true_type`` is True, the others False); a time moves only when a status changes."""
    before = {c.get("type"): c for c in previous}
    conditions = []
    for kind in _CONDITION_TYPES:
        status = "True" if true_type == kind else "False"
        old = before.get(kind, {})
        changed = old.get("status") != status
        conditions.append({
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message if status == "True" else "",
            "lastTransitionTime": now if changed or "lastTransitionTime" not in old else old["lastTransitionTime"],
        })
    return conditions


def _summary(phase: ExperimentPhase, stages: list[dict[str, Any]]) -> tuple[str | None, str]:
    active = [s for s in stages if s["phase"] not in (StagePhase.SUCCEEDED, StagePhase.WAITING)]
    current = ",".join(s["name"] for s in active) or next(
        (s["name"] for s in stages if s["phase"] != StagePhase.SUCCEEDED), None
    )
    done = sum(s["phase"] == StagePhase.SUCCEEDED for s in stages)
    if phase == ExperimentPhase.SUCCEEDED:
        return None, f"all {len(stages)} stages succeeded"
    failed = [s for s in stages if s["phase"] == StagePhase.FAILED]
    if failed:
        return failed[0]["name"], f"stage {failed[0]['name']} failed: {failed[0].get('message', '')}".rstrip(": ")
    if phase == ExperimentPhase.CANCELLED:
        return current, "cancelled: every job is stopped and none is started"
    details = "; ".join(f"{s['name']} {s['phase'].lower()}" for s in active) or "nothing running"
    return current, f"{done}/{len(stages)} stages succeeded; {details}"


def experiment_status(
    experiment: DinoExperiment,
    observed: Observed,
    actions: Sequence[Action],
    phase: ExperimentPhase,
    *,
    previous: Mapping[str, Any] | None,
    now: str,
    generation: int | None = None,
) -> dict[str, Any]:
    """The whole ``status`` object for this pass (``now`` is an RFC 3339 time; pure otherwise)."""
    by_stage = {a.stage: a for a in actions if a.stage is not None}
    stages = [_stage_entry(experiment, observed, observed.stage(name), by_stage.get(name))
              for name in stage_order(experiment)]
    current, message = _summary(phase, stages)
    status: dict[str, Any] = {"phase": phase.value, "message": message}
    if current is not None:
        status["currentStage"] = current
    if generation is not None:
        status["observedGeneration"] = generation
    status["stages"] = stages
    previous_conditions = (previous or {}).get("conditions") or []
    status["conditions"] = _conditions(phase.value, phase.value, message, previous_conditions, now)
    was_invalid = next((c for c in previous_conditions if c.get("type") == INVALID_PHASE), None)
    if was_invalid is not None:  # fixed: the condition stays, False, so `kubectl wait` and users see the change
        status["conditions"].append(_invalid_condition("False", "SpecValid", "", was_invalid, now))
    return status


def _invalid_condition(value: str, reason: str, message: str, old: Mapping[str, Any] | None,
                       now: str) -> dict[str, Any]:
    unchanged = old is not None and old.get("status") == value and "lastTransitionTime" in old
    return {"type": INVALID_PHASE, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": old["lastTransitionTime"] if unchanged else now}


def invalid_status(errors: Sequence[str], *, previous: Mapping[str, Any] | None, now: str,
                   generation: int | None = None) -> dict[str, Any]:
    """Status of an experiment whose spec does not validate: the errors, and nothing running.

    Besides ``Failed``, the condition ``Invalid`` is True with the errors (each names its field); once the spec is
    fixed, :func:`experiment_status` keeps it, False.
    """
    message = "invalid spec: " + "; ".join(errors)
    status: dict[str, Any] = {"phase": INVALID_PHASE, "message": message}
    if generation is not None:
        status["observedGeneration"] = generation
    previous_conditions = (previous or {}).get("conditions") or []
    status["conditions"] = _conditions("Failed", "InvalidSpec", message, previous_conditions, now)
    old = next((c for c in previous_conditions if c.get("type") == INVALID_PHASE), None)
    status["conditions"].append(_invalid_condition("True", "InvalidSpec", message, old, now))
    return status
