"""The controller's pure core on recorded cluster states: actions, status and events a user reads."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from dino_ctl.controller.core import Event, reconcile
from dino_ctl.observe import Reason, observe
from dino_ctl.plan import ActionKind
from dino_ctl.render import render_stage
from tests.dino_ctl.spec_helpers import experiment

NOW = "2026-11-26T10:00:00Z"
LATER = "2026-11-26T10:05:00Z"

# Conditions as Training Operator 1.9 writes them on a PyTorchJob.
CREATED = {"type": "Created", "status": "True", "reason": "PyTorchJobCreated",
           "message": "PyTorchJob demo-pretrain is created."}
RUNNING = {"type": "Running", "status": "True", "reason": "PyTorchJobRunning",
           "message": "PyTorchJob ml/demo-pretrain is running."}
FAILED = {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
          "message": "PyTorchJob ml/demo-pretrain has failed because 1 Worker replica(s) failed."}
SUCCEEDED = {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded",
             "message": "PyTorchJob ml/demo-pretrain successfully completed."}


def _job(stage: str, *, attempt: int = 0, conditions: list[dict[str, str]] | None = None,
         uid: str | None = None) -> list[dict[str, Any]]:
    """The stage's ConfigMap and PyTorchJob as rendered, with a status as the operator would report it."""
    config_map, job = copy.deepcopy(render_stage(EXPERIMENT, stage, attempt=attempt))
    job["metadata"]["uid"] = uid or f"uid-{stage}-{attempt}"
    job["status"] = {"conditions": conditions or [CREATED]}
    return [config_map, job]


def _restarts(objects: list[dict[str, Any]], stage: str, *, counted_uid: str | None = None, **counts: int) -> None:
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["labels"]["dino-ctl.io/stage"] == stage:
            annotations = obj["metadata"]["annotations"]
            annotations["dino-ctl.io/restarts"] = json.dumps({"failure": 0, "preemption": 0, "eviction": 0, **counts})
            if counted_uid:
                annotations["dino-ctl.io/counted-job"] = counted_uid


def _pod(stage: str, *, attempt: int = 0, exit_code: int | None = None, evicted: bool = False,
         disruption: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Failed" if exit_code or evicted else "Running"}
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "pytorch", "state": {"terminated": {"exitCode": exit_code,
                                                                                     "reason": "Error"}}}]
    if evicted:
        status.update(reason="Evicted", message="The node was low on resource: memory.")
    if disruption:
        status["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": disruption}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"demo-{stage}-worker-0", "namespace": "ml",
                         "labels": {"dino-ctl.io/experiment": "demo", "dino-ctl.io/stage": stage,
                                    "dino-ctl.io/attempt": str(attempt)}},
            "status": status}


EXPERIMENT = experiment()


def _pass(objects: list[dict[str, Any]], status: dict[str, Any] | None = None, now: str = NOW):
    return reconcile(EXPERIMENT, observe(objects, experiment="demo"), status, now=now, generation=2)


def _stage(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in status["stages"] if s["name"] == name)


def test_fresh_experiment_submits_the_first_stage_and_explains_the_others() -> None:
    result = _pass([])
    assert [(a.kind, a.stage, a.attempt) for a in result.actions] == [(ActionKind.SUBMIT, "pretrain", 0)]
    status = result.status
    assert (status["phase"], status["currentStage"], status["observedGeneration"]) == ("Pending", "pretrain", 2)
    assert status["message"] == "0/3 stages succeeded; pretrain pending"
    assert [(s["name"], s["phase"], s.get("message")) for s in status["stages"]] == [
        ("pretrain", "Pending", "submitting attempt 0"),
        ("highres", "Waiting", "waiting for stage pretrain"),
        ("distill", "Waiting", "waiting for stage highres"),
    ]
    assert _stage(status, "pretrain")["restarts"] == {"failure": 0, "preemption": 0, "eviction": 0}
    assert result.events == [
        Event(type="Normal", reason="StageSubmitted", message="Submitted stage pretrain (attempt 0)")
    ]
    assert result.restarts == []


def test_running_job_is_mirrored_and_reported_once() -> None:
    objects = _job("pretrain", conditions=[CREATED, RUNNING])
    first = _pass(objects, _pass(_job("pretrain")).status)
    assert first.actions == []
    stage = _stage(first.status, "pretrain")
    assert stage["phase"] == "Running"
    assert stage["job"] == {"kind": "PyTorchJob", "name": "demo-pretrain"}
    assert stage["conditions"] == [CREATED, RUNNING]
    assert stage["message"] == "PyTorchJob ml/demo-pretrain is running."
    assert first.status["message"] == "0/3 stages succeeded; pretrain running"
    assert first.events == [Event(type="Normal", reason="StageRunning",
                                  message="Stage pretrain is running (PyTorchJob demo-pretrain, attempt 0)")]
    again = _pass(objects, first.status, now=LATER)
    assert again.events == [] and again.actions == []
    assert again.status == first.status  # condition times stay put while nothing changes


def test_preemption_exit_143_is_counted_once_and_resubmitted() -> None:
    objects = [*_job("pretrain", conditions=[CREATED, FAILED]), _pod("pretrain", exit_code=143)]
    running = _pass(_job("pretrain", conditions=[CREATED, RUNNING])).status
    result = _pass(objects, running)
    (action,) = result.actions
    assert (action.kind, action.reason, action.counted_job_uid) == (ActionKind.DELETE, "preemption", "uid-pretrain-0")
    assert result.restarts == [("pretrain", Reason.PREEMPTION)]
    stage = _stage(result.status, "pretrain")
    assert stage["phase"] == "Restarting"
    assert stage["restarts"] == {"failure": 0, "preemption": 1, "eviction": 0}
    assert stage["exitCodes"] == [143]
    assert result.events == [Event(
        type="Warning", reason="StagePreempted",
        message="Stage pretrain: preemption (exit codes 143; evictions none); resubmitting from the latest checkpoint "
        "(preemption restart 1 of unlimited; the failure budget is untouched)",
    )]
    # The count was recorded (keyed by the job's uid) but the delete has not happened yet: nothing is counted twice.
    _restarts(objects, "pretrain", counted_uid="uid-pretrain-0", preemption=1)
    repeat = _pass(objects, result.status)
    assert [a.kind for a in repeat.actions] == [ActionKind.DELETE]
    assert repeat.restarts == []
    # Job gone: resubmitted as attempt 1 with the counts carried over.
    gone = [o for o in objects if o["kind"] == "ConfigMap"]
    resubmit = _pass(gone, repeat.status)
    assert [(a.kind, a.attempt, a.reason) for a in resubmit.actions] == [(ActionKind.SUBMIT, 1, "resubmit")]
    assert resubmit.events[0].reason == "StageResubmitted"
    assert _stage(resubmit.status, "pretrain")["restarts"]["preemption"] == 1


@pytest.mark.parametrize(
    ("pod", "reason", "event"),
    [
        (_pod("pretrain", evicted=True), Reason.EVICTION, "StageEvicted"),
        (_pod("pretrain", exit_code=137, disruption="PreemptionByScheduler"), Reason.EVICTION, "StageEvicted"),
        (_pod("pretrain", exit_code=1), Reason.FAILURE, "StageFailed"),
    ],
    ids=["evicted", "disruption-target", "exit-1"],
)
def test_end_reasons(pod: dict[str, Any], reason: Reason, event: str) -> None:
    result = _pass([*_job("pretrain", conditions=[CREATED, FAILED]), pod])
    assert result.restarts == [("pretrain", reason)]
    (posted,) = result.events
    assert (posted.type, posted.reason) == ("Warning", event)
    budget = "1 of 3)" if reason == Reason.FAILURE else "1 of unlimited; the failure budget is untouched)"
    assert posted.message.endswith(budget)


def test_failure_budget_spent_fails_the_experiment_once() -> None:
    objects = [*_job("pretrain", conditions=[CREATED, FAILED], attempt=3), _pod("pretrain", attempt=3, exit_code=1)]
    _restarts(objects, "pretrain", failure=3)
    result = _pass(objects, {"phase": "Running", "stages": [{"name": "pretrain", "phase": "Running"}]})
    assert [a.kind for a in result.actions] == [ActionKind.FAIL_STAGE]
    assert result.status["phase"] == "Failed"
    assert result.status["currentStage"] == "pretrain"
    message = "stage pretrain failed: failure (exit codes 1; evictions none): failure budget of 3 spent"
    assert result.status["message"] == message
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "StageGaveUp"), ("Warning", "ExperimentFailed")]
    conditions = {c["type"]: c for c in result.status["conditions"]}
    assert conditions["Failed"] == {"type": "Failed", "status": "True", "reason": "Failed", "message": message,
                                    "lastTransitionTime": NOW}
    assert conditions["Running"]["status"] == "False"
    again = _pass(objects, result.status, now=LATER)
    assert again.events == []
    assert {c["type"]: c for c in again.status["conditions"]}["Failed"]["lastTransitionTime"] == NOW


def test_succeeded_stage_starts_the_next_and_the_last_completes_the_experiment() -> None:
    done = _job("pretrain", conditions=[CREATED, SUCCEEDED])
    result = _pass(done, {"phase": "Running", "stages": [{"name": "pretrain", "phase": "Running"}]})
    assert [(a.kind, a.stage) for a in result.actions] == [(ActionKind.SUBMIT, "highres")]
    assert [e.reason for e in result.events] == ["StageSubmitted", "StageSucceeded"]
    assert result.status["message"] == "1/3 stages succeeded; highres pending"

    finished = [*done, *_job("highres", conditions=[SUCCEEDED]), *_job("distill", conditions=[SUCCEEDED])]
    complete = _pass(finished, result.status)
    assert [a.kind for a in complete.actions] == [ActionKind.COMPLETE]
    assert complete.status["phase"] == "Succeeded" and "currentStage" not in complete.status
    assert complete.status["message"] == "all 3 stages succeeded"
    assert [e.reason for e in complete.events] == ["StageSucceeded", "StageSucceeded", "ExperimentSucceeded"]
    assert _pass(finished, complete.status).events == []


def test_cancel_stops_running_jobs() -> None:
    record = {"apiVersion": "dino-ctl.io/v1alpha1", "kind": "DinoExperiment",
              "metadata": {"name": "demo", "annotations": {"dino-ctl.io/cancel-requested": "true"}}}
    result = _pass([*_job("pretrain", conditions=[CREATED, RUNNING]), record])
    assert [(a.kind, a.reason) for a in result.actions] == [(ActionKind.DELETE, "cancel")]
    assert result.status["phase"] == "Cancelled"
    assert [s["phase"] for s in result.status["stages"]] == ["Cancelled"] * 3
    assert [(e.reason, e.message) for e in result.events] == [
        ("StageCancelled", "Stopping stage pretrain: cancel requested"),
        ("ExperimentCancelled", "cancelled: every job is stopped and none is started"),
    ]
    assert result.restarts == []
