"""The in-cluster controller drives a three-stage experiment through the real training-operator and kwok.

The controller runs as helper-3's tests run it (``tests/cluster/controller_process.py``): ``python -m
dino_ctl.controller`` as a subprocess with the chart's ServiceAccount token and Role, its endpoints on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import wait_for
from tests.cluster.controller_process import ControllerProcess, install_chart_identity
from tests.cluster.training.training_cluster import Training

DINO = ("dino-ctl.io/v1alpha1", "DinoExperiment")
STAGES = ("pretrain", "highres", "distill")


@pytest.fixture
def controller(training: Training, dynamic: Any, admin_api: Any, kubeconfig_for: Any,
               tmp_path: Path) -> Iterator[ControllerProcess]:
    identity = install_chart_identity(dynamic, admin_api, training.namespace, kubeconfig_for)
    process = ControllerProcess(identity.kubeconfig, identity.namespace, tmp_path / "controller")
    process.log_dir.mkdir()
    try:
        yield process.start()
    finally:
        process.stop()
        print(f"--- controller logs\n{process.tail(80)}")


def test_the_controller_runs_three_stages_through_the_operator(training: Training,
                                                               controller: ControllerProcess) -> None:
    training.pool.add(2)
    with training.recorder() as seen:
        uid = training.kube.apply(training.spec(auto_succeed=True))["metadata"]["uid"]
        wait_for(lambda: ((training.kube.get(*DINO, "demo") or {}).get("status") or {}).get("phase") == "Succeeded",
                 what="the controller to report the experiment Succeeded", timeout=90)
        wait_for(lambda: seen.job_condition_at("demo-distill", "Succeeded"), what="the watch to see the end")

    for before, after in zip(STAGES, STAGES[1:], strict=False):
        succeeded, created = seen.job_condition_at(f"demo-{before}", "Succeeded"), seen.job_created_at(f"demo-{after}")
        assert succeeded is not None and created is not None and succeeded.seq < created.seq
    added = seen.added()
    assert {k: v for k, v in added.items() if k.startswith("PyTorchJob/")} == {
        f"PyTorchJob/demo-{s}": 1 for s in STAGES}
    for stage in STAGES:  # owned by the experiment; the operator's pods owned by the job
        job = training.job(stage)
        assert [(o["kind"], o["uid"]) for o in job["metadata"]["ownerReferences"]] == [("DinoExperiment", uid)]
        pods = [e.obj for e in seen.of("Pod") if e.type == "ADDED"
                and e.obj["metadata"]["labels"].get("dino-ctl.io/stage") == stage]
        assert pods and all(p["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"] for p in pods)

    status = training.kube.get(*DINO, "demo")["status"]
    assert status["message"] == "all 3 stages succeeded"
    for entry, stage in zip(status["stages"], STAGES, strict=True):
        assert (entry["name"], entry["phase"], entry["attempt"]) == (stage, "Succeeded", 0)
        assert entry["job"] == {"kind": "PyTorchJob", "name": f"demo-{stage}"}
        assert entry["restarts"] == {"failure": 0, "preemption": 0, "eviction": 0}
        assert entry["exitCodes"] == [0]
        assert {"type": "Succeeded", "status": "True"}.items() <= next(
            c for c in entry["conditions"] if c["type"] == "Succeeded").items()
    # Events are posted after the status is written: wait for the last one.
    wait_for(lambda: "ExperimentSucceeded" in [r for _t, r, _m in training.events("demo")],
             what="the ExperimentSucceeded event")
    reasons = [reason for _type, reason, _message in training.events("demo")]
    assert reasons.count("StageSubmitted") == 3 and reasons.count("StageSucceeded") == 3
    logs = controller.logs()
    assert "HTTP 403" not in logs and "Forbidden" not in logs
