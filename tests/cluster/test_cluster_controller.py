"""The kopf controller as a real process against the real API server, as the chart's ServiceAccount.

Each test installs the chart's ServiceAccount, Role and RoleBinding in its fresh namespace (rendered by the project,
applied as the admin), gets a token for it from the TokenRequest API and runs ``python -m dino_ctl.controller`` with
that token only, its health and metrics endpoints on 127.0.0.1. No training operator runs: the tests play it by
writing the PyTorchJob's status through its status subresource and by adding the worker pods, as the operator and
the kubelet do.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dino_ctl.errors import KubeError
from dino_ctl.kube import KubeClient
from tests.cluster.conftest import wait_for
from tests.cluster.controller_process import (
    ChartIdentity,
    ControllerProcess,
    install_chart_identity,
    listening_addresses,
)
from tests.cluster.stack import HOST
from tests.dino_ctl.spec_helpers import document

FINALIZER = "dino-ctl.io/cleanup"
DINO = ("dino-ctl.io/v1alpha1", "DinoExperiment")
JOB = ("kubeflow.org/v1", "PyTorchJob")
OWNED_KINDS = (("v1", "ConfigMap"), JOB, ("monitoring.coreos.com/v1", "PodMonitor"),
               ("monitoring.coreos.com/v1", "PrometheusRule"))


@pytest.fixture
def identity(dynamic: Any, admin_api: Any, namespace: str, kubeconfig_for: Any, crds: dict) -> ChartIdentity:
    del crds
    return install_chart_identity(dynamic, admin_api, namespace, kubeconfig_for)


@pytest.fixture
def controller(identity: ChartIdentity, tmp_path: Path) -> Iterator[ControllerProcess]:
    process = ControllerProcess(identity.kubeconfig, identity.namespace, tmp_path)
    try:
        yield process.start()
    finally:
        process.stop()
        print(f"--- controller logs ({tmp_path})\n{process.tail(200)}")  # shown when the test fails


def experiment_document(namespace: str, **spec: Any) -> dict[str, Any]:
    body = document(**spec)
    body["metadata"]["namespace"] = namespace
    return body


def events(admin_api: Any, namespace: str, uid: str) -> list[Any]:
    """The events about object ``uid``, oldest first, read back from the events API."""
    from kubernetes import client

    found = client.CoreV1Api(admin_api).list_namespaced_event(namespace, field_selector=f"involvedObject.uid={uid}")
    return sorted(found.items, key=lambda e: (e.first_timestamp or e.event_time or e.metadata.creation_timestamp,
                                               e.metadata.creation_timestamp))


def reasons(admin_api: Any, namespace: str, uid: str) -> list[str]:
    return [e.reason for e in events(admin_api, namespace, uid)]


def set_job_condition(admin_api: Any, namespace: str, name: str, condition: str) -> None:
    """Play the training operator: the job's status subresource gets ``condition``."""
    from kubernetes import client

    client.CustomObjectsApi(admin_api).patch_namespaced_custom_object_status(
        "kubeflow.org", "v1", namespace, "pytorchjobs", name,
        {"status": {"conditions": [{"type": condition, "status": "True", "reason": "PyTorchJob" + condition,
                                    "message": f"the job is {condition.lower()}",
                                    "lastTransitionTime": "2026-12-05T00:00:00Z"}]}})


def add_terminated_pod(kube: KubeClient, admin_api: Any, job: dict[str, Any], exit_code: int) -> None:
    """Play the kubelet: a worker pod of ``job`` whose trainer container exited with ``exit_code``."""
    from kubernetes import client

    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    name = f"{job['metadata']['name']}-worker-0"
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": template["metadata"]["labels"]},
                "spec": {"containers": [{"name": "pytorch", "image": "registry.invalid/none:0"}],
                         "nodeSelector": {"no-such-node": "true"}}})
    client.CoreV1Api(admin_api).patch_namespaced_pod_status(name, kube.namespace, {"status": {
        "phase": "Failed",
        "containerStatuses": [{"name": "pytorch", "image": "registry.invalid/none:0", "imageID": "", "ready": False,
                               "restartCount": 0,
                               "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}]}})


def status_of(kube: KubeClient) -> dict[str, Any]:
    return (kube.get(*DINO, "demo") or {}).get("status") or {}


def stage_status(kube: KubeClient, stage: str) -> dict[str, Any]:
    return next((s for s in status_of(kube).get("stages") or [] if s["name"] == stage), {})


def metric(process: ControllerProcess, line_start: str) -> float | None:
    for line in process.metrics().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def owned_objects(kube: KubeClient, uid: str) -> dict[str, str]:
    """``kind/name -> uid`` of every object of the owned kinds whose controlling owner is ``uid``."""
    found = {}
    for api_version, kind in OWNED_KINDS:
        for obj in kube.list(api_version, kind):
            if any(ref["uid"] == uid for ref in obj["metadata"].get("ownerReferences") or []):
                found[f"{kind}/{obj['metadata']['name']}"] = obj["metadata"]["uid"]
    return found


def test_controller_reconciles_as_the_chart_service_account(
        controller: ControllerProcess, kube: KubeClient, admin_api: Any, namespace: str) -> None:
    # Its endpoints are on the loopback interface only.
    assert listening_addresses({controller.health_port, controller.metrics_port}) == {
        (HOST, controller.health_port), (HOST, controller.metrics_port)}

    uid = kube.apply(experiment_document(namespace))["metadata"]["uid"]
    wait_for(lambda: stage_status(kube, "pretrain").get("job"), what="the status to name the pretrain job")
    live = kube.get(*DINO, "demo")
    assert live["metadata"]["finalizers"] == [FINALIZER]
    assert live["status"]["observedGeneration"] == 1 and live["status"]["currentStage"] == "pretrain"
    owner = {"apiVersion": "dino-ctl.io/v1alpha1", "kind": "DinoExperiment", "name": "demo", "uid": uid,
             "controller": True, "blockOwnerDeletion": True}
    job = kube.get(*JOB, "demo-pretrain")
    assert job["metadata"]["ownerReferences"] == [owner]
    assert job["metadata"]["labels"]["dino-ctl.io/attempt"] == "0"
    children = owned_objects(kube, uid)
    assert set(children) == {"ConfigMap/demo-pretrain-config", "PyTorchJob/demo-pretrain",
                             "PodMonitor/demo-dino", "PrometheusRule/demo-dino"}
    wait_for(lambda: "StageSubmitted" in reasons(admin_api, namespace, uid), what="the StageSubmitted event")
    (submitted,) = [e for e in events(admin_api, namespace, uid) if e.reason == "StageSubmitted"]
    assert (submitted.type, submitted.message) == ("Normal", "Submitted stage pretrain (attempt 0)")
    assert submitted.involved_object.kind == "DinoExperiment"

    # The operator starts the job; the periodic pass notices.
    set_job_condition(admin_api, namespace, "demo-pretrain", "Running")
    wait_for(lambda: stage_status(kube, "pretrain").get("phase") == "Running", what="stage pretrain Running")
    wait_for(lambda: "StageRunning" in reasons(admin_api, namespace, uid), what="the StageRunning event")
    assert metric(controller, 'dino_ctl_experiments{phase="Running"}') == 1

    # Preempted: the trainer checkpointed on SIGTERM and exited 143; the operator marks the job failed.
    add_terminated_pod(kube, admin_api, job, 143)
    set_job_condition(admin_api, namespace, "demo-pretrain", "Failed")

    def resubmitted() -> dict[str, Any] | None:
        again = kube.get(*JOB, "demo-pretrain")
        return again if again and again["metadata"]["uid"] != job["metadata"]["uid"] else None

    second = wait_for(resubmitted, what="the preempted stage to be resubmitted")
    assert second["metadata"]["labels"]["dino-ctl.io/attempt"] == "1"
    config = kube.get("v1", "ConfigMap", "demo-pretrain-config")
    assert config["metadata"]["annotations"]["dino-ctl.io/restarts"] == '{"failure": 0, "preemption": 1, "eviction": 0}'
    assert config["metadata"]["uid"] == children["ConfigMap/demo-pretrain-config"]  # updated, never re-created
    wait_for(lambda: stage_status(kube, "pretrain").get("attempt") == 1, what="the status to show attempt 1")
    assert stage_status(kube, "pretrain")["restarts"] == {"failure": 0, "preemption": 1, "eviction": 0}
    labels = f'{{experiment="demo",reason="preemption",stage="pretrain"}}'
    assert metric(controller, f"dino_ctl_stage_restarts_total{labels}") == 1
    wait_for(lambda: "StageResubmitted" in reasons(admin_api, namespace, uid), what="the StageResubmitted event")
    (preempted,) = [e for e in events(admin_api, namespace, uid) if e.reason == "StagePreempted"]
    assert preempted.type == "Warning" and "preemption restart 1 of" in preempted.message

    # The stage succeeds: the next one starts, initialised from it.
    kube.delete("v1", "Pod", "demo-pretrain-worker-0", propagation="Background")
    set_job_condition(admin_api, namespace, "demo-pretrain", "Succeeded")
    wait_for(lambda: kube.get(*JOB, "demo-highres"), what="stage highres to be submitted")
    wait_for(lambda: status_of(kube).get("message") == "1/3 stages succeeded; highres pending",
             what="the status message to show one stage done")

    # Deleted: the finalizer stops the jobs, then goes; the garbage collector removes every child.
    assert kube.delete(*DINO, "demo", propagation="Background")
    wait_for(lambda: kube.get(*DINO, "demo") is None, what="the DinoExperiment to go once its finalizer is removed")
    wait_for(lambda: not owned_objects(kube, uid), what="the garbage collector to delete every child")
    assert kube.list(*JOB) == [] and kube.list("v1", "ConfigMap", selector="dino-ctl.io/experiment=demo") == []
    assert metric(controller, 'dino_ctl_experiments{phase="Running"}') == 0


def test_the_chart_role_is_all_the_controller_may_do(identity: ChartIdentity, admin_api: Any,
                                                      namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    installed = client.RbacAuthorizationV1Api(admin_api).read_namespaced_role(identity.role["metadata"]["name"],
                                                                               namespace)
    assert [admin_api.sanitize_for_serialization(rule) for rule in installed.rules] == identity.role["rules"]

    api = identity.api_client()
    sa = KubeClient(api, namespace=namespace)
    assert sa.list(*DINO) == [] and sa.list("v1", "ConfigMap") == []  # inside its Role
    denied = [
        lambda: sa.list("v1", "Secret"),
        lambda: sa.get("v1", "Secret", "s3-creds"),
        lambda: sa.list("v1", "ConfigMap", namespace="default"),  # another namespace
        lambda: sa.apply(experiment_document(namespace)),  # it reconciles experiments, users create them
        lambda: sa.delete(*DINO, "demo"),
        lambda: sa.list(*DINO, namespace="default"),
        lambda: sa.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                          "spec": {"containers": [{"name": "c", "image": "x"}]}}),
    ]
    for attempt in denied:
        with pytest.raises(KubeError, match="HTTP 403") as info:
            attempt()
        assert info.value.status == 403 and info.value.permanent
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                  "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                      "metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}}
    for call in (lambda: client.AppsV1Api(api).create_namespaced_deployment(namespace, deployment),
                 lambda: client.RbacAuthorizationV1Api(api).create_namespaced_role_binding(namespace, {
                     "metadata": {"name": "escalate"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                                                  "kind": "ClusterRole", "name": "admin"},
                     "subjects": [{"kind": "ServiceAccount", "name": identity.service_account,
                                   "namespace": namespace}]}),
                 lambda: client.CoreV1Api(api).list_namespace(),
                 lambda: client.ApiextensionsV1Api(api).list_custom_resource_definition()):
        with pytest.raises(ApiException) as denial:
            call()
        assert denial.value.status == 403, denial.value.body
