"""The controller's pure core: ``reconcile(experiment, observed, status) -> Reconciliation``.

The same :func:`dino_ctl.plan.plan` as the CLI decides the actions; this module adds what a controller reports: the
new ``status`` (:mod:`dino_ctl.controller.status`), the Kubernetes events a user reads in ``kubectl describe``, and
the restarts this pass counts (for ``dino_ctl_stage_restarts_total``). Events come from two sources: the actions of
this pass (submitted, preempted, evicted, failed, cancelled) and phase transitions between the previous status and
the new one (running, succeeded, gave up), so re-running a pass on the same state repeats neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dino_ctl.observe import Observed, Reason
from dino_ctl.plan import Action, ActionKind, experiment_phase, plan
from dino_ctl.spec import DinoExperiment

from dino_ctl.controller.status import StagePhase, experiment_status

__all__ = ["Event", "Reconciliation", "counted_restarts", "reconcile"]

NORMAL = "Normal"
WARNING = "Warning"


@dataclass(frozen=True, kw_only=True)
class Event:
    """A Kubernetes event to post on the DinoExperiment."""

    type: str
    """``Normal`` or ``Warning``."""
    reason: str
    """CamelCase, e.g. ``StagePreempted``."""
    message: str


@dataclass(frozen=True, kw_only=True)
class Reconciliation:
    """The outcome of one pure pass."""

    actions: list[Action]
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    restarts: list[tuple[str, Reason]] = field(default_factory=list)
    """(stage, reason) of each restart this pass counts for the first time."""


def counted_restarts(actions: Sequence[Action], observed: Observed) -> list[tuple[str, Reason]]:
    """Restarts newly counted by ``actions``: a DELETE whose count for its reason exceeds the recorded one.

    The planner counts a failed job once (keyed by its uid), so a repeated pass over the same failed job counts
    nothing: the metric stays exact across retries and controller restarts.
    """
    found = []
    for action in actions:
        if action.kind != ActionKind.DELETE or action.stage is None or action.restarts is None:
            continue
        if action.reason not in {r.value for r in Reason}:
            continue  # cancel and retry are not restarts
        reason = Reason(action.reason)
        if action.restarts.get(reason) > observed.stage(action.stage).restarts.get(reason):
            found.append((action.stage, reason))
    return found


def _budget(experiment: DinoExperiment, reason: Reason) -> str:
    budget = experiment.spec.failure_budget
    cap = {Reason.FAILURE: budget.failure, Reason.PREEMPTION: budget.preemption, Reason.EVICTION: budget.eviction}[
        reason
    ]
    return "unlimited" if cap is None else str(cap)


def _action_event(experiment: DinoExperiment, action: Action, observed: Observed) -> Event | None:
    stage = action.stage
    if action.kind == ActionKind.SUBMIT:
        if action.reason == "start":
            return Event(type=NORMAL, reason="StageSubmitted", message=f"Submitted stage {stage} (attempt 0)")
        resumes = ("curation resumes from the shards its steps finished"
                   if experiment.spec.stage(stage).is_curation else "the trainer resumes from its newest complete "
                   "checkpoint")
        return Event(type=NORMAL, reason="StageResubmitted",
                     message=f"Resubmitted stage {stage} (attempt {action.attempt}); {resumes}")
    if action.kind != ActionKind.DELETE:
        return None  # FAIL_STAGE and COMPLETE repeat every pass: reported as transitions instead
    if action.reason == "cancel":
        return Event(type=NORMAL, reason="StageCancelled", message=f"Stopping stage {stage}: cancel requested")
    if action.reason == "retry":
        return Event(type=NORMAL, reason="StageRetried", message=f"Stage {stage}: {action.message}")
    reason = Reason(action.reason)
    count = action.restarts.get(reason) if action.restarts is not None else 0
    event_reason = {Reason.PREEMPTION: "StagePreempted", Reason.EVICTION: "StageEvicted",
                    Reason.FAILURE: "StageFailed"}[reason]
    spent = f"{reason.value} restart {count} of {_budget(experiment, reason)}"
    if reason != Reason.FAILURE:
        spent += "; the failure budget is untouched"
    return Event(type=WARNING, reason=event_reason, message=f"Stage {stage}: {action.message} ({spent})")


def _stage_transition(name: str, old: str | None, new: Mapping[str, Any]) -> Event | None:
    phase = new["phase"]
    if phase == old:
        return None
    if phase == StagePhase.RUNNING and old != StagePhase.RUNNING:
        job = new.get("job") or {}
        return Event(type=NORMAL, reason="StageRunning",
                     message=f"Stage {name} is running ({job.get('kind')} {job.get('name')}, attempt {new['attempt']})")
    if phase == StagePhase.SUCCEEDED:
        return Event(type=NORMAL, reason="StageSucceeded", message=f"Stage {name} succeeded")
    if phase == StagePhase.FAILED:
        return Event(type=WARNING, reason="StageGaveUp", message=f"Stage {name} failed for good: {new.get('message')}")
    return None


def _transition_events(previous: Mapping[str, Any], status: Mapping[str, Any]) -> list[Event]:
    before = {s.get("name"): s.get("phase") for s in previous.get("stages") or []}
    events = [e for s in status["stages"] if (e := _stage_transition(s["name"], before.get(s["name"]), s))]
    phase = status["phase"]
    if phase != previous.get("phase") and phase in ("Succeeded", "Failed", "Cancelled"):
        events.append(Event(type=WARNING if phase == "Failed" else NORMAL, reason=f"Experiment{phase}",
                            message=status["message"]))
    return events


def reconcile(
    experiment: DinoExperiment,
    observed: Observed,
    status: Mapping[str, Any] | None,
    *,
    now: str,
    generation: int | None = None,
    retry_failed: bool = False,
) -> Reconciliation:
    """One pass: the planner's actions, the new status, the events to post and the restarts counted.

    Args:
        experiment: the validated DinoExperiment.
        observed: the cluster state (:func:`dino_ctl.observe.observe` of the experiment's objects).
        status: the resource's current ``status`` (None or {} on the first pass).
        now: RFC 3339 time for condition transitions (the caller's clock: this function reads none).
        generation: ``metadata.generation``, reported as ``observedGeneration``.
        retry_failed: give stages over their failure budget a fresh one (``dino-ctl resume --retry-failed``).
    """
    previous = status or {}
    actions = plan(experiment, observed, retry_failed=retry_failed)
    phase = experiment_phase(experiment, observed)
    new_status = experiment_status(experiment, observed, actions, phase, previous=previous, now=now,
                                   generation=generation)
    events = [e for a in actions if (e := _action_event(experiment, a, observed))]
    events += _transition_events(previous, new_status)
    return Reconciliation(actions=actions, status=new_status, events=events,
                          restarts=counted_restarts(actions, observed))
