"""The chart and the plain manifests, applied server-side to a real API server with the upstream CRDs installed.

The controller's namespace enforces PodSecurity ``restricted``; the Deployment counts as admitted once the real
Deployment and ReplicaSet controllers have created its pod there (a pod that broke the level would be refused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dino_ctl.controller.manifests import CHART, DEFAULT_NAMESPACE, POD_SECURITY_LABELS, render_chart
from dino_ctl.schema import CRD_NAME
from tests.cluster.conftest import load_yaml_documents, server_side_apply, wait_for
from tests.cluster.stack import REPO

pytest.importorskip("helm_python", reason="helm-python-sdk (a dev dependency) renders the chart")
MANIFESTS = REPO / "manifests"


def _kustomization_objects() -> list[dict[str, Any]]:
    """What ``kubectl apply -k manifests/`` applies, in the kustomization's order."""
    [kustomization] = load_yaml_documents(MANIFESTS / "kustomization.yaml")
    return [doc for resource in kustomization["resources"] for doc in load_yaml_documents(MANIFESTS / resource)]


def _pods(admin_api: Any, namespace: str) -> list[Any]:
    from kubernetes import client

    return client.CoreV1Api(admin_api).list_namespaced_pod(namespace).items


def _label_restricted(admin_api: Any, namespace: str) -> None:
    from kubernetes import client

    client.CoreV1Api(admin_api).patch_namespace(namespace, {"metadata": {"labels": POD_SECURITY_LABELS}})


@pytest.fixture
def cluster_scoped_cleanup(dynamic: Any) -> Any:
    """Deletes the cluster-scoped objects a test installed (other tests share the cluster)."""
    installed: list[dict[str, Any]] = []
    yield installed
    for obj in installed:
        if obj["kind"] not in ("CustomResourceDefinition",):  # CRDs are shared by the session (the crds fixture)
            dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"]).delete(name=obj["metadata"]["name"])


def test_plain_manifests_install_into_a_restricted_namespace(dynamic: Any, admin_api: Any, crds: dict,
                                                             cluster_scoped_cleanup: list) -> None:
    applied = []
    for obj in _kustomization_objects():
        if dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"]).namespaced is False:
            cluster_scoped_cleanup.append(obj)
        live, warnings = server_side_apply(dynamic, obj)
        assert warnings == [], (obj["kind"], obj["metadata"]["name"], warnings)
        applied.append((live["kind"], live["metadata"]["name"]))
    kinds = {kind for kind, _ in applied}
    assert kinds >= {"Namespace", "CustomResourceDefinition", "ServiceAccount", "Role", "RoleBinding", "Deployment",
                     "PodMonitor", "PrometheusRule", "ConfigMap", "ClusterTrainingRuntime"}, applied

    crd = dynamic.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True"
                         for c in crd.get(name=CRD_NAME).to_dict()["status"]["conditions"]),
             what=f"CRD {CRD_NAME} Established")
    labels = dynamic.resources.get(api_version="v1", kind="Namespace").get(name=DEFAULT_NAMESPACE).metadata.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = wait_for(lambda: _pods(admin_api, DEFAULT_NAMESPACE), what="the controller's pod (Deployment -> pod)")
    assert pods[0].spec.service_account_name == "dino-ctl"
    assert pods[0].spec.security_context.run_as_non_root is True
    del crds


def test_pod_security_is_enforced_there(dynamic: Any, admin_api: Any, namespace: str) -> None:
    """The negative control: the same namespace label refuses a pod that breaks ``restricted``."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    _label_restricted(admin_api, namespace)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "privileged"},
           "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:0",
                                    "securityContext": {"privileged": True}}]}}
    with pytest.raises(ApiException) as info:
        client.CoreV1Api(admin_api).create_namespaced_pod(namespace, pod)
    assert info.value.status == 403 and "violates PodSecurity" in info.value.body
    del dynamic


@pytest.mark.parametrize("monitoring", [True, False], ids=["monitoring", "no-monitoring"])
def test_the_chart_with_non_default_values_is_accepted_as_rendered(
        dynamic: Any, admin_api: Any, namespace: str, crds: dict, monitoring: bool, tmp_path: Path) -> None:
    from kubernetes import client

    core = client.CoreV1Api(admin_api)
    watched = f"{namespace}-w"
    core.create_namespace({"metadata": {"name": watched}})
    _label_restricted(admin_api, namespace)
    values = {
        "image": {"repository": "registry.example.com/ml/dino-ctl-controller", "tag": "1.2.3"},
        "watchNamespaces": [namespace, watched],
        "controller": {"reconcileIntervalSeconds": 60, "logLevel": "DEBUG"},
        "serviceAccount": {"name": "dino-operator"},
        "trainingRuntime": {"enabled": False},
        "rbac": {"monitoring": monitoring},
        "monitoring": {"trainingPodMonitor": {"enabled": monitoring}, "prometheusRule": {"enabled": monitoring}},
    }
    try:
        objects = [obj for docs in render_chart(REPO / CHART, values, namespace=namespace).values() for obj in docs]
        for obj in objects:
            _, warnings = server_side_apply(dynamic, obj, namespace=obj["metadata"].get("namespace") or namespace)
            assert warnings == [], (obj["kind"], obj["metadata"]["name"], warnings)
        roles = {(o["metadata"]["namespace"], o["kind"]) for o in objects if o["kind"] in ("Role", "RoleBinding")}
        assert roles == {(ns, kind) for ns in (namespace, watched) for kind in ("Role", "RoleBinding")}
        pods = wait_for(lambda: _pods(admin_api, namespace), what="the controller's pod")
        assert pods[0].spec.service_account_name == "dino-operator"
        args = pods[0].spec.containers[0].args
        assert f"--namespace={watched}" in args and "--log-level=DEBUG" in args
    finally:
        core.delete_namespace(watched)
    del crds, tmp_path
