"""Client-side reconciliation (what ``dino-ctl submit --wait``/``resume`` run) against the real API server.

The tests play the training operator (job status through the status subresource) and the kubelet (worker pods with
exit codes); the garbage collector of the real controller manager finishes the foreground deletions.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from dino_ctl import reconcile
from dino_ctl.errors import KubeError
from dino_ctl.kube import KubeClient
from dino_ctl.observe import JobPhase, RestartCounts
from dino_ctl.plan import ActionKind, ExperimentPhase
from dino_ctl.spec import DinoExperiment
from tests.cluster.conftest import wait_for
from tests.dino_ctl.spec_helpers import document, experiment

JOB = ("kubeflow.org/v1", "PyTorchJob")


@pytest.fixture
def client(kube: KubeClient, crds: dict) -> KubeClient:
    del crds
    return kube


def _experiment(namespace: str, **spec: Any) -> DinoExperiment:
    doc = document(**spec)
    doc["metadata"]["namespace"] = namespace
    return experiment(doc)


def _job(client: KubeClient, stage: str) -> dict[str, Any]:
    job = client.get(*JOB, f"demo-{stage}")
    assert job is not None, f"no job for {stage}"
    return job


def _finish(client: KubeClient, admin_api: Any, stage: str, condition: str, *, exit_code: int | None = None) -> None:
    """Play the operator: the stage's job ends with ``condition``; its worker pod exited with ``exit_code``."""
    from kubernetes import client as k8s

    job = _job(client, stage)
    if exit_code is not None:
        labels = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
        name = f"demo-{stage}-worker-0"
        client.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                      "spec": {"containers": [{"name": "pytorch", "image": "registry.invalid/none:0"}],
                               "nodeSelector": {"no-such-node": "true"}}})
        k8s.CoreV1Api(admin_api).patch_namespaced_pod_status(name, client.namespace, {"status": {
            "phase": "Failed" if exit_code else "Succeeded",
            "containerStatuses": [{"name": "pytorch", "image": "registry.invalid/none:0", "imageID": "",
                                   "ready": False, "restartCount": 0,
                                   "state": {"terminated": {"exitCode": exit_code}}}]}})
    k8s.CustomObjectsApi(admin_api).patch_namespaced_custom_object_status(
        "kubeflow.org", "v1", client.namespace, "pytorchjobs", job["metadata"]["name"],
        {"status": {"conditions": [{"type": condition, "status": "True", "reason": f"PyTorchJob{condition}",
                                    "message": condition.lower(), "lastTransitionTime": "2026-12-05T00:00:00Z"}]}})


def _restarts(client: KubeClient, stage: str) -> RestartCounts:
    config_map = client.get("v1", "ConfigMap", f"demo-{stage}-config")
    assert config_map is not None
    return RestartCounts.from_json(config_map["metadata"]["annotations"]["dino-ctl.io/restarts"])


def _gone(client: KubeClient, stage: str) -> None:
    wait_for(lambda: client.get(*JOB, f"demo-{stage}") is None,
             what=f"the garbage collector to finish deleting demo-{stage} (foreground)")


def test_submit_records_the_experiment_and_starts_the_first_stage(client: KubeClient, namespace: str) -> None:
    result = reconcile.submit(client, _experiment(namespace))
    assert [(a.kind, a.stage) for a in result.actions] == [(ActionKind.SUBMIT, "pretrain")]
    record = client.get("v1", "ConfigMap", "demo-experiment")
    assert record is not None and "name: demo" in record["data"]["spec.yaml"]
    assert _job(client, "pretrain")["metadata"]["labels"]["dino-ctl.io/attempt"] == "0"
    assert _restarts(client, "pretrain") == RestartCounts()
    assert client.get(*JOB, "demo-highres") is None
    # Every write was a server-side apply by dino-ctl's field managers.
    for obj in client.experiment_objects("demo"):
        managers = {(m["manager"], m["operation"]) for m in obj["metadata"]["managedFields"]}
        assert managers <= {("dino-ctl", "Apply"), ("dino-ctl-state", "Apply")}, (obj["metadata"]["name"], managers)


def test_resume_on_another_machine_advances_the_chain(client: KubeClient, admin_api: Any, namespace: str,
                                                      kubeconfig_for: Any) -> None:
    from kubernetes import config

    reconcile.submit(client, _experiment(namespace))
    _finish(client, admin_api, "pretrain", "Succeeded", exit_code=0)
    # The first CLI is gone; a fresh client reads the spec back from the cluster.
    other = KubeClient(config.new_client_from_config(config_file=str(kubeconfig_for(namespace))), namespace=namespace)
    recorded = reconcile.load_experiment(other, "demo")
    assert recorded == _experiment(namespace)
    result = reconcile.reconcile_once(other, recorded)
    assert [(a.kind, a.stage) for a in result.actions] == [(ActionKind.SUBMIT, "highres")]
    config_yaml = client.get("v1", "ConfigMap", "demo-highres-config")["data"]["config.yaml"]
    assert "init_from: s3://bucket/runs/demo/pretrain" in config_yaml


def test_preemption_resubmits_from_the_checkpoint_with_the_failure_budget_untouched(
        client: KubeClient, admin_api: Any, namespace: str) -> None:
    exp = _experiment(namespace)
    reconcile.submit(client, exp)
    first_uid = _job(client, "pretrain")["metadata"]["uid"]
    _finish(client, admin_api, "pretrain", "Failed", exit_code=143)
    deleted = reconcile.reconcile_once(client, exp)
    assert [(a.kind, a.reason) for a in deleted.actions] == [(ActionKind.DELETE, "preemption")]
    assert _restarts(client, "pretrain") == RestartCounts(preemption=1)
    counted = client.get("v1", "ConfigMap", "demo-pretrain-config")["metadata"]["annotations"]
    assert counted["dino-ctl.io/counted-job"] == first_uid
    # While the garbage collector deletes the job (foreground) a pass waits and counts nothing twice; then resubmits.
    while not (resubmitted := reconcile.reconcile_once(client, exp)).actions:
        assert resubmitted.observed.stage("pretrain").phase == JobPhase.DELETING
        assert _restarts(client, "pretrain") == RestartCounts(preemption=1)
    assert [(a.kind, a.reason, a.attempt) for a in resubmitted.actions] == [(ActionKind.SUBMIT, "resubmit", 1)]
    job = _job(client, "pretrain")
    assert job["metadata"]["labels"]["dino-ctl.io/attempt"] == "1" and job["metadata"]["uid"] != first_uid
    assert _restarts(client, "pretrain") == RestartCounts(preemption=1)
    assert "config.yaml" in client.get("v1", "ConfigMap", "demo-pretrain-config")["data"]  # the state apply kept it


def test_failures_exhaust_the_budget_then_resume_retry_failed(client: KubeClient, admin_api: Any,
                                                              namespace: str) -> None:
    exp = _experiment(namespace, failureBudget={"failure": 1})
    reconcile.submit(client, exp)
    _finish(client, admin_api, "pretrain", "Failed", exit_code=1)
    assert [a.reason for a in reconcile.reconcile_once(client, exp).actions] == ["failure"]  # delete, failure 1
    _gone(client, "pretrain")
    assert [a.reason for a in reconcile.reconcile_once(client, exp).actions] == ["resubmit"]
    client.delete("v1", "Pod", "demo-pretrain-worker-0", propagation="Background")
    wait_for(lambda: client.get("v1", "Pod", "demo-pretrain-worker-0") is None, what="the old pod to go")
    _finish(client, admin_api, "pretrain", "Failed", exit_code=1)
    result = reconcile.reconcile_once(client, exp)
    assert [(a.kind, a.stage) for a in result.actions] == [(ActionKind.FAIL_STAGE, "pretrain")]
    assert result.phase == ExperimentPhase.FAILED
    assert client.get(*JOB, "demo-pretrain") is not None  # kept for inspection
    retried = reconcile.reconcile_once(client, exp, retry_failed=True)
    assert [(a.kind, a.reason) for a in retried.actions] == [(ActionKind.DELETE, "retry")]
    assert _restarts(client, "pretrain") == RestartCounts(failure=0)


def test_cancel_then_resume(client: KubeClient, namespace: str) -> None:
    exp = _experiment(namespace)
    reconcile.submit(client, exp)
    reconcile.set_cancel(client, exp, cancel=True)
    result = reconcile.reconcile_once(client, exp)
    assert [(a.kind, a.reason) for a in result.actions] == [(ActionKind.DELETE, "cancel")]
    _gone(client, "pretrain")
    assert reconcile.reconcile_once(client, exp).phase == ExperimentPhase.CANCELLED
    reconcile.set_cancel(client, exp, cancel=False)
    resumed = reconcile.reconcile_once(client, exp)
    assert [(a.kind, a.stage) for a in resumed.actions] == [(ActionKind.SUBMIT, "pretrain")]


def test_wait_runs_the_whole_chain(client: KubeClient, admin_api: Any, namespace: str) -> None:
    exp = _experiment(namespace)
    reconcile.submit(client, exp)
    phases = []

    def operator(seconds: float) -> None:  # between passes every running stage finishes
        assert seconds == 5
        for job in client.list(*JOB):
            if not job.get("status"):
                _finish(client, admin_api, job["metadata"]["labels"]["dino-ctl.io/stage"], "Succeeded")

    phase = reconcile.wait(client, exp, poll_seconds=5, sleep=operator, on_pass=lambda p: phases.append(p.phase))
    assert phase == ExperimentPhase.SUCCEEDED
    assert sorted(job["metadata"]["name"] for job in client.list(*JOB)) == [
        "demo-distill", "demo-highres", "demo-pretrain"]
    assert phases[-1] == ExperimentPhase.SUCCEEDED


def test_load_experiment_from_the_custom_resource_or_fail(client: KubeClient, namespace: str) -> None:
    with pytest.raises(KubeError, match="no record ConfigMap and no DinoExperiment of that name"):
        reconcile.load_experiment(client, "demo")
    body = json.loads(json.dumps(_experiment(namespace).to_document()))
    client.apply(body)
    assert reconcile.load_experiment(client, "demo").name == "demo"
