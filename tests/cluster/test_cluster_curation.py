"""A curation stage against the real API server: the CRD keeps its curation section, and client-side reconciliation
(``dino-ctl submit --wait``/``resume``) chains curate -> pretrain -> distill, resubmitting a failed curation job.

The tests play the training operator (job status through the status subresource) and the kubelet (a worker pod
with an exit code), as tests/cluster/test_cluster_reconcile.py does.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from dino_ctl import reconcile
from dino_ctl.kube import KubeClient
from dino_ctl.observe import RestartCounts
from dino_ctl.plan import ActionKind, ExperimentPhase
from dino_ctl.spec import DinoExperiment, parse_spec
from tests.cluster.conftest import wait_for
from tests.cluster.test_cluster_reconcile import JOB, _finish, _restarts
from tests.dino_ctl.spec_helpers import GOLDEN, experiment

DINO = ("dino-ctl.io/v1alpha1", "DinoExperiment")


@pytest.fixture
def client(kube: KubeClient, crds: dict) -> KubeClient:
    del crds
    return kube


def _document(namespace: str) -> dict[str, Any]:
    """spec-curation.yaml named ``demo`` (the helpers' job names) plus a distillation stage, in ``namespace``."""
    doc = yaml.safe_load((GOLDEN / "spec-curation.yaml").read_text())
    doc["metadata"].update(name="demo", namespace=namespace)
    doc["spec"].pop("queue")  # no Kueue here: jobs start unsuspended
    doc["spec"]["stages"].append({"name": "distill", "recipe": "distill_vits14", "teacher": {"from": "pretrain"},
                                  "data": {"from": "curate"}})
    return doc


def _experiment(namespace: str) -> DinoExperiment:
    return experiment(_document(namespace))


def test_the_crd_keeps_the_curation_section(client: KubeClient, namespace: str) -> None:
    doc = _document(namespace)
    client.apply(copy.deepcopy(_experiment(namespace).to_document()))
    stored = client.get(*DINO, "demo")
    assert stored is not None
    assert stored["spec"]["stages"][0]["curation"] == parse_spec(doc).spec.stages[0].curation
    assert stored["spec"]["stages"][1]["data"] == {"from": "curate"}
    assert parse_spec(stored) == parse_spec(doc)


def test_submit_wait_runs_curation_then_training(client: KubeClient, admin_api: Any, namespace: str) -> None:
    exp = _experiment(namespace)
    result = reconcile.submit(client, exp)
    assert [(a.kind, a.stage) for a in result.actions] == [(ActionKind.SUBMIT, "curate")]
    config_map = client.get("v1", "ConfigMap", "demo-curate-config")
    assert list(config_map["data"]) == ["curation.yaml"]
    command = client.get(*JOB, "demo-curate")["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"][
        "containers"][0]["command"]
    assert command[3:5] == ["-m", "curation.launch"]
    assert client.get(*JOB, "demo-pretrain") is None

    # The curation job fails (exit 1): counted against the failure budget, deleted, resubmitted as attempt 1.
    _finish(client, admin_api, "curate", "Failed", exit_code=1)
    result = reconcile.reconcile_once(client, exp)
    assert [(a.kind, a.stage, a.reason) for a in result.actions] == [(ActionKind.DELETE, "curate", "failure")]
    assert "resubmitting from its finished curation shards" in result.actions[0].message
    assert _restarts(client, "curate") == RestartCounts(failure=1)
    wait_for(lambda: client.get(*JOB, "demo-curate") is None, what="the failed curation job to be deleted")
    result = reconcile.reconcile_once(client, exp)
    assert [(a.kind, a.stage, a.attempt) for a in result.actions] == [(ActionKind.SUBMIT, "curate", 1)]

    def operator(seconds: float) -> None:  # between passes every running stage finishes
        del seconds
        for job in client.list(*JOB):
            if not job.get("status"):
                _finish(client, admin_api, job["metadata"]["labels"]["dino-ctl.io/stage"], "Succeeded")

    phases: list[Any] = []
    phase = reconcile.wait(client, exp, poll_seconds=5, sleep=operator, on_pass=lambda p: phases.append(p))
    assert phase == ExperimentPhase.SUCCEEDED
    submitted = [a.stage for p in phases for a in p.actions if a.kind == ActionKind.SUBMIT]
    assert submitted == ["pretrain", "distill"]
    config_yaml = client.get("v1", "ConfigMap", "demo-pretrain-config")["data"]["config.yaml"]
    assert "remote: /mnt/dino-ctl/runs/golden/curate/dataset" in config_yaml
