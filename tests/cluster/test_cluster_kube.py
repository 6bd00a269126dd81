"""kube.py against a real kube-apiserver: server-side apply, field ownership, dry run, list, delete, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dino_ctl import kube as kube_api
from dino_ctl.errors import KubeError
from dino_ctl.kube import KubeClient, Resource
from tests.cluster.conftest import wait_for
from tests.cluster.stack import KubeStack, free_port, kubeconfig


def _config_map(name: str, data: dict[str, str], **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": data}


def test_apply_creates_then_updates_and_an_identical_apply_changes_nothing(kube: KubeClient, namespace: str) -> None:
    live = kube.apply(_config_map("x", {"k": "v"}))
    assert live["metadata"]["namespace"] == namespace  # the client's default namespace was filled in
    assert live["metadata"]["managedFields"][0]["manager"] == "dino-ctl"
    again = kube.apply(_config_map("x", {"k": "v"}))
    assert again["metadata"]["resourceVersion"] == live["metadata"]["resourceVersion"]  # a no-op is not a write
    kube.apply(_config_map("x", {"k": "w"}))
    assert kube.get("v1", "ConfigMap", "x")["data"] == {"k": "w"}
    assert kube.get("v1", "ConfigMap", "absent") is None


def test_dry_run_is_validated_but_not_stored(kube: KubeClient) -> None:
    kube.apply(_config_map("x", {"k": "v"}))
    preview = kube.apply(_config_map("x", {"k": "w"}), dry_run=True)
    assert preview["data"] == {"k": "w"}
    assert kube.get("v1", "ConfigMap", "x")["data"] == {"k": "v"}
    with pytest.raises(KubeError, match=r"HTTP 422: .*metadata.name.*RFC 1123") as info:
        kube.apply(_config_map("Not_A_Name", {}), dry_run=True)
    assert info.value.permanent


def test_a_field_owned_by_another_manager_is_a_clear_conflict_not_an_overwrite(kube: KubeClient) -> None:
    kube.apply(_config_map("x", {"k": "v"}), field_manager="kubectl-edit")  # someone changed it by hand
    with pytest.raises(KubeError) as info:
        kube.apply(_config_map("x", {"k": "mine"}))
    error = info.value
    assert error.status == 409 and error.verb == "apply"
    assert '"kubectl-edit"' in str(error) and ".data.k" in str(error)  # the manager and the field
    assert "--force-conflicts" in str(error)  # what to do about it
    assert kube.get("v1", "ConfigMap", "x")["data"] == {"k": "v"}  # nothing was overwritten
    kube.apply(_config_map("x", {"k": "mine"}), force=True)  # taking ownership is explicit
    assert kube.get("v1", "ConfigMap", "x")["data"] == {"k": "mine"}


def test_list_by_label_selector_and_an_unserved_kind(kube: KubeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    kube.apply(_config_map("a", {}, **{"dino-ctl.io/experiment": "demo"}))
    kube.apply(_config_map("b", {}, **{"dino-ctl.io/experiment": "other"}))
    found = kube.list("v1", "ConfigMap", selector="dino-ctl.io/experiment=demo")
    assert [(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in found] == [("v1", "ConfigMap", "a")]
    assert [o["metadata"]["name"] for o in kube.experiment_objects("demo") if o["kind"] == "ConfigMap"] == ["a"]
    unserved = Resource("nothing.dino-ctl.io/v1", "Thing", "things")
    monkeypatch.setitem(kube_api.RESOURCES, (unserved.api_version, unserved.kind), unserved)
    assert kube.list(unserved.api_version, unserved.kind) == []  # a kind whose CRD is not installed
    unserved_message = r"apply Thing/t .*HTTP 404: .*is its CustomResourceDefinition installed"
    with pytest.raises(KubeError, match=unserved_message) as info:
        kube.apply({"apiVersion": unserved.api_version, "kind": "Thing", "metadata": {"name": "t"}})
    assert info.value.permanent


def test_foreground_delete_goes_through_garbage_collection(kube: KubeClient, namespace: str) -> None:
    owner = kube.apply(_config_map("owner", {}))
    kube.apply({**_config_map("child", {}), "metadata": {"name": "child", "ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"],
         "blockOwnerDeletion": True}]}})
    assert kube.delete("v1", "ConfigMap", "owner") is True  # Foreground: the owner waits for its dependents
    wait_for(lambda: kube.get("v1", "ConfigMap", "child") is None, what="the child to be garbage-collected")
    wait_for(lambda: kube.get("v1", "ConfigMap", "owner") is None, what="the owner to go after its child")
    assert kube.delete("v1", "ConfigMap", "owner") is False
    del namespace


def test_pod_logs_of_an_unscheduled_pod_are_empty_and_of_a_missing_pod_404(kube: KubeClient) -> None:
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "pytorch", "image": "registry.invalid/none:0"}],
                         "nodeSelector": {"no-such-node": "true"}}})
    assert list(kube.pod_logs("p", container="pytorch")) == []  # the real server answers 204: no log yet
    with pytest.raises(KubeError, match=r'logs Pod/absent in .* failed \(HTTP 404: pods "absent" not found\)'):
        list(kube.pod_logs("absent"))


def test_log_lines_are_split_across_chunks() -> None:
    chunks = [b"step 1\nst", b"ep 2\n", b"", b"step 3"]
    assert list(kube_api.split_lines(chunks)) == ["step 1", "step 2", "step 3"]
    assert list(kube_api.split_lines([b"caf\xc3", b"\xa9\n"])) == ["caf\u00e9"]


def test_an_unreachable_server_is_a_transient_error(kube_stack: KubeStack, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = kubeconfig(f"https://127.0.0.1:{free_port()}", kube_stack.ca_file, "t", namespace="x")
    (tmp_path / "config").write_text(json.dumps(config))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    client = KubeClient.from_kubeconfig()
    with pytest.raises(KubeError, match="cannot reach the API server") as info:
        client.get("v1", "ConfigMap", "x")
    assert info.value.status == 0 and not info.value.permanent


def test_an_unknown_token_is_refused_with_401(kube_stack: KubeStack, namespace: str,
                                                                kubeconfig_for: Any) -> None:
    from kubernetes import config

    stranger = KubeClient(config.new_client_from_config(config_file=str(kubeconfig_for(namespace, "bogus"))),
                          namespace=namespace)
    with pytest.raises(KubeError, match="HTTP 401"):
        stranger.get("v1", "ConfigMap", "x")
    del kube_stack


def test_from_kubeconfig_uses_the_current_context_namespace(kube_stack: KubeStack, namespace: str,
                                                            kubeconfig_for: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig_for(namespace)))
    client = KubeClient.from_kubeconfig()
    assert client.namespace == namespace
    assert client.apply(_config_map("x", {}))["metadata"]["namespace"] == namespace
    del kube_stack


def test_missing_kubeconfig_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeError, match="no usable kubeconfig or in-cluster config"):
        KubeClient.from_kubeconfig()


def test_an_undeclared_field_is_refused_and_server_warnings_are_kept(kube: KubeClient, crds: dict) -> None:
    """What the render dry-run test relies on: server-side apply refuses a field the schema does not declare (a
    misspelt field is never pruned silently) and duplicate list keys, and the server's warnings are recorded."""
    with pytest.raises(KubeError, match=r"spec.runPolicy.backofLimit: field not declared in schema") as info:
        kube.apply({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "j"},
                    "spec": {"pytorchReplicaSpecs": {}, "runPolicy": {"backofLimit": 3}}}, dry_run=True)
    assert info.value.permanent  # an HTTP 500 from the server, but retrying cannot fix the object
    assert kube.warnings == []
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:0",
                                    "env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}]}}
    with pytest.raises(KubeError, match=r'env: duplicate entries for key \[name="A"\]') as info:
        kube.apply(pod, dry_run=True)
    assert info.value.permanent
    pod["spec"]["containers"][0]["env"] = []
    pod["spec"]["nodeSelector"] = {"beta.kubernetes.io/arch": "amd64"}
    kube.apply(pod, dry_run=True)
    assert len(kube.warnings) == 1 and "beta.kubernetes.io/arch" in kube.warnings[0], kube.warnings
    del crds
