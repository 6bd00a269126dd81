"""The CLI's cluster commands against a real API server with the upstream CRDs installed.

No training operator runs here (see the kwok tests for that): the test plays it by writing the PyTorchJob's status
through its status subresource, as the operator does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from dino_ctl.kube import KubeClient
from dino_ctl.naming import ANNOTATION_CANCEL
from tests.cluster.conftest import wait_for
from tests.dino_ctl.spec_helpers import document

runner = CliRunner()
LABEL = "dino-ctl.io/experiment=demo"


@pytest.fixture
def spec_file(tmp_path: Path, namespace: str) -> Path:
    doc = document()
    doc["metadata"]["namespace"] = namespace
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def cli_env(namespace: str, kubeconfig_for: Any, monkeypatch: pytest.MonkeyPatch, crds: dict) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig_for(namespace)))
    del crds


def _invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def _versions(kube: KubeClient) -> dict[str, str]:
    """resourceVersion of every object labelled for the experiment."""
    return {f"{o['kind']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"]
            for o in kube.experiment_objects("demo")}


def _set_job_condition(admin_api: Any, namespace: str, condition: str) -> None:
    from kubernetes import client

    client.CustomObjectsApi(admin_api).patch_namespaced_custom_object_status(
        "kubeflow.org", "v1", namespace, "pytorchjobs", "demo-pretrain",
        {"status": {"conditions": [{"type": condition, "status": "True", "reason": "PyTorchJob" + condition,
                                    "message": f"the job is {condition.lower()}",
                                    "lastTransitionTime": "2026-12-05T00:00:00Z"}]}})


def test_submit_twice_changes_nothing_and_status_reads_the_cluster(
        cli_env: None, spec_file: Path, kube: KubeClient, admin_api: Any, namespace: str) -> None:
    result = _invoke("submit", str(spec_file), "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["actions"] == [
        {"kind": "submit", "stage": "pretrain", "reason": "start", "message": ""}]
    job = kube.get("kubeflow.org/v1", "PyTorchJob", "demo-pretrain")
    assert job is not None and job["metadata"]["labels"]["dino-ctl.io/attempt"] == "0"
    before = _versions(kube)
    assert set(before) >= {"ConfigMap/demo-experiment", "ConfigMap/demo-pretrain-config", "PyTorchJob/demo-pretrain"}

    result = _invoke("submit", str(spec_file), "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["actions"] == []
    assert _versions(kube) == before  # the same spec again writes nothing

    _set_job_condition(admin_api, namespace, "Running")
    before = _versions(kube)
    result = _invoke("status", "demo")
    assert result.exit_code == 0, result.output
    assert f"demo ({namespace}): Running" in result.stdout
    report = json.loads(_invoke("status", "demo", "-o", "json").stdout)
    assert [(s["stage"], s["phase"]) for s in report["stages"]] == [
        ("pretrain", "Running"), ("highres", "Absent"), ("distill", "Absent")]
    assert report["stages"][0]["message"] == "the job is running"  # the operator's condition message
    assert _versions(kube) == before  # status is read-only

    result = _invoke("status", "nope")
    assert result.exit_code == 1 and "no record ConfigMap and no DinoExperiment" in result.stderr


def test_a_field_changed_by_another_manager_is_reported_not_overwritten(
        cli_env: None, spec_file: Path, kube: KubeClient) -> None:
    assert _invoke("submit", str(spec_file)).exit_code == 0
    record = kube.get("v1", "ConfigMap", "demo-experiment")
    edited = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-experiment"},
              "data": {"spec.yaml": record["data"]["spec.yaml"] + "# edited by hand\n"}}
    kube.apply(edited, field_manager="kubectl-edit", force=True)  # as `kubectl apply --server-side --force-conflicts`

    result = _invoke("submit", str(spec_file))
    assert result.exit_code == 1
    message = " ".join(result.stderr.split())
    assert 'conflict with "kubectl-edit"' in message and ".data.spec.yaml" in message
    assert "--force-conflicts" in message
    assert kube.get("v1", "ConfigMap", "demo-experiment")["data"]["spec.yaml"].endswith("# edited by hand\n")

    result = _invoke("submit", str(spec_file), "--force-conflicts")
    assert result.exit_code == 0, result.output
    assert kube.get("v1", "ConfigMap", "demo-experiment")["data"] == record["data"]


def test_cancel_deletes_the_job_and_resume_starts_it_again(
        cli_env: None, spec_file: Path, kube: KubeClient, admin_api: Any, namespace: str) -> None:
    assert _invoke("submit", str(spec_file)).exit_code == 0
    first_uid = kube.get("kubeflow.org/v1", "PyTorchJob", "demo-pretrain")["metadata"]["uid"]
    _set_job_condition(admin_api, namespace, "Running")

    result = _invoke("cancel", "demo", "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["phase"] == "Cancelled"
    wait_for(lambda: kube.get("kubeflow.org/v1", "PyTorchJob", "demo-pretrain") is None,
             what="the cancelled job to be deleted (foreground, through the garbage collector)")
    record = kube.get("v1", "ConfigMap", "demo-experiment")
    assert record["metadata"]["annotations"][ANNOTATION_CANCEL] == "true"
    assert json.loads(_invoke("status", "demo", "-o", "json").stdout)["phase"] == "Cancelled"

    result = _invoke("resume", "demo", "-o", "json")
    assert result.exit_code == 0, result.output
    assert [a["kind"] for a in json.loads(result.stdout)["actions"]] == ["submit"]
    job = kube.get("kubeflow.org/v1", "PyTorchJob", "demo-pretrain")
    assert job is not None and job["metadata"]["uid"] != first_uid
    assert kube.get("v1", "ConfigMap", "demo-experiment")["metadata"]["annotations"][ANNOTATION_CANCEL] == "false"


def test_logs_without_pods_and_of_a_pod_not_scheduled_yet(cli_env: None, spec_file: Path, kube: KubeClient) -> None:
    assert _invoke("submit", str(spec_file)).exit_code == 0
    result = _invoke("logs", "demo")
    assert result.exit_code == 1 and "no pods of experiment demo" in result.stderr
    job = kube.get("kubeflow.org/v1", "PyTorchJob", "demo-pretrain")
    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    kube.apply({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "demo-pretrain-worker-0", "labels": template["metadata"]["labels"]},
                "spec": {"containers": [{"name": "pytorch", "image": "registry.invalid/none:0"}],
                         "nodeSelector": {"no-such-node": "true"}}})
    result = _invoke("logs", "demo")
    assert result.exit_code == 1
    assert "pod demo-pretrain-worker-0 is not scheduled to a node yet: it has no log yet" in result.stderr
