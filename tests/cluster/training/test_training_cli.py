"""``dino-ctl submit --wait``, ``cancel`` and ``resume`` through the real Kubeflow training-operator and kwok.

The operator turns each PyTorchJob into pods and headless services and keeps the job's conditions; the scheduler
binds the pods to fake GPU nodes; kwok runs them (see training_components.py). Nothing here writes a job's status:
every state dino-ctl reads comes from the component that produces it in a cluster.
"""

from __future__ import annotations

from typing import Any

from tests.cluster.conftest import wait_for
from tests.cluster.training.training_cluster import Training, cli_passes, exit_codes
from tests.cluster.training.training_components import GPU_RESOURCE

STAGES = ("pretrain", "highres", "distill")
ZERO = {"failure": 0, "preemption": 0, "eviction": 0}


def _env(pod: dict[str, Any]) -> dict[str, str]:
    (container,) = pod["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_submit_wait_runs_three_stages_through_the_operator_one_after_the_other(training: Training) -> None:
    nodes = training.pool.add(2)
    path = training.write(training.spec(auto_succeed=True))
    with training.recorder() as seen:
        result = training.cli("submit", str(path), "--wait", "--poll-seconds", "0.2", "--timeout", "120",
                              "-o", "json")
        assert result.exit_code == 0, result.output
        passes = cli_passes(result.stdout)
        assert passes[-1]["phase"] == "Succeeded"
        assert passes[-1]["actions"] == [{"kind": "complete", "stage": None, "reason": "",
                                          "message": "all 3 stages succeeded"}]
        wait_for(lambda: seen.job_condition_at("demo-distill", "Succeeded"), what="the watch to see the end")

    # Each stage's job was created only after its predecessor's job had succeeded (one watch: the server's order).
    for before, after in zip(STAGES, STAGES[1:], strict=False):
        succeeded = seen.job_condition_at(f"demo-{before}", "Succeeded")
        created = seen.job_created_at(f"demo-{after}")
        assert succeeded is not None and created is not None
        assert succeeded.seq < created.seq, f"{after} was created before {before} succeeded"
        assert "Failed" not in {c for e in seen.of("PyTorchJob", f"demo-{before}") for c in e.conditions}
    # The submissions are exactly one job and one ConfigMap per stage: nothing was created twice.
    added = seen.added()
    assert {k: v for k, v in added.items() if k.startswith(("PyTorchJob/", "ConfigMap/demo"))} == {
        **{f"PyTorchJob/demo-{s}": 1 for s in STAGES}, **{f"ConfigMap/demo-{s}-config": 1 for s in STAGES},
        "ConfigMap/demo-experiment": 1}

    for stage in STAGES:
        job = f"demo-{stage}"
        pods = [e for e in seen.of("Pod") if e.obj["metadata"]["labels"].get("training.kubeflow.org/job-name") == job]
        assert {e.name for e in pods} == {f"{job}-worker-0", f"{job}-worker-1"}
        for pod in (e.obj for e in pods if e.type == "ADDED"):
            # Made by the operator from the rendered template: owned by the job, the ExitCode policy turned into
            # the pod's Never, torchrun's rendezvous pointed at worker 0's service, bound to a node of the pool.
            (owner,) = pod["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["controller"]) == ("PyTorchJob", job, True)
            assert pod["spec"]["restartPolicy"] == "Never"
            env = _env(pod)
            names = [var["name"] for var in pod["spec"]["containers"][0]["env"]]
            assert len(names) == len(set(names)), names  # the operator's own PYTHONUNBUFFERED is not repeated
            assert env["PET_NNODES"] == "2:2" and env["PET_RDZV_ENDPOINT"] == f"{job}-worker-0:23456"
            assert env["PET_NPROC_PER_NODE"] == "8" and env["PET_RDZV_BACKEND"] == "c10d"
            assert env["DINO_CTL_STAGE"] == stage
            assert pod["spec"]["containers"][0]["resources"]["limits"][GPU_RESOURCE] == "8"
        bound = {e.obj["spec"].get("nodeName") for e in pods if e.obj["spec"].get("nodeName")}
        assert bound <= set(nodes) and bound
        assert any(e.obj["status"].get("phase") == "Running" for e in pods)
        # The rendezvous endpoint: the headless service of worker 0 (the elastic job's "master").
        (service,) = {e.obj["spec"]["clusterIP"] for e in seen.of("Service", f"{job}-worker-0") if e.type == "ADDED"}
        assert service == "None"

    report = training.status()
    assert report["phase"] == "Succeeded"
    for entry, stage in zip(report["stages"], STAGES, strict=True):
        assert entry["stage"] == stage and entry["phase"] == "Succeeded"
        assert (entry["job"], entry["kind"], entry["attempt"]) == (f"demo-{stage}", "PyTorchJob", 0)
        assert entry["restarts"] == ZERO and entry["exitCodes"] == [0] and entry["evictions"] == []
        assert entry["message"] == f"PyTorchJob {training.namespace}/demo-{stage} successfully completed."


def test_cancel_mid_stage_and_resume_continue_from_the_stopped_stage(training: Training) -> None:
    training.pool.add(2)
    path = training.write(training.spec())
    with training.recorder() as seen:
        assert training.cli("submit", str(path)).exit_code == 0
        training.succeed("pretrain", 2)
        result = training.cli("resume", "demo", "-o", "json")  # a pass: pretrain done, highres submitted
        assert result.exit_code == 0, result.output
        running = training.running_pods("highres", 2)
        first_highres = training.job("highres")["metadata"]["uid"]

        result = training.cli("cancel", "demo", "-o", "json")
        assert result.exit_code == 0, result.output
        cancelled = cli_passes(result.stdout)[-1]
        assert cancelled["phase"] == "Cancelled"
        assert [(a["kind"], a["stage"]) for a in cancelled["actions"]] == [("delete", "highres")]
        wait_for(lambda: training.job("highres") is None, what="the cancelled job to go (foreground deletion)")
        # Its pods were deleted gracefully, with the grace period the renderer set for the SIGTERM checkpoint, and
        # their trainers exited 143 (kwok plays the checkpoint) before the pods went.
        grace = running[0]["spec"]["terminationGracePeriodSeconds"]
        assert grace == 180
        for pod in running:
            name = pod["metadata"]["name"]
            deleting = seen.first("Pod", name, lambda e, uid=pod["metadata"]["uid"]: e.uid == uid and e.deleting)
            assert deleting is not None and deleting.obj["metadata"]["deletionGracePeriodSeconds"] == grace
            wait_for(lambda name=name, uid=pod["metadata"]["uid"]: seen.first(
                "Pod", name, lambda e: e.uid == uid and e.type == "DELETED"), what=f"{name} to be deleted")
            exited = seen.first("Pod", name, lambda e, uid=pod["metadata"]["uid"]: e.uid == uid and exit_codes(e.obj))
            assert exited is not None and exit_codes(exited.obj) == [143] and exited.deleting
        # The finished stage stays: its job is the record that pretrain is done.
        assert "Succeeded" in [c["type"] for c in training.job("pretrain")["status"]["conditions"]]
        report = training.status()
        assert report["phase"] == "Cancelled"
        assert [(s["stage"], s["phase"]) for s in report["stages"]] == [
            ("pretrain", "Succeeded"), ("highres", "Absent"), ("distill", "Absent")]

        process = training.cli_background("resume", "demo", "--wait", "--poll-seconds", "0.2", "--timeout", "90",
                                          "-o", "json")
        training.succeed("highres", 2)
        assert training.job("highres")["metadata"]["uid"] != first_highres
        training.succeed("distill", 2)
        code, output = training.finish(process)
        assert code == 0, output
        first_pass = cli_passes(output)[0]
        assert [(a["kind"], a["stage"]) for a in first_pass["actions"]] == [("submit", "highres")]
        assert cli_passes(output)[-1]["phase"] == "Succeeded"

    # Resumed at the stopped stage: pretrain's job and every ConfigMap were created once; highres twice (the
    # cancelled job and the resumed one); distill once.
    added = seen.added()
    assert {k: v for k, v in added.items() if k.startswith(("PyTorchJob/", "ConfigMap/demo"))} == {
        "PyTorchJob/demo-pretrain": 1, "PyTorchJob/demo-highres": 2, "PyTorchJob/demo-distill": 1,
        **{f"ConfigMap/demo-{s}-config": 1 for s in STAGES}, "ConfigMap/demo-experiment": 1}
    assert training.status()["phase"] == "Succeeded"
