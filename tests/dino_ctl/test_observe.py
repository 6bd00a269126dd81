"""observe(): recorded Kubernetes objects (tests/dino_ctl/recorded/*.json) -> the typed Observed model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dino_ctl.observe import Condition, JobPhase, Observed, Reason, RestartCounts, StageObservation, observe

RECORDED = Path(__file__).parent / "recorded"


def recorded(name: str) -> list[dict]:
    return json.loads((RECORDED / f"{name}.json").read_text())


def test_running_job_with_its_pods_and_counts() -> None:
    observed = observe(recorded("pretrain_running"), experiment="demo")
    obs = observed.stage("pretrain")
    assert (obs.phase, obs.job_kind, obs.job_name, obs.job_uid) == (JobPhase.RUNNING, "PyTorchJob", "demo-pretrain",
                                                                    "job-p1")
    assert obs.exit_codes == () and obs.evictions == ()
    assert obs.restarts == RestartCounts()
    assert obs.message == "PyTorchJob demo-pretrain is running."
    assert set(observed.stages) == {"pretrain"}  # the other experiment's ConfigMap is ignored
    assert observed.cancel_requested is False and observed.checkpoints_read is False


def test_suspended_job_is_pending() -> None:
    assert observe(recorded("pretrain_suspended"), experiment="demo").stage("pretrain").phase == JobPhase.PENDING


def test_succeeded_job() -> None:
    obs = observe(recorded("pretrain_succeeded"), experiment="demo").stage("pretrain")
    assert obs.phase == JobPhase.SUCCEEDED and obs.exit_codes == (0, 0)


def test_preempted_job_reads_only_the_current_attempts_pods() -> None:
    obs = observe(recorded("pretrain_preempted"), experiment="demo").stage("pretrain")
    assert obs.phase == JobPhase.FAILED and obs.attempt == 2
    assert sorted(obs.exit_codes) == [1, 143]  # attempt 1's pod (exit 1) is not counted
    assert obs.end_reason == Reason.PREEMPTION
    assert obs.restarts == RestartCounts(failure=1, preemption=1)


def test_evicted_pods_beat_exit_codes() -> None:
    obs = observe(recorded("pretrain_evicted"), experiment="demo").stage("pretrain")
    assert sorted(obs.evictions) == ["Evicted", "PreemptionByScheduler"]
    assert obs.end_reason == Reason.EVICTION


def test_plain_failure_and_counted_uid() -> None:
    assert observe(recorded("pretrain_failed"), experiment="demo").stage("pretrain").end_reason == Reason.FAILURE
    obs = observe(recorded("pretrain_failed_counted"), experiment="demo").stage("pretrain")
    assert obs.counted_job_uid == obs.job_uid == "job-p3"


def test_trainjob_phases() -> None:
    observed = observe(recorded("trainjob"), experiment="demo")
    assert observed.stage("pretrain").phase == JobPhase.SUCCEEDED
    assert observed.stage("highres").phase == JobPhase.RUNNING  # active jobs of the JobSet


def test_volcano_phases() -> None:
    observed = observe(recorded("volcano"), experiment="demo")
    assert [observed.stage(s).phase for s in ("pretrain", "highres", "distill")] == [
        JobPhase.FAILED, JobPhase.RUNNING, JobPhase.DELETING]


def test_cancel_annotation_on_the_record_or_the_custom_resource() -> None:
    record = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": "demo-experiment", "labels": {"dino-ctl.io/experiment": "demo"},
                           "annotations": {"dino-ctl.io/cancel-requested": "true"}}}
    assert observe([record], experiment="demo").cancel_requested
    resource = {"apiVersion": "dino-ctl.io/v1alpha1", "kind": "DinoExperiment",
                "metadata": {"name": "demo", "annotations": {"dino-ctl.io/cancel-requested": "true"}}}
    assert observe([resource], experiment="demo").cancel_requested
    resource["metadata"]["annotations"]["dino-ctl.io/cancel-requested"] = "false"
    assert not observe([resource], experiment="demo").cancel_requested


def test_checkpoints_from_storage() -> None:
    observed = observe([], experiment="demo", checkpoints={"pretrain": 1000, "highres": None})
    assert observed.checkpoints_read
    assert observed.stage("pretrain").latest_checkpoint == 1000 and observed.stage("highres").latest_checkpoint is None
    assert observed.stage("distill").phase == JobPhase.ABSENT


@pytest.mark.parametrize(("text", "counts"), [
    ('{"failure": 2, "preemption": 5}', RestartCounts(failure=2, preemption=5)),
    ("not json", RestartCounts()), (None, RestartCounts()), ('["a"]', RestartCounts())])
def test_restart_counts_annotation(text: str | None, counts: RestartCounts) -> None:
    assert RestartCounts.from_json(text) == counts
    assert RestartCounts.from_json(counts.to_json()) == counts


def test_message_is_the_newest_true_condition() -> None:
    obs = StageObservation(stage="s", conditions=(Condition(type="Running", status="True", message="a"),
                                                  Condition(type="Failed", status="True", message="b"),
                                                  Condition(type="X", status="False", message="c")))
    assert obs.message == "b"
    assert Observed(experiment="demo").stage("nope").phase == JobPhase.ABSENT


def test_exit_of_a_pod_deleted_without_a_disruption_is_not_a_verdict() -> None:
    """A failed job's other worker, stopped by the operator's cleanPodPolicy, exits 143 after its SIGTERM checkpoint:
    the job still failed because of the exit 1 (seen with the real training-operator, tests/cluster/training)."""
    objects = recorded("pretrain_preempted")
    stopped = next(o for o in objects if o["kind"] == "Pod"
                   and o["metadata"]["labels"].get("dino-ctl.io/attempt") == "2"
                   and o["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 143)
    stopped["metadata"]["deletionTimestamp"] = "2026-03-02T12:00:01Z"
    obs = observe(objects, experiment="demo").stage("pretrain")
    assert obs.exit_codes == (1,) and obs.end_reason == Reason.FAILURE
    # Preempted by the scheduler (a disruption): the deleted pod's exit still counts.
    stopped["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True",
                                            "reason": "PreemptionByScheduler"})
    obs = observe(objects, experiment="demo").stage("pretrain")
    assert sorted(obs.exit_codes) == [1, 143] and obs.end_reason == Reason.EVICTION


def test_a_suspended_job_in_a_kueue_queue_is_reported_queued() -> None:
    objects = recorded("pretrain_suspended")
    job = next(o for o in objects if o["kind"] == "PyTorchJob")
    job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "h100-queue"
    job["spec"]["runPolicy"]["suspend"] = True  # created suspended; Kueue admits by unsuspending
    obs = observe(objects, experiment="demo").stage("pretrain")
    assert obs.phase == JobPhase.PENDING and obs.queue == "h100-queue"
    assert obs.message == "queued in Kueue LocalQueue h100-queue: suspended until Kueue admits it (quota)"
    job["spec"]["runPolicy"]["suspend"] = False  # admitted: no longer queued
    job["status"]["conditions"] = [c for c in job["status"].get("conditions", []) if c["type"] != "Suspended"]
    assert observe(objects, experiment="demo").stage("pretrain").queue is None
