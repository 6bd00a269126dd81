"""kube.py: pure request/response helpers, and the real kubernetes client against an in-memory API server over HTTP."""

from __future__ import annotations

import pytest

from dino_ctl.errors import KubeError
from dino_ctl.kube import KubeClient, kube_error, list_items, object_path, resource_for
from tests.dino_ctl.fake_apiserver import RunningServer


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
    (409, "conflict text", "apply PyTorchJob/x failed (HTTP 409: conflict text)", False),
    (0, None, "apply PyTorchJob/x failed (no reason given)", False),
])
def test_kube_error_messages(status: int, body: bytes | str | None, message: str, permanent: bool) -> None:
    error = kube_error("apply", "PyTorchJob/x", status, body)
    assert str(error) == message and error.permanent is permanent


def test_server_side_apply_request_and_read_back() -> None:
    with RunningServer() as server:
        client = server.client()
        obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-x", "labels": {"a": "b"}},
               "data": {"k": "v"}}
        live = client.apply(obj)
        request = server.state.requests[-1]
        assert (request.method, request.path) == ("PATCH", "/api/v1/namespaces/ml/configmaps/demo-x")
        assert request.query == {"fieldManager": "dino-ctl", "force": "true"}
        assert request.content_type == "application/apply-patch+yaml"
        assert request.body["metadata"]["namespace"] == "ml"  # the client's default namespace was filled in
        assert live["metadata"]["uid"].startswith("uid-")
        assert client.get("v1", "ConfigMap", "demo-x")["data"] == {"k": "v"}
        assert client.get("v1", "ConfigMap", "absent") is None
        client.apply({**obj, "data": {"k": "w"}}, dry_run=True)
        assert server.state.requests[-1].query["dryRun"] == "All"
        assert client.get("v1", "ConfigMap", "demo-x")["data"] == {"k": "v"}


def test_list_by_label_and_missing_crds() -> None:
    with RunningServer() as server:
        client = server.client()
        for name, experiment in (("a", "demo"), ("b", "other")):
            client.apply({"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": name, "labels": {"dino-ctl.io/experiment": experiment}}})
        found = client.list("v1", "ConfigMap", selector="dino-ctl.io/experiment=demo")
        assert [(o["kind"], o["metadata"]["name"]) for o in found] == [("ConfigMap", "a")]
        assert server.state.requests[-1].query == {"labelSelector": "dino-ctl.io/experiment=demo"}
        server.state.served.discard("trainjobs")  # Kubeflow Trainer not installed
        assert client.list("trainer.kubeflow.org/v1alpha1", "TrainJob") == []
        assert [o["metadata"]["name"] for o in client.experiment_objects("demo")] == ["a"]


def test_delete_with_foreground_propagation() -> None:
    with RunningServer() as server:
        client = server.client()
        client.apply({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "j"}, "spec": {}})
        assert client.delete("kubeflow.org/v1", "PyTorchJob", "j") is True
        assert server.state.requests[-1].body == {"apiVersion": "v1", "kind": "DeleteOptions",
                                                  "propagationPolicy": "Foreground"}
        assert client.delete("kubeflow.org/v1", "PyTorchJob", "j") is False


def test_pod_logs_are_split_into_lines() -> None:
    with RunningServer() as server:
        client = server.client()
        client.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}})
        server.state.logs["p"] = "step 1\nstep 2\nstep 3"
        assert list(client.pod_logs("p", container="pytorch")) == ["step 1", "step 2", "step 3"]
        assert list(client.pod_logs("p", tail_lines=1)) == ["step 3"]
        assert server.state.requests[-1].query == {"tailLines": "1"}


def test_api_errors_become_kube_errors() -> None:
    with RunningServer() as server:
        client = server.client()
        server.state.served.discard("pytorchjobs")
        with pytest.raises(KubeError, match=r"apply PyTorchJob/j in ml failed \(HTTP 404: the server could not find"):
            client.apply({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "j"}})
    with pytest.raises(KubeError, match="cannot reach the API server") as info:
        client.get("v1", "ConfigMap", "x")  # the server is gone
    assert info.value.status == 0 and not info.value.permanent


def test_from_kubeconfig_uses_the_current_context_namespace(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with RunningServer() as server:
        monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "config", namespace="team-a")))
        client = KubeClient.from_kubeconfig()
        assert client.namespace == "team-a"
        client.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
        assert server.state.requests[-1].path == "/api/v1/namespaces/team-a/configmaps/x"


def test_missing_kubeconfig_is_a_clear_error(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeError, match="no usable kubeconfig or in-cluster config"):
        KubeClient.from_kubeconfig()
