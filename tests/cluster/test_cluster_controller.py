"""The kopf controller as a real process against the real API server, as the chart's ServiceAccount.

Each test installs the chart's ServiceAccount, Role and RoleBinding in its fresh namespace (rendered by the project,
applied as the admin), gets a token for it from the TokenRequest API and runs ``python -m dino_ctl.controller`` with
that token only, its health and metrics endpoints on 127.0.0.1. No training operator runs: the tests play it by
writing the PyTorchJob's status through its status subresource, as the operator does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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


def _experiment(namespace: str, **spec: Any) -> dict[str, Any]:
    body = document(**spec)
    body["metadata"]["namespace"] = namespace
    return body


def _events(admin_api: Any, namespace: str, uid: str) -> list[Any]:
    from kubernetes import client

    return client.CoreV1Api(admin_api).list_namespaced_event(namespace, field_selector=f"involvedObject.uid={uid}").items


def _reasons(admin_api: Any, namespace: str, uid: str) -> list[str]:
    return [e.reason for e in _events(admin_api, namespace, uid)]


def _set_job_condition(admin_api: Any, namespace: str, name: str, condition: str) -> None:
    from kubernetes import client

    client.CustomObjectsApi(admin_api).patch_namespaced_custom_object_status(
        "kubeflow.org", "v1", namespace, "pytorchjobs", name,
        {"status": {"conditions": [{"type": condition, "status": "True", "reason": "PyTorchJob" + condition,
                                    "message": f"the job is {condition.lower()}",
                                    "lastTransitionTime": "2026-12-05T00:00:00Z"}]}})


def test_controller_reconciles_as_the_chart_service_account(
        controller: ControllerProcess, kube: KubeClient, admin_api: Any, namespace: str) -> None:
    assert listening_addresses({controller.health_port, controller.metrics_port}) == {
        (HOST, controller.health_port), (HOST, controller.metrics_port)}

    created = kube.apply(_experiment(namespace))
    uid = created["metadata"]["uid"]

    def reconciled() -> dict[str, Any] | None:
        live = kube.get(*DINO, "demo")
        return live if (live.get("status") or {}).get("phase") == "Pending" else None

    live = wait_for(reconciled, what="the controller to write the status")
    print(live)
    print(controller.logs())
    assert FINALIZER in live["metadata"]["finalizers"]
    job = kube.get(*JOB, "demo-pretrain")
    owner = {"apiVersion": "dino-ctl.io/v1alpha1", "kind": "DinoExperiment", "name": "demo", "uid": uid,
             "controller": True, "blockOwnerDeletion": True}
    assert job["metadata"]["ownerReferences"] == [owner]
    print(_reasons(admin_api, namespace, uid))
    assert False
