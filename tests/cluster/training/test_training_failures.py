"""Preemption, kills, evictions and genuine failures, as the real training-operator handles them under the rendered
``restartPolicy: ExitCode``, and what dino-ctl makes of them.

What the operator does (v1.9.3, observed here): the pods get ``restartPolicy: Never``; a worker whose ``pytorch``
container exits with a code >= 128 (143: preempted after its SIGTERM checkpoint; 137: killed) is deleted and
recreated under the same name, the job gets a transient ``Restarting`` condition (and a ``PyTorchJobRestarting``
event) and never fails, so dino-ctl sees a running job: no resubmission, no budget spent. An evicted or deleted pod
is recreated the same way. A code from 1 to 127 fails the job; the operator then stops the other workers
(``cleanPodPolicy: Running``) and keeps the failed pod, whose exit code dino-ctl reads: one unit of the failure
budget, a resubmission as the next attempt; once the budget is spent the stage fails and its job stays.
"""

from __future__ import annotations

from typing import Any

from tests.cluster.conftest import wait_for
from tests.cluster.training.training_cluster import Training, cli_passes, exit_codes


def _replaced(training: Training, pod: dict[str, Any]) -> dict[str, Any]:
    """Wait for the operator to recreate ``pod`` (same name, new uid) and for the new one to run."""
    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]

    def running_again() -> dict[str, Any] | None:
        found = training.kube.get("v1", "Pod", name)
        ok = found and found["metadata"]["uid"] != uid and found["status"].get("phase") == "Running"
        return found if ok else None

    return wait_for(running_again, what=f"the operator to recreate {name} and kwok to run it")


def test_operator_restarts_preempted_killed_and_evicted_workers_in_place_and_a_failure_spends_the_budget(
        training: Training) -> None:
    training.pool.add(2)
    path = training.write(training.spec(failure_budget={"failure": 1}))
    with training.recorder() as seen:
        process = training.cli_background("submit", str(path), "--wait", "--poll-seconds", "0.2", "--timeout",
                                          "120", "-o", "json")
        worker0, worker1 = training.running_pods("pretrain", 2)
        job_uid = training.job("pretrain")["metadata"]["uid"]

        # Preempted (exit 143 after the SIGTERM checkpoint), then killed (137): restarted in place by the operator.
        training.exit(worker1["metadata"]["name"], 143)
        worker1 = _replaced(training, worker1)
        training.exit(worker0["metadata"]["name"], 137)
        worker0 = _replaced(training, worker0)
        # Evicted through the Eviction API (a drain): graceful deletion with a DisruptionTarget; recreated too.
        training.evict(worker1["metadata"]["name"])
        _replaced(training, worker1)
        events = training.events("demo-pretrain")
        assert ("Normal", "ExitedWithCode", f"Pod: {training.namespace}.demo-pretrain-worker-1 exited with code 143") \
            in events
        assert ("Normal", "ExitedWithCode", f"Pod: {training.namespace}.demo-pretrain-worker-0 exited with code 137") \
            in events
        assert any(reason == "PyTorchJobRestarting" for _type, reason, _message in events)
        evicted = seen.first("Pod", "demo-pretrain-worker-1", lambda e: e.deleting and any(
            c.get("type") == "DisruptionTarget" and c.get("reason") == "EvictionByEvictionAPI"
            for c in e.obj["status"].get("conditions") or []))
        assert evicted is not None  # the API server marks the pod, then deletes it gracefully
        # One job throughout, never failed; dino-ctl spent nothing and resubmitted nothing.
        assert {e.uid for e in seen.of("PyTorchJob", "demo-pretrain")} == {job_uid}
        assert not any("Failed" in e.conditions for e in seen.of("PyTorchJob", "demo-pretrain"))
        stage = training.status()["stages"][0]
        assert (stage["phase"], stage["attempt"]) == ("Running", 0)
        assert stage["restarts"] == {"failure": 0, "preemption": 0, "eviction": 0}

        training.succeed("pretrain", 2)

        # A genuine failure (exit 1): the operator fails the job and stops the other worker; dino-ctl counts one
        # failure and resubmits the stage as attempt 1.
        failing, other = training.running_pods("highres", 2)
        first = training.job("highres")
        training.exit(failing["metadata"]["name"], 1)
        second = wait_for(lambda: (job := training.job("highres")) and job["metadata"]["uid"] != first["metadata"][
            "uid"] and job, what="highres to be resubmitted")
        assert second["metadata"]["labels"]["dino-ctl.io/attempt"] == "1"
        assert seen.job_condition_at("demo-highres", "Failed").uid == first["metadata"]["uid"]
        # The operator's cleanPodPolicy stopped the other worker gracefully; its trainer exited 143. That exit is
        # not why the job failed: the failure is counted, not a preemption.
        stopped = seen.first("Pod", other["metadata"]["name"], lambda e: e.uid == other["metadata"]["uid"]
                             and exit_codes(e.obj) == [143])
        assert stopped is not None and stopped.deleting
        config = training.kube.get("v1", "ConfigMap", "demo-highres-config")
        assert config["metadata"]["annotations"]["dino-ctl.io/restarts"] == \
            '{"failure": 1, "preemption": 0, "eviction": 0}'

        # The second failure is over the budget of one: the stage fails and its job stays for inspection.
        failing, _ = training.running_pods("highres", 2)
        training.exit(failing["metadata"]["name"], 1)
        code, output = training.finish(process)
        assert code == 1, output
        last = cli_passes(output)[-1]
        assert last["phase"] == "Failed"
        assert [(a["kind"], a["stage"]) for a in last["actions"]] == [("fail-stage", "highres")]
        assert last["actions"][0]["message"] == ("failure (exit codes 1; evictions none): failure budget of 1 spent")

    kept = training.job("highres")
    assert kept["metadata"]["uid"] == second["metadata"]["uid"]
    assert "Failed" in [c["type"] for c in kept["status"]["conditions"] if c["status"] == "True"]
    failed_pod = training.kube.get("v1", "Pod", failing["metadata"]["name"])
    assert failed_pod["status"]["phase"] == "Failed" and exit_codes(failed_pod) == [1]
    assert training.job("distill") is None
    report = training.status()
    assert report["phase"] == "Failed"
    pretrain, highres, distill = report["stages"]
    assert pretrain["phase"] == "Succeeded" and pretrain["restarts"] == {"failure": 0, "preemption": 0, "eviction": 0}
    assert (highres["phase"], highres["attempt"], highres["exitCodes"]) == ("Failed", 1, [1])
    assert highres["restarts"] == {"failure": 1, "preemption": 0, "eviction": 0}
    assert highres["message"] == 'job "demo-highres" is failing because "Worker" replica(s) failed.'  # operator's
    assert distill["phase"] == "Absent"
