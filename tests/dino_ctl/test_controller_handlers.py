"""The kopf handlers end to end against the in-memory API server over HTTP (real kubernetes client, real kube.py).

Tests play the training operator by editing job status and pods in the fake server between passes, and play kopf by
applying each handler's status patch to the resource before the next call.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import kopf
import pytest

from dino_ctl.controller.core import Event
from dino_ctl.controller.executor import Executor
from dino_ctl.controller.handlers import Controller, Handlers, build_registry, make_handlers
from dino_ctl.controller.metrics import ControllerMetrics
from tests.dino_ctl.fake_apiserver import FakeApiServer, RunningServer
from tests.dino_ctl.spec_helpers import document

UID = "0b6c5a1e-5f8a-4c36-9d53-3f1f1b0c2f11"
RUNNING = {"type": "Running", "status": "True", "reason": "PyTorchJobRunning", "message": "running"}
FAILED = {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed", "message": "1 Worker replica(s) failed."}
SUCCEEDED = {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded", "message": "completed"}


class Harness:
    """One controller wired like ``python -m dino_ctl.controller``, against a fake server, with kopf's role played."""

    def __init__(self, server: RunningServer, body: dict[str, Any]) -> None:
        self.server = server
        self.body = body
        self.events: list[Event] = []
        self.restart()

    def restart(self) -> None:
        """A fresh controller process: new metrics, no memory, same cluster and resource."""
        self.metrics = ControllerMetrics()
        controller = Controller(Executor(self.server.client()), self.metrics, clock=lambda: "2026-11-26T10:00:00Z")
        self.handlers: Handlers = make_handlers(controller, interval=30, post=lambda _body, e: self.events.append(e))

    def run(self) -> list[Event]:
        """One on_change call; the status patch is merged into the resource like kopf would; returns new events."""
        before = len(self.events)
        patch = kopf.Patch()
        try:
            self.handlers.on_change(body=kopf.Body(copy.deepcopy(self.body)), patch=patch)
        finally:
            status = self.body.setdefault("status", {})
            for key, value in (patch.get("status") or {}).items():
                status.pop(key) if value is None else status.__setitem__(key, value)
        return self.events[before:]

    @property
    def state(self) -> FakeApiServer:
        return self.server.state

    def job(self, stage: str) -> dict[str, Any] | None:
        return self.state.find("PyTorchJob", f"demo-{stage}")

    def restarts(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "dino_ctl_stage_restarts_total", {"experiment": "demo", "stage": "pretrain", "reason": reason})
        return value or 0.0

    def add_pod(self, stage: str, *, attempt: int, exit_code: int) -> None:
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"demo-{stage}-worker-0", "namespace": "ml",
                            "labels": {"dino-ctl.io/experiment": "demo", "dino-ctl.io/stage": stage,
                                       "dino-ctl.io/attempt": str(attempt)}},
               "status": {"phase": "Failed", "containerStatuses": [
                   {"name": "pytorch", "state": {"terminated": {"exitCode": exit_code}}}]}}
        self.state.add(pod, f"/api/v1/namespaces/ml/pods/demo-{stage}-worker-0")


def _body(**spec_overrides: Any) -> dict[str, Any]:
    body = document(**spec_overrides)
    body["metadata"].update(uid=UID, generation=1, resourceVersion="1")
    return body


@pytest.fixture
def harness() -> Iterator[Harness]:
    with RunningServer() as server:
        yield Harness(server, _body())


def _writes(state: FakeApiServer) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in state.requests if r.method in ("PATCH", "DELETE")]


def test_lifecycle_is_idempotent_across_passes_and_controller_restarts(harness: Harness) -> None:
    events = harness.run()
    job = harness.job("pretrain")
    assert job is not None and job["metadata"]["labels"]["dino-ctl.io/attempt"] == "0"
    owner = {"apiVersion": "dino-ctl.io/v1alpha1", "kind": "DinoExperiment", "name": "demo", "uid": UID,
             "controller": True, "blockOwnerDeletion": True}
    assert job["metadata"]["ownerReferences"] == [owner]
    assert harness.state.find("ConfigMap", "demo-pretrain-config")["metadata"]["ownerReferences"] == [owner]
    assert [e.reason for e in events] == ["StageSubmitted", "MonitoringNotApplied", "MonitoringNotApplied"]
    assert events[1].message.startswith("PodMonitor not applied: monitoring.coreos.com/v1 is not served")
    assert harness.body["status"]["phase"] == "Pending"

    # Same cluster state again: nothing written, nothing reported.
    harness.state.requests.clear()
    assert harness.run() == []
    assert _writes(harness.state) == []

    job["status"] = {"conditions": [RUNNING]}
    assert [e.reason for e in harness.run()] == ["StageRunning"]
    assert harness.body["status"]["currentStage"] == "pretrain"
    assert harness.metrics.registry.get_sample_value("dino_ctl_experiments", {"phase": "Running"}) == 1

    # Preempted: SIGTERM, checkpoint written, exit 143, the operator marks the job failed.
    job["status"] = {"conditions": [FAILED]}
    harness.add_pod("pretrain", attempt=0, exit_code=143)
    harness.state.requests.clear()
    assert [e.reason for e in harness.run()] == ["StagePreempted"]
    assert _writes(harness.state) == [
        ("PATCH", "/api/v1/namespaces/ml/configmaps/demo-pretrain-config"),  # counts recorded first
        ("DELETE", "/apis/kubeflow.org/v1/namespaces/ml/pytorchjobs/demo-pretrain"),
    ]
    annotations = harness.state.find("ConfigMap", "demo-pretrain-config")["metadata"]["annotations"]
    assert annotations["dino-ctl.io/restarts"] == '{"failure": 0, "preemption": 1, "eviction": 0}'
    assert harness.restarts("preemption") == 1
    stage = harness.body["status"]["stages"][0]
    assert (stage["phase"], stage["restarts"]["preemption"]) == ("Restarting", 1)

    # The controller restarts before resubmitting: it resumes from the cluster's state and counts nothing twice.
    harness.restart()
    assert [e.reason for e in harness.run()] == ["StageResubmitted"]
    assert harness.job("pretrain")["metadata"]["labels"]["dino-ctl.io/attempt"] == "1"
    assert harness.restarts("preemption") == 0
    harness.state.requests.clear()
    assert harness.run() == [] and _writes(harness.state) == []

    harness.job("pretrain")["status"] = {"conditions": [SUCCEEDED]}
    assert [e.reason for e in harness.run()] == ["StageSubmitted", "StageSucceeded"]
    assert harness.job("highres") is not None
    assert harness.body["status"]["message"] == "1/3 stages succeeded; highres pending"


def test_delete_waits_for_the_jobs(harness: Harness) -> None:
    harness.run()
    assert harness.job("pretrain") is not None
    with pytest.raises(kopf.TemporaryError, match="waiting for PyTorchJob/demo-pretrain to be deleted"):
        harness.handlers.on_delete(body=kopf.Body(copy.deepcopy(harness.body)))
    assert harness.job("pretrain") is None
    harness.handlers.on_delete(body=kopf.Body(copy.deepcopy(harness.body)))  # nothing left: the finalizer goes
    assert harness.metrics.registry.get_sample_value("dino_ctl_experiments", {"phase": "Pending"}) == 0


def test_invalid_spec_is_reported_once_and_not_retried() -> None:
    with RunningServer() as server:
        body = _body()
        body["spec"]["stages"][0]["recipe"] = "no-such-recipe"
        harness = Harness(server, body)
        with pytest.raises(kopf.PermanentError, match=r"spec.stages\[0\]"):
            harness.run()
        status = harness.body["status"]
        assert status["phase"] == "Invalid"
        assert "no-such-recipe" in status["message"] and "tiny" in status["message"]
        assert [e.reason for e in harness.events] == ["InvalidSpec"]
        with pytest.raises(kopf.PermanentError):
            harness.run()
        assert len(harness.events) == 1
        assert harness.metrics.registry.get_sample_value("dino_ctl_reconcile_errors_total",
                                                         {"kind": "invalid_spec"}) == 2
        assert server.state.of_kind("PyTorchJob") == []


def test_api_errors_are_reported_and_counted() -> None:
    state = FakeApiServer()
    state.served.discard("pytorchjobs")  # the Training Operator is not installed
    with RunningServer(state) as server:
        harness = Harness(server, _body())
        with pytest.raises(kopf.PermanentError, match="apply PyTorchJob/demo-pretrain in ml failed \\(HTTP 404"):
            harness.run()
        assert [e.reason for e in harness.events] == ["ReconcileError"]
        assert harness.metrics.registry.get_sample_value("dino_ctl_reconcile_errors_total", {"kind": "api"}) == 1


def test_registry_wires_every_handler() -> None:
    registry = build_registry(Controller(Executor(None), ControllerMetrics()), interval=20)  # type: ignore[arg-type]
    changing = registry._changing.get_all_handlers()
    assert sorted(h.id for h in changing) == ["cleanup", "reconcile", "reconcile", "reconcile"]
    (timer,) = registry._spawning.get_all_handlers()
    assert (timer.id, timer.interval) == ("periodic", 20)


def test_monitoring_objects_follow_the_spec() -> None:
    state = FakeApiServer()
    state.served |= {"podmonitors", "prometheusrules"}
    with RunningServer(state) as server:
        harness = Harness(server, _body(monitoring={"release": "kps", "scrapeInterval": "15s"}))
        assert [e.reason for e in harness.run()] == ["StageSubmitted"]
        monitor = state.find("PodMonitor", "demo-dino")
        assert monitor["metadata"]["labels"]["release"] == "kps"
        assert monitor["metadata"]["ownerReferences"][0]["uid"] == UID
        assert monitor["spec"]["podMetricsEndpoints"][0]["interval"] == "15s"
        assert state.find("PrometheusRule", "demo-dino") is not None
        # A spec change (new generation) re-applies them; an unchanged spec does not touch them.
        state.requests.clear()
        harness.run()
        assert not [r for r in state.requests if "podmonitors" in r.path]
        harness.body["spec"]["monitoring"]["scrapeInterval"] = "60s"
        harness.body["metadata"]["generation"] = 2
        harness.run()
        assert state.find("PodMonitor", "demo-dino")["spec"]["podMetricsEndpoints"][0]["interval"] == "60s"
        assert harness.body["status"]["observedGeneration"] == 2
