"""Client-side reconciliation end to end against the in-memory API server: the tests play the training operator."""

from __future__ import annotations

import json

import pytest

from dino_ctl import reconcile
from dino_ctl.errors import KubeError
from dino_ctl.observe import RestartCounts
from dino_ctl.plan import ActionKind, ExperimentPhase
from tests.dino_ctl.fake_apiserver import FakeApiServer, RunningServer
from tests.dino_ctl.spec_helpers import experiment


def _job(state: FakeApiServer, stage: str) -> dict:
    job = state.find("PyTorchJob", f"demo-{stage}")
    assert job is not None, f"no job for {stage}: {[o['metadata']['name'] for o in state.objects.values()]}"
    return job


def _finish(state: FakeApiServer, stage: str, condition: str, *, exit_code: int | None = None) -> None:
    """Play the operator: the stage's job ends with ``condition``; its worker pod exited with ``exit_code``."""
    job = _job(state, stage)
    job["status"] = {"conditions": [{"type": condition, "status": "True", "message": f"{condition.lower()}"}]}
    if exit_code is not None:
        labels = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"demo-{stage}-worker-0", "labels": labels},
               "spec": {"containers": [{"name": "pytorch"}]},
               "status": {"containerStatuses": [{"name": "pytorch", "state": {"terminated": {"exitCode": exit_code}}}]}}
        state.add(pod, f"/api/v1/namespaces/ml/pods/demo-{stage}-worker-0")


def _restarts(state: FakeApiServer, stage: str) -> RestartCounts:
    config_map = state.find("ConfigMap", f"demo-{stage}-config")
    assert config_map is not None
    return RestartCounts.from_json(config_map["metadata"]["annotations"]["dino-ctl.io/restarts"])


def test_submit_records_the_experiment_and_starts_the_first_stage() -> None:
    with RunningServer() as server:
        result = reconcile.submit(server.client(), experiment())
        state = server.state
        assert [(a.kind, a.stage) for a in result.actions] == [(ActionKind.SUBMIT, "pretrain")]
        record = state.find("ConfigMap", "demo-experiment")
        assert record is not None and "name: demo" in record["data"]["spec.yaml"]
        assert _job(state, "pretrain")["metadata"]["labels"]["dino-ctl.io/attempt"] == "0"
        assert _restarts(state, "pretrain") == RestartCounts()
        assert state.find("PyTorchJob", "demo-highres") is None
        assert all(r.method == "PATCH" for r in state.requests if r.method != "GET")  # only server-side apply


def test_resume_on_another_machine_advances_the_chain() -> None:
    with RunningServer() as server:
        reconcile.submit(server.client(), experiment())
        _finish(server.state, "pretrain", "Succeeded", exit_code=0)
        # The first CLI is gone; a fresh client reads the spec back from the cluster.
        other = server.client()
        recorded = reconcile.load_experiment(other, "demo", namespace="ml")
        assert recorded == experiment()
        result = reconcile.reconcile_once(other, recorded)
        assert [(a.kind, a.stage) for a in result.actions] == [(ActionKind.SUBMIT, "highres")]
        config = server.state.find("ConfigMap", "demo-highres-config")["data"]["config.yaml"]
        assert "init_from: s3://bucket/runs/demo/pretrain" in config


def test_preemption_resubmits_from_the_checkpoint_with_the_failure_budget_untouched() -> None:
    with RunningServer() as server:
        client, exp, state = server.client(), experiment(), server.state
        reconcile.submit(client, exp)
        first_uid = _job(state, "pretrain")["metadata"]["uid"]
        _finish(state, "pretrain", "Failed", exit_code=143)
        deleted = reconcile.reconcile_once(client, exp)
        assert [(a.kind, a.reason) for a in deleted.actions] == [(ActionKind.DELETE, "preemption")]
        assert state.find("PyTorchJob", "demo-pretrain") is None
        assert _restarts(state, "pretrain") == RestartCounts(preemption=1)
        counted = state.find("ConfigMap", "demo-pretrain-config")["metadata"]["annotations"]["dino-ctl.io/counted-job"]
        assert counted == first_uid
        resubmitted = reconcile.reconcile_once(client, exp)
        assert [(a.kind, a.reason, a.attempt) for a in resubmitted.actions] == [(ActionKind.SUBMIT, "resubmit", 1)]
        job = _job(state, "pretrain")
        assert job["metadata"]["labels"]["dino-ctl.io/attempt"] == "1" and job["metadata"]["uid"] != first_uid
        assert _restarts(state, "pretrain") == RestartCounts(preemption=1)
        assert "config.yaml" in state.find("ConfigMap", "demo-pretrain-config")["data"]  # state apply kept the data


def test_failures_exhaust_the_budget_then_resume_retry_failed() -> None:
    with RunningServer() as server:
        client, exp, state = server.client(), experiment(failureBudget={"failure": 1}), server.state
        reconcile.submit(client, exp)
        _finish(state, "pretrain", "Failed", exit_code=1)
        reconcile.reconcile_once(client, exp)  # delete, failure 1
        reconcile.reconcile_once(client, exp)  # resubmit
        state.objects.pop("/api/v1/namespaces/ml/pods/demo-pretrain-worker-0")
        _finish(state, "pretrain", "Failed", exit_code=1)
        result = reconcile.reconcile_once(client, exp)
        assert [(a.kind, a.stage) for a in result.actions] == [(ActionKind.FAIL_STAGE, "pretrain")]
        assert result.phase == ExperimentPhase.FAILED
        assert state.find("PyTorchJob", "demo-pretrain") is not None  # kept for inspection
        retried = reconcile.reconcile_once(client, exp, retry_failed=True)
        assert [(a.kind, a.reason) for a in retried.actions] == [(ActionKind.DELETE, "retry")]
        assert _restarts(state, "pretrain") == RestartCounts(failure=0)


def test_cancel_then_resume() -> None:
    with RunningServer() as server:
        client, exp, state = server.client(), experiment(), server.state
        reconcile.submit(client, exp)
        reconcile.set_cancel(client, exp, cancel=True)
        result = reconcile.reconcile_once(client, exp)
        assert [(a.kind, a.reason) for a in result.actions] == [(ActionKind.DELETE, "cancel")]
        assert state.find("PyTorchJob", "demo-pretrain") is None
        assert reconcile.reconcile_once(client, exp).phase == ExperimentPhase.CANCELLED
        reconcile.set_cancel(client, exp, cancel=False)
        resumed = reconcile.reconcile_once(client, exp)
        assert [(a.kind, a.stage) for a in resumed.actions] == [(ActionKind.SUBMIT, "pretrain")]


def test_wait_runs_the_whole_chain() -> None:
    with RunningServer() as server:
        client, exp, state = server.client(), experiment(), server.state
        reconcile.submit(client, exp)
        phases = []

        def operator(seconds: float) -> None:  # between passes every running stage finishes
            assert seconds == 5
            for job in state.of_kind("PyTorchJob"):
                if "status" not in job:
                    _finish(state, job["metadata"]["labels"]["dino-ctl.io/stage"], "Succeeded")

        phase = reconcile.wait(client, exp, poll_seconds=5, sleep=operator, on_pass=lambda p: phases.append(p.phase))
        assert phase == ExperimentPhase.SUCCEEDED
        assert [job["metadata"]["name"] for job in state.of_kind("PyTorchJob")] == [
            "demo-pretrain", "demo-highres", "demo-distill"]
        assert phases[-1] == ExperimentPhase.SUCCEEDED


def test_load_experiment_from_the_custom_resource_or_fail() -> None:
    with RunningServer() as server:
        client = server.client()
        with pytest.raises(KubeError, match="no record ConfigMap and no DinoExperiment of that name"):
            reconcile.load_experiment(client, "demo")
        document = json.loads(json.dumps(experiment().to_document()))
        document["status"] = {"phase": "Running"}
        server.state.add(document, "/apis/dino-ctl.io/v1alpha1/namespaces/ml/dinoexperiments/demo")
        assert reconcile.load_experiment(client, "demo").name == "demo"
