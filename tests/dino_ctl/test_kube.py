"""kube.py's pure request/response helpers (the client itself is tested against a real API server in tests/cluster)."""

from __future__ import annotations

import pytest

from dino_ctl.kube import kube_error, list_items, object_path, parse_warnings, resource_for


@pytest.mark.parametrize(("api_version", "kind", "namespace", "name", "path"), [
    ("v1", "ConfigMap", "ml", "x", "/api/v1/namespaces/ml/configmaps/x"),
    ("v1", "Pod", "ml", None, "/api/v1/namespaces/ml/pods"),
    ("kubeflow.org/v1", "PyTorchJob", "ml", "demo-pretrain",
     "/apis/kubeflow.org/v1/namespaces/ml/pytorchjobs/demo-pretrain"),
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime", None, "dino-ctl-torch",
     "/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes/dino-ctl-torch"),
    ("batch.volcano.sh/v1alpha1", "Job", "ml", None, "/apis/batch.volcano.sh/v1alpha1/namespaces/ml/jobs"),
])
def test_object_paths(api_version: str, kind: str, namespace: str | None, name: str | None, path: str) -> None:
    assert object_path(resource_for(api_version, kind), namespace=namespace, name=name) == path


def test_unknown_kind_and_missing_namespace_are_reported() -> None:
    with pytest.raises(ValueError, match=r"kind Deployment \(apps/v1\): not a kind dino-ctl manages; known: "):
        resource_for("apps/v1", "Deployment")
    with pytest.raises(ValueError, match="ConfigMap is namespaced: a namespace is required"):
        object_path(resource_for("v1", "ConfigMap"))


def test_list_items_restore_kind_and_api_version() -> None:
    response = {"kind": "ConfigMapList", "items": [{"metadata": {"name": "a"}}]}
    assert list_items(response, resource_for("v1", "ConfigMap")) == [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}}]


@pytest.mark.parametrize(("status", "body", "message", "permanent"), [
    (422, b'{"kind":"Status","message":"PyTorchJob.kubeflow.org \\"x\\" is invalid: spec.foo: unknown"}',
     'apply PyTorchJob/x failed (HTTP 422: PyTorchJob.kubeflow.org "x" is invalid: spec.foo: unknown)', True),
    (409, "conflict text", "get PyTorchJob/x failed (HTTP 409: conflict text)", False),
    (0, None, "apply PyTorchJob/x failed (no reason given)", False),
])
def test_kube_error_messages(status: int, body: bytes | str | None, message: str, permanent: bool) -> None:
    error = kube_error(message.split()[0], "PyTorchJob/x", status, body)
    assert str(error) == message and error.permanent is permanent


def test_an_apply_conflict_says_what_to_do() -> None:
    body = b'{"kind":"Status","message":"Apply failed with 1 conflict: conflict with \\"kubectl-edit\\": .data.k"}'
    error = kube_error("apply", "ConfigMap/x", 409, body)
    assert str(error) == ('apply ConfigMap/x failed (HTTP 409: Apply failed with 1 conflict: conflict with '
                          '"kubectl-edit": .data.k; another field manager owns these fields; dino-ctl does not '
                          'overwrite them silently. Change them back, or re-run with --force-conflicts to take '
                          'ownership)')
    assert not error.permanent


def test_api_server_warnings_are_parsed() -> None:
    assert parse_warnings(['299 - "unknown field \\"spec.foo\\""', '299 - "v1 Endpoints is deprecated"']) == [
        'unknown field "spec.foo"', "v1 Endpoints is deprecated"]
    assert parse_warnings(["something else"]) == ["something else"]
