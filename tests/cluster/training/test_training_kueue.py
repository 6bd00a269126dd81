"""Kueue admits dino-ctl's suspended PyTorchJobs as gangs within a GPU quota; an experiment over quota waits, queued.

A ClusterQueue with 16 GPUs (two 8-GPU nodes' worth) on a pool of four fake nodes: the quota, not the nodes, is
what is scarce. Two experiments whose first stage needs 2 x 8 GPUs each are submitted to its LocalQueue (dino-ctl
creates queued jobs suspended and labelled ``kueue.x-k8s.io/queue-name``): Kueue admits the first as one workload
(both workers at once) and unsuspends it; the second stays suspended, and ``dino-ctl status`` says it is queued;
when the first stage finishes, the quota frees and Kueue admits the second.
"""

from __future__ import annotations

import json
from typing import Any

from tests.cluster.conftest import wait_for
from tests.cluster.training.training_cluster import JOB, Training
from tests.cluster.training.training_components import LABEL_POOL, Kueue

KUEUE = "kueue.x-k8s.io/v1beta2"


def _apply(training: Training, obj: dict[str, Any]) -> None:
    from kubernetes.dynamic import DynamicClient

    api = DynamicClient(training.admin_api).resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    api.server_side_apply(body=obj, name=obj["metadata"]["name"], namespace=obj["metadata"].get("namespace"),
                          field_manager="dino-ctl-tests")


def _workload(training: Training, job: str) -> dict[str, Any] | None:
    from kubernetes import client

    items = client.CustomObjectsApi(training.admin_api).list_namespaced_custom_object(
        "kueue.x-k8s.io", "v1beta2", training.namespace, "workloads")["items"]
    return next((w for w in items if any(o["name"] == job for o in w["metadata"].get("ownerReferences") or [])), None)


def _suspended(training: Training, job: str) -> bool | None:
    found = training.kube.get(*JOB, job)
    return None if found is None else bool(found["spec"]["runPolicy"].get("suspend"))


def _running_pods(training: Training, job: str) -> list[dict[str, Any]]:
    return [p for p in training.kube.list("v1", "Pod", selector=f"training.kubeflow.org/job-name={job}")
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]


def test_kueue_admits_gangs_within_the_gpu_quota_and_the_experiment_over_it_is_queued(
        training: Training, kueue: Kueue) -> None:
    del kueue
    training.pool.add(4)
    names = {"flavor": f"{training.pool.name}-h100"[:63], "cq": f"{training.namespace}-gpu"[:63]}
    _apply(training, {"apiVersion": KUEUE, "kind": "ResourceFlavor", "metadata": {"name": names["flavor"]},
                      "spec": {"nodeLabels": {LABEL_POOL: training.pool.name}}})
    quota = [{"name": "cpu", "nominalQuota": "32"}, {"name": "memory", "nominalQuota": "128Gi"},
             {"name": "nvidia.com/gpu", "nominalQuota": "16"}]
    _apply(training, {"apiVersion": KUEUE, "kind": "ClusterQueue", "metadata": {"name": names["cq"]}, "spec": {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": training.namespace}},
        "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                            "flavors": [{"name": names["flavor"], "resources": quota}]}]}})
    _apply(training, {"apiVersion": KUEUE, "kind": "LocalQueue",
                      "metadata": {"name": "h100-queue", "namespace": training.namespace},
                      "spec": {"clusterQueue": names["cq"]}})
    try:
        for name in ("first", "second"):
            doc = training.spec()
            doc["metadata"]["name"] = name
            doc["spec"]["queue"] = {"name": "h100-queue"}
            result = training.cli("submit", str(training.write(doc)))
            assert result.exit_code == 0, result.output
            job = training.kube.get(*JOB, f"{name}-pretrain")
            assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "h100-queue"
            if name == "first":  # admitted: unsuspended, both workers run (one workload of 2 pods: a gang)
                wait_for(lambda: _suspended(training, "first-pretrain") is False, what="Kueue to admit first")
                wait_for(lambda: len(_running_pods(training, "first-pretrain")) == 2, what="first's two workers")

        workload = _workload(training, "first-pretrain")
        (pod_set,) = workload["spec"]["podSets"]
        (assignment,) = workload["status"]["admission"]["podSetAssignments"]
        assert (pod_set["count"], assignment["count"]) == (2, 2)
        assert assignment["resourceUsage"]["nvidia.com/gpu"] == "16"

        # The second is over the quota: suspended, its workload pending, no pod, and status says queued.
        wait_for(lambda: (w := _workload(training, "second-pretrain")) and any(
            c["type"] == "QuotaReserved" and c["status"] == "False" for c in w.get("status", {}).get("conditions", [])),
            what="Kueue to keep the second workload pending for quota")
        assert _suspended(training, "second-pretrain") is True
        assert training.kube.list("v1", "Pod", selector="training.kubeflow.org/job-name=second-pretrain") == []
        result = training.cli("status", "second", "-o", "json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["phase"] != "Failed"
        stage = report["stages"][0]
        assert (stage["stage"], stage["phase"], stage["restarts"]) == (
            "pretrain", "Pending", {"failure": 0, "preemption": 0, "eviction": 0})
        assert stage["message"] == "queued in Kueue LocalQueue h100-queue: suspended until Kueue admits it (quota)"

        # The first stage finishes: its quota frees and the second is admitted, both workers together.
        for pod in _running_pods(training, "first-pretrain"):
            training.exit(pod["metadata"]["name"], 0)
        wait_for(lambda: _suspended(training, "second-pretrain") is False, what="Kueue to admit the second",
                 timeout=60)
        wait_for(lambda: len(_running_pods(training, "second-pretrain")) == 2, what="the second's two workers")
        stage = json.loads(training.cli("status", "second", "-o", "json").stdout)["stages"][0]
        assert stage["phase"] == "Running" and "queued" not in stage["message"]
    finally:
        from kubernetes import client

        custom = client.CustomObjectsApi(training.admin_api)
        custom.delete_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", training.namespace, "localqueues",
                                               "h100-queue")
        custom.delete_cluster_custom_object("kueue.x-k8s.io", "v1beta2", "clusterqueues", names["cq"])
        custom.delete_cluster_custom_object("kueue.x-k8s.io", "v1beta2", "resourceflavors", names["flavor"])
