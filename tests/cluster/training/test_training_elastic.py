"""Node loss under an elastic stage (nodes.min < nodes.max), through the real training-operator, scheduler, pod
garbage collector and kwok.

A GPU node is deleted while a job runs on it (a spot reclaim, a scale-down). Nothing plays the kubelet of a deleted
node: the controller manager's pod garbage collector finds the orphaned pod after its 40-second quarantine, marks it
Failed with a ``DisruptionTarget`` condition (``DeletionByPodGC``) and deletes it; the training-operator recreates
the worker, which waits for a node while the job keeps running on the other one (1 of 1..2 nodes, within the
range torchrun accepts); a replacement node arrives and the worker joins again. The experiment completes without a
resubmission.
"""

from __future__ import annotations

from tests.cluster.conftest import wait_for
from tests.cluster.training.training_cluster import Training


def test_a_lost_node_under_an_elastic_stage(training: Training) -> None:
    training.pool.add(2)
    path = training.write(training.spec(nodes=(1, 2)))
    with training.recorder() as seen:
        process = training.cli_background("submit", str(path), "--wait", "--poll-seconds", "0.5", "--timeout", "180",
                                          "-o", "json")
        worker0, worker1 = training.running_pods("pretrain", 2)
        job_uid = training.job("pretrain")["metadata"]["uid"]
        assert {e["name"]: e.get("value") for e in worker1["spec"]["containers"][0]["env"]}["PET_NNODES"] == "1:2"
        lost = worker1["spec"]["nodeName"]
        training.pool.delete(lost)

        # The pod garbage collector (quarantine 40 s, period 20 s) fails the orphaned pod, then deletes it.
        gone = wait_for(lambda: seen.first("Pod", worker1["metadata"]["name"], lambda e: e.uid == worker1["metadata"][
            "uid"] and e.type == "DELETED"), what="the pod garbage collector to delete the lost node's pod",
            timeout=100, interval=0.5)
        marked = seen.first("Pod", worker1["metadata"]["name"], lambda e: e.uid == worker1["metadata"]["uid"] and any(
            c.get("type") == "DisruptionTarget" and c.get("reason") == "DeletionByPodGC"
            for c in e.obj["status"].get("conditions") or []))
        assert marked is not None and marked.obj["status"]["phase"] == "Failed" and marked.seq < gone.seq

        # The operator recreates the worker; with no free node it waits, and the job runs on with one node.
        def pending_again() -> dict | None:
            pod = training.kube.get("v1", "Pod", worker1["metadata"]["name"])
            return pod if pod and pod["metadata"]["uid"] != worker1["metadata"]["uid"] else None

        replacement = wait_for(pending_again, what="the operator to recreate the lost worker")
        wait_for(lambda: any(c.get("type") == "PodScheduled" and c.get("status") == "False"
                             for c in (training.kube.get("v1", "Pod", worker1["metadata"]["name"]) or {}).get(
                                 "status", {}).get("conditions") or []), what="the new worker to be unschedulable")
        job = training.job("pretrain")
        assert job["metadata"]["uid"] == job_uid
        assert "Running" in [c["type"] for c in job["status"]["conditions"] if c["status"] == "True"]
        still = training.kube.get("v1", "Pod", worker0["metadata"]["name"])
        assert still["metadata"]["uid"] == worker0["metadata"]["uid"] and still["status"]["phase"] == "Running"
        stage = training.status()["stages"][0]
        assert (stage["phase"], stage["attempt"]) == ("Running", 0)

        # A replacement node joins: the worker is scheduled there and runs; the stages complete.
        (new_node,) = training.pool.add(1)
        running = training.running_pods("pretrain", 2)
        assert {p["metadata"]["uid"] for p in running} == {worker0["metadata"]["uid"], replacement["metadata"]["uid"]}
        assert {p["spec"]["nodeName"] for p in running} == {worker0["spec"]["nodeName"], new_node}
        for stage_name in ("pretrain", "highres", "distill"):
            training.succeed(stage_name, 2)
        code, output = training.finish(process)
        assert code == 0, output

    assert {e.uid for e in seen.of("PyTorchJob", "demo-pretrain")} == {job_uid}  # never resubmitted
    assert not any("Failed" in e.conditions for e in seen.of("PyTorchJob"))
    report = training.status()
    assert report["phase"] == "Succeeded"
    assert all(s["restarts"] == {"failure": 0, "preemption": 0, "eviction": 0} and s["attempt"] == 0
               for s in report["stages"])
