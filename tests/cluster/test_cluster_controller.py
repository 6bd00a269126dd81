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
    AddedRecorder,
    AdmissionGate,
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
    logs = controller.logs()
    assert "Failed to post an event" not in logs and "HTTP 403" not in logs and "Forbidden" not in logs


def test_the_chart_role_is_all_the_controller_may_do(identity: ChartIdentity, admin_api: Any,
                                                      namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    installed = client.RbacAuthorizationV1Api(admin_api).read_namespaced_role(identity.role["metadata"]["name"],
                                                                               namespace)
    assert [admin_api.sanitize_for_serialization(rule) for rule in installed.rules] == identity.role["rules"]

    api = identity.api_client()
    sa = KubeClient(api, namespace=namespace)
    assert sa.list(*DINO) == [] and sa.list("v1", "ConfigMap", selector="dino-ctl.io/experiment=demo") == []
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


def _versions(kube: KubeClient, uid: str) -> dict[str, str]:
    """``kind/name -> resourceVersion`` of the DinoExperiment and every object it owns."""
    found = {"DinoExperiment/demo": kube.get(*DINO, "demo")["metadata"]["resourceVersion"]}
    for api_version, kind in OWNED_KINDS:
        for obj in kube.list(api_version, kind):
            if any(ref["uid"] == uid for ref in obj["metadata"].get("ownerReferences") or []):
                found[f"{kind}/{obj['metadata']['name']}"] = obj["metadata"]["resourceVersion"]
    return found


def test_a_controller_killed_mid_reconcile_creates_nothing_twice(
        identity: ChartIdentity, kube_stack: Any, kube: KubeClient, admin_api: Any, namespace: str,
        tmp_path: Path) -> None:
    process = ControllerProcess(identity.kubeconfig, namespace, tmp_path)
    gate = AdmissionGate(kube_stack, namespace, group="kubeflow.org", version="v1", resource="pytorchjobs")
    try:
        with AddedRecorder(admin_api, namespace) as recorder, gate:
            wait_for(lambda: "ConfigMap/kube-root-ca.crt" in recorder.added, what="the watches to start")
            probe = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "probe"},
                     "spec": {"pytorchReplicaSpecs": {}}}
            wait_for(lambda: kube.apply(probe, dry_run=True) and gate.requests,
                     what="the admission webhook to be active")

            process.start()
            uid = kube.apply(experiment_document(namespace))["metadata"]["uid"]
            # The pass has applied the stage ConfigMap and now waits for the job's admission: kill it there.
            wait_for(gate.held.is_set, what="the controller to submit the pretrain job")
            process.kill()
            config = kube.get("v1", "ConfigMap", "demo-pretrain-config")
            assert config is not None and FINALIZER in kube.get(*DINO, "demo")["metadata"]["finalizers"]
            assert not (kube.get(*DINO, "demo").get("status") or {}).get("stages")  # the pass never finished
            gate.release.set()

            process.start()
            wait_for(lambda: stage_status(kube, "pretrain").get("job"), what="the restarted controller's status")
            assert kube.get("v1", "ConfigMap", "demo-pretrain-config")["metadata"]["uid"] == config["metadata"]["uid"]
            job = kube.get(*JOB, "demo-pretrain")
            assert job["metadata"]["labels"]["dino-ctl.io/attempt"] == "0"

            # Killed again with nothing to do: the restarted controller writes nothing at all.
            wait_for(lambda: metric(process, 'dino_ctl_experiments{phase="Running"}') == 1, what="a pass")
            before = _versions(kube, uid)
            process.kill()
            process.start()
            wait_for(lambda: metric(process, 'dino_ctl_experiments{phase="Running"}') == 1,
                     what="the restarted controller's first pass")
            wait_for(lambda: "Timer 'periodic' succeeded" in process.log.read_text(), what="a periodic pass")
            assert _versions(kube, uid) == before

            set_job_condition(admin_api, namespace, "demo-pretrain", "Succeeded")
            wait_for(lambda: stage_status(kube, "highres").get("job"), what="stage highres to be submitted")
            wait_for(lambda: "PyTorchJob/demo-highres" in recorder.added, what="the watch to see the highres job")
        assert {name: len(uids) for name, uids in recorder.added.items()} == {
            "ConfigMap/kube-root-ca.crt": 1, "ConfigMap/demo-pretrain-config": 1, "ConfigMap/demo-highres-config": 1,
            "PyTorchJob/demo-pretrain": 1, "PyTorchJob/demo-highres": 1}
        assert recorder.added["PyTorchJob/demo-pretrain"] == [job["metadata"]["uid"]]
        assert len(kube.list(*JOB)) == 2
    finally:
        process.stop()
        print(f"--- controller logs ({tmp_path})\n{process.logs()[-20000:]}")


def kubectl_apply(stack: Any, kubeconfig: Path, document: dict[str, Any], tmp_path: Path) -> Any:
    """``kubectl apply --server-side -f`` with the stack's own kubectl."""
    import subprocess

    import yaml

    kubectl = stack.kubectl()
    assert kubectl is not None, f"kubectl was not built in {stack.binaries}: run `bash scripts/k8s-stack.sh`"
    path = tmp_path / f"{document['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(document))
    return subprocess.run([str(kubectl), "--kubeconfig", str(kubeconfig), "apply", "--server-side", "-f", str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("backend", "slurm", 'spec.backend: Unsupported value: "slurm": supported values: "pytorchjob", "trainjob"'),
    ("storage", {"checkpoints": "/local/disk"},
     'spec.storage.checkpoints: Invalid value: "/local/disk": '
     "spec.storage.checkpoints in body should match '^(s3|gs|file|pvc)://.+$'"),
    ("stages", [], "spec.stages: Invalid value: 0: spec.stages in body should have at least 1 items"),
], ids=["enum", "pattern", "minItems"])
def test_the_crd_schema_refuses_what_it_can_express(
        field: str, value: Any, message: str, kube_stack: Any, dynamic: Any, namespace: str, kubeconfig_for: Any,
        crds: dict, tmp_path: Path) -> None:
    from kubernetes.client.exceptions import ApiException

    del crds
    bad = experiment_document(namespace, **{field: value})
    result = kubectl_apply(kube_stack, kubeconfig_for(namespace), bad, tmp_path)
    assert result.returncode == 1, result.stdout
    assert 'The DinoExperiment "demo" is invalid: ' in result.stderr and message in result.stderr
    api = dynamic.resources.get(api_version="dino-ctl.io/v1alpha1", kind="DinoExperiment")
    with pytest.raises(ApiException) as refused:
        api.server_side_apply(body=bad, name="demo", namespace=namespace, field_manager="kubectl")
    import json

    body = refused.value.body
    status = json.loads(body.decode() if isinstance(body, bytes) else body)
    assert (refused.value.status, status["code"], status["reason"]) == (422, 422, "Invalid")
    assert message in status["message"]
    assert api.get(namespace=namespace).items == []  # nothing was stored


def test_what_only_dino_ctl_knows_is_invalid_once_and_not_retried(
        controller: ControllerProcess, kube_stack: Any, kube: KubeClient, admin_api: Any, namespace: str,
        kubeconfig_for: Any, tmp_path: Path) -> None:
    bad = experiment_document(namespace)
    bad["spec"]["stages"][0]["recipe"] = "no-such-recipe"  # a string to the schema; dino-ctl knows the recipes
    result = kubectl_apply(kube_stack, kubeconfig_for(namespace), bad, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "dinoexperiment.dino-ctl.io/demo serverside-applied"
    uid = kube.get(*DINO, "demo")["metadata"]["uid"]

    wait_for(lambda: status_of(kube).get("phase") == "Invalid", what="the Invalid phase")
    status = status_of(kube)
    assert "spec.stages[0].recipe" in status["message"] and "no-such-recipe" in status["message"]
    invalid = [c for c in status["conditions"] if c["type"] == "Invalid"]
    assert invalid and invalid[0]["status"] == "True" and invalid[0]["reason"] == "InvalidSpec"
    assert "spec.stages[0].recipe" in invalid[0]["message"]
    wait_for(lambda: "InvalidSpec" in reasons(admin_api, namespace, uid), what="the InvalidSpec event")

    # Several periodic passes later: still one event, no write, nothing submitted, counted once.
    version = kube.get(*DINO, "demo")["metadata"]["resourceVersion"]
    passes = controller.log.read_text().count("Timer 'periodic'")
    wait_for(lambda: controller.log.read_text().count("Timer 'periodic'") >= passes + 6, what="three timer passes")
    found = events(admin_api, namespace, uid)
    warnings = [(e.type, e.reason) for e in found if e.type != "Normal"]
    assert warnings == [("Warning", "InvalidSpec")], [(e.type, e.reason, e.message) for e in found]
    (event,) = [e for e in found if e.reason == "InvalidSpec"]
    assert "spec.stages[0].recipe" in event.message and (event.count or 1) == 1
    assert kube.get(*DINO, "demo")["metadata"]["resourceVersion"] == version
    assert kube.list(*JOB) == [] and kube.get("v1", "ConfigMap", "demo-pretrain-config") is None
    assert metric(controller, 'dino_ctl_reconcile_errors_total{kind="invalid_spec"}') == 1
    assert metric(controller, 'dino_ctl_experiments{phase="Invalid"}') == 1

    # Fixed by the user: the next pass runs it.
    good = experiment_document(namespace)
    assert kubectl_apply(kube_stack, kubeconfig_for(namespace), good, tmp_path).returncode == 0
    wait_for(lambda: stage_status(kube, "pretrain").get("job"), what="the fixed experiment to be submitted")
    assert not [c for c in status_of(kube)["conditions"] if c["type"] == "Invalid" and c["status"] == "True"]


def test_owned_children_need_the_finalizers_rule(identity: ChartIdentity, dynamic: Any, admin_api: Any,
                                                 kube: KubeClient, namespace: str, kubeconfig_for: Any) -> None:
    """The one rule no request of the controller names: without it, no child may block its owner's deletion."""
    from kubernetes import client

    owner = kube.apply(experiment_document(namespace))
    reference = {"apiVersion": "dino-ctl.io/v1alpha1", "kind": "DinoExperiment", "name": "demo",
                 "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    child = {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "demo-pretrain-config", "ownerReferences": [reference]}}
    rbac = client.RbacAuthorizationV1Api(admin_api)
    role = identity.role
    rules = [r for r in role["rules"] if r["resources"] != ["dinoexperiments/finalizers"]]
    assert len(rules) == len(role["rules"]) - 1
    rbac.patch_namespaced_role(role["metadata"]["name"], namespace, {"rules": rules})
    sa = KubeClient(identity.api_client(), namespace=namespace)
    with pytest.raises(KubeError, match="HTTP 403: .*cannot set blockOwnerDeletion") as refused:
        sa.apply(child)
    assert refused.value.status == 403
    rbac.patch_namespaced_role(role["metadata"]["name"], namespace, {"rules": role["rules"]})
    wait_for(lambda: _applies(sa, child), what="the restored Role to allow the owned child")


def _applies(client: KubeClient, obj: dict[str, Any]) -> bool:
    try:
        return bool(client.apply(obj))
    except KubeError as exc:
        if exc.status != 403:
            raise
        return False
