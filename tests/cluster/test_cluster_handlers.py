"""The controller's kopf handlers called in-process against the real API server, as the chart's ServiceAccount.

kopf's part (calling the handlers, posting events) is played by the test so that each pass can be checked exactly:
what it wrote (resourceVersions), what it reported, what it counted. The controller as a real kopf process is in
test_cluster_controller.py.
"""

from __future__ import annotations

import threading
from typing import Any

import kopf
import pytest

from dino_ctl import kube as kube_api
from dino_ctl.controller.core import Event
from dino_ctl.controller.executor import Executor
from dino_ctl.controller.handlers import Controller, Handlers, make_handlers
from dino_ctl.controller.metrics import ControllerMetrics
from dino_ctl.kube import KubeClient, Resource
from tests.cluster.conftest import wait_for
from tests.cluster.controller_process import ChartIdentity, install_chart_identity
from tests.dino_ctl.spec_helpers import document

DINO = ("dino-ctl.io/v1alpha1", "DinoExperiment")
JOB = ("kubeflow.org/v1", "PyTorchJob")
NOW = "2026-11-26T10:00:00Z"


@pytest.fixture
def identity(dynamic: Any, admin_api: Any, namespace: str, kubeconfig_for: Any, crds: dict) -> ChartIdentity:
    del crds
    return install_chart_identity(dynamic, admin_api, namespace, kubeconfig_for)


class Harness:
    """One controller as ``python -m dino_ctl.controller`` wires it, the resource read back before every pass."""

    def __init__(self, identity: ChartIdentity | None, admin: KubeClient, admin_api: Any) -> None:
        self.sa = KubeClient(identity.api_client(), namespace=identity.namespace) if identity else admin
        self.admin, self.admin_api = admin, admin_api
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self.restart()

    def restart(self) -> None:
        """A fresh controller process: new metrics, no memory, same cluster."""
        self.metrics = ControllerMetrics()
        self.controller = Controller(Executor(self.sa), self.metrics, clock=lambda: NOW)
        self.handlers: Handlers = make_handlers(self.controller, interval=30, post=self._post)

    def _post(self, _body: Any, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def body(self) -> dict[str, Any]:
        return self.admin.get(*DINO, "demo")

    def run(self, body: dict[str, Any] | None = None) -> list[str]:
        """One on_change call (with ``body``, default the resource as stored now); the reasons of its events."""
        before = len(self.events)
        self.handlers.on_change(body=kopf.Body(body or self.body()), patch=kopf.Patch())
        return [e.reason for e in self.events[before:]]

    def versions(self) -> dict[str, str]:
        """resourceVersion of the resource and of every object labelled for it."""
        found = {f"{o['kind']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"]
                 for o in self.admin.experiment_objects("demo")}
        found["DinoExperiment/demo"] = self.body()["metadata"]["resourceVersion"]
        return found

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def set_job_condition(self, stage: str, condition: str) -> None:
        from kubernetes import client

        client.CustomObjectsApi(self.admin_api).patch_namespaced_custom_object_status(
            "kubeflow.org", "v1", self.admin.namespace, "pytorchjobs", f"demo-{stage}",
            {"status": {"conditions": [{"type": condition, "status": "True", "reason": f"PyTorchJob{condition}",
                                        "message": condition.lower(), "lastTransitionTime": NOW}]}})

    def add_pod(self, stage: str, *, exit_code: int) -> None:
        from kubernetes import client

        labels = self.admin.get(*JOB, f"demo-{stage}")["spec"]["pytorchReplicaSpecs"]["Worker"]["template"][
            "metadata"]["labels"]
        name = f"demo-{stage}-worker-0"
        self.admin.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                          "spec": {"containers": [{"name": "pytorch", "image": "registry.invalid/none:0"}],
                                   "nodeSelector": {"no-such-node": "true"}}})
        client.CoreV1Api(self.admin_api).patch_namespaced_pod_status(name, self.admin.namespace, {"status": {
            "phase": "Failed", "containerStatuses": [{
                "name": "pytorch", "image": "registry.invalid/none:0", "imageID": "", "ready": False,
                "restartCount": 0, "state": {"terminated": {"exitCode": exit_code}}}]}})


def _create(kube: KubeClient, namespace: str, **spec: Any) -> dict[str, Any]:
    body = document(**spec)
    body["metadata"]["namespace"] = namespace
    return kube.apply(body)


@pytest.fixture
def harness(identity: ChartIdentity, kube: KubeClient, admin_api: Any) -> Harness:
    return Harness(identity, kube, admin_api)


def test_lifecycle_is_idempotent_across_passes_and_controller_restarts(harness: Harness, kube: KubeClient,
                                                                        namespace: str) -> None:
    uid = _create(kube, namespace)["metadata"]["uid"]
    assert harness.run() == ["StageSubmitted"]  # the Prometheus Operator CRDs are served: monitoring applied
    job = kube.get(*JOB, "demo-pretrain")
    owner = {"apiVersion": "dino-ctl.io/v1alpha1", "kind": "DinoExperiment", "name": "demo", "uid": uid,
             "controller": True, "blockOwnerDeletion": True}
    assert job["metadata"]["labels"]["dino-ctl.io/attempt"] == "0" and job["metadata"]["ownerReferences"] == [owner]
    assert kube.get("v1", "ConfigMap", "demo-pretrain-config")["metadata"]["ownerReferences"] == [owner]
    assert harness.body()["status"]["phase"] == "Pending"

    # The next pass records what the submission changed (a job exists: the experiment is Running, its stage
    # waits for pods); from then on the same cluster state writes nothing and reports nothing.
    assert harness.run() == [] and harness.body()["status"]["phase"] == "Running"
    before = harness.versions()
    assert harness.run() == [] and harness.versions() == before

    harness.set_job_condition("pretrain", "Running")
    assert harness.run() == ["StageRunning"]
    assert harness.body()["status"]["currentStage"] == "pretrain"
    assert harness.sample("dino_ctl_experiments", phase="Running") == 1

    # Preempted: SIGTERM, checkpoint written, exit 143, the operator marks the job failed.
    harness.add_pod("pretrain", exit_code=143)
    harness.set_job_condition("pretrain", "Failed")
    assert harness.run() == ["StagePreempted"]
    annotations = kube.get("v1", "ConfigMap", "demo-pretrain-config")["metadata"]["annotations"]
    assert annotations["dino-ctl.io/restarts"] == '{"failure": 0, "preemption": 1, "eviction": 0}'
    assert annotations["dino-ctl.io/counted-job"] == job["metadata"]["uid"]
    assert harness.sample("dino_ctl_stage_restarts_total", experiment="demo", stage="pretrain",
                          reason="preemption") == 1
    stage = harness.body()["status"]["stages"][0]
    assert (stage["phase"], stage["restarts"]["preemption"]) == ("Restarting", 1)

    # The controller restarts while the garbage collector deletes the job: it counts and reports nothing twice.
    harness.restart()
    reported = wait_for(harness.run, what="a pass to resubmit the stage once the job is gone", interval=0.2)
    assert reported == ["StageResubmitted"]
    second = kube.get(*JOB, "demo-pretrain")
    assert second["metadata"]["labels"]["dino-ctl.io/attempt"] == "1" and second["metadata"]["uid"] != job[
        "metadata"]["uid"]
    assert harness.sample("dino_ctl_stage_restarts_total", experiment="demo", stage="pretrain",
                          reason="preemption") == 0
    assert harness.run() == []  # records the resubmitted job in the status
    before = harness.versions()
    assert harness.run() == [] and harness.versions() == before

    kube.delete("v1", "Pod", "demo-pretrain-worker-0", propagation="Background")
    harness.set_job_condition("pretrain", "Succeeded")
    assert harness.run() == ["StageSubmitted", "StageSucceeded"]
    assert kube.get(*JOB, "demo-highres") is not None
    assert harness.body()["status"]["message"] == "1/3 stages succeeded; highres pending"


def test_concurrent_passes_with_a_stale_body_report_once(harness: Harness, kube: KubeClient, namespace: str) -> None:
    """The timer and a change handler fire together, both with the body kopf had before either wrote."""
    _create(kube, namespace)
    harness.run()
    harness.set_job_condition("pretrain", "Running")
    stale = harness.body()
    threads = [threading.Thread(target=harness.run, args=(stale,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [e.reason for e in harness.events] == ["StageSubmitted", "StageRunning"]
    assert harness.body()["status"]["stages"][0]["phase"] == "Running"


def test_delete_waits_for_the_jobs(harness: Harness, kube: KubeClient, namespace: str) -> None:
    _create(kube, namespace)
    harness.run()
    with pytest.raises(kopf.TemporaryError, match="waiting for PyTorchJob/demo-pretrain to be deleted"):
        harness.handlers.on_delete(body=kopf.Body(harness.body()))
    wait_for(lambda: kube.get(*JOB, "demo-pretrain") is None, what="the job's foreground deletion")
    harness.handlers.on_delete(body=kopf.Body(harness.body()))  # nothing left: the finalizer may go
    assert harness.sample("dino_ctl_experiments", phase="Pending") == 0


def test_a_resource_deleted_meanwhile_is_left_alone(harness: Harness, kube: KubeClient, namespace: str) -> None:
    body = _create(kube, namespace)
    kube.delete(*DINO, "demo", propagation="Background")
    wait_for(lambda: kube.get(*DINO, "demo") is None, what="the resource to go")
    assert harness.run(body) == []
    assert kube.get(*JOB, "demo-pretrain") is None


def test_api_errors_are_reported_and_counted(harness: Harness, identity: ChartIdentity, admin_api: Any,
                                             kube: KubeClient, namespace: str) -> None:
    from kubernetes import client

    role = identity.role
    rules = [r for r in role["rules"] if r["resources"] != ["pytorchjobs"]]  # an installation without it
    client.RbacAuthorizationV1Api(admin_api).patch_namespaced_role(role["metadata"]["name"], namespace,
                                                                   {"rules": rules})
    _create(kube, namespace)
    with pytest.raises(kopf.PermanentError, match=r"list PyTorchJob/\* in .* failed \(HTTP 403: .*forbidden"):
        harness.run()
    assert [e.reason for e in harness.events] == ["ReconcileError"]
    assert harness.sample("dino_ctl_reconcile_errors_total", kind="api") == 1
    assert not (harness.body().get("status") or {})  # nothing of the failed pass was recorded


def test_monitoring_objects_follow_the_spec(harness: Harness, kube: KubeClient, namespace: str) -> None:
    uid = _create(kube, namespace, monitoring={"release": "kps", "scrapeInterval": "15s"})["metadata"]["uid"]
    assert harness.run() == ["StageSubmitted"]
    monitor = kube.get("monitoring.coreos.com/v1", "PodMonitor", "demo-dino")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["metadata"]["ownerReferences"][0]["uid"] == uid
    assert monitor["spec"]["podMetricsEndpoints"][0]["interval"] == "15s"
    assert kube.get("monitoring.coreos.com/v1", "PrometheusRule", "demo-dino") is not None
    # An unchanged spec does not touch them; a new generation re-applies them.
    harness.run()
    assert kube.get("monitoring.coreos.com/v1", "PodMonitor", "demo-dino")["metadata"]["resourceVersion"] == \
        monitor["metadata"]["resourceVersion"]
    _create(kube, namespace, monitoring={"release": "kps", "scrapeInterval": "60s"})
    assert harness.body()["metadata"]["generation"] == 2
    harness.run()
    monitor = kube.get("monitoring.coreos.com/v1", "PodMonitor", "demo-dino")
    assert monitor["spec"]["podMetricsEndpoints"][0]["interval"] == "60s"
    assert harness.body()["status"]["observedGeneration"] == 2


def test_monitoring_without_the_prometheus_operator_is_a_warning(kube: KubeClient, admin_api: Any, namespace: str,
                                                                 crds: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CRDs are installed for the whole session: point the two kinds at resources this server does not serve,
    # so the real server answers 404 as it does where the Prometheus Operator is missing. As the admin: for the
    # chart's ServiceAccount, RBAC refuses (403) a resource its Role does not name before the 404 could come.
    del crds
    harness = Harness(None, kube, admin_api)
    for kind, plural in (("PodMonitor", "podmonitorsnotinstalled"), ("PrometheusRule", "prometheusrulesnotinstalled")):
        unserved = Resource("monitoring.coreos.com/v1", kind, plural)
        monkeypatch.setitem(kube_api.RESOURCES, (unserved.api_version, kind), unserved)
    _create(kube, namespace)
    assert harness.run() == ["StageSubmitted", "MonitoringNotApplied", "MonitoringNotApplied"]
    warning = next(e for e in harness.events if e.reason == "MonitoringNotApplied")
    assert warning.type == "Warning"
    assert warning.message.startswith("PodMonitor not applied: monitoring.coreos.com/v1 is not served")
    assert kube.get(*JOB, "demo-pretrain") is not None  # training does not depend on being scraped
