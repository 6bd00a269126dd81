"""Renderers: golden files (tests/golden/), strict schema validation of every object, and the rules they encode.

Regenerate the golden files after an intended change with ``DINO_CTL_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from dino_ctl.cli.output import yaml_stream
from dino_ctl.errors import SpecErrors
from dino_ctl.render import render, render_job
from dino_ctl.render.trainjob import render_cluster_training_runtime
from dino_ctl.spec import parse_spec
from dino_ctl.stages import resolve_experiment, stage_train_config
from dino_ctl.validation import load_spec, validate_experiment
from tests.dino_ctl.spec_helpers import GOLDEN, UPDATE_GOLDEN, document, example_specs, experiment, object_validator

ELASTIC = GOLDEN / "spec-elastic.yaml"
TRAINJOB = GOLDEN / "spec-trainjob.yaml"
CURATION = GOLDEN / "spec-curation.yaml"


def _trainjob_version(version: str) -> list[dict]:
    exp = load_spec(TRAINJOB)
    exp = exp.model_copy(update={"spec": exp.spec.model_copy(update={
        "train_job": exp.spec.train_job.model_copy(update={"trainer_version": version})})})
    return render(exp)


def _torchx_local() -> list[dict]:
    doc = yaml.safe_load(ELASTIC.read_text())
    doc["spec"].update(backend="torchx", torchx={"scheduler": "local_cwd"}, storage={"checkpoints": "file:///runs/g"})
    return render(experiment(doc), stage="pretrain")


CASES = {
    "pytorchjob.yaml": lambda: render(load_spec(ELASTIC)),
    "torchx-volcano.yaml": lambda: render(load_spec(ELASTIC), backend="torchx"),
    "torchx-local.yaml": _torchx_local,
    "trainjob-2.2.yaml": lambda: _trainjob_version("2.2"),
    "trainjob-2.1.yaml": lambda: _trainjob_version("2.1"),
    "trainjob-2.0.yaml": lambda: _trainjob_version("2.0"),
    "curation-pytorchjob.yaml": lambda: render(load_spec(CURATION)),
    "curation-trainjob.yaml": lambda: render(load_spec(CURATION), backend="trainjob"),
    "curation-torchx-volcano.yaml": lambda: render(load_spec(CURATION), backend="torchx"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    text = yaml_stream(CASES[name]())
    path = GOLDEN / name
    if UPDATE_GOLDEN:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with DINO_CTL_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from the golden file (DINO_CTL_UPDATE_GOLDEN=1 to accept)"


def test_rendering_is_deterministic() -> None:
    assert render(load_spec(ELASTIC), backend="torchx") == render(load_spec(ELASTIC), backend="torchx")


def _cluster_renders() -> list[tuple[str, list[dict]]]:
    # The stored TrainJob CRD is Trainer main (2.2+): the 2.0/2.1 override fields are checked by their golden files.
    skipped = {"torchx-local.yaml", "trainjob-2.0.yaml", "trainjob-2.1.yaml"}
    renders = [(name, CASES[name]()) for name in sorted(CASES) if name not in skipped]
    for path in example_specs():
        exp = load_spec(path)
        if exp.spec.backend == "local":
            continue
        for backend in ("pytorchjob", "trainjob", "torchx"):
            try:
                validate_experiment(exp, backend=backend)
            except SpecErrors:
                continue  # e.g. an elastic spec is not a valid TrainJob
            renders.append((f"{path.name}:{backend}", render(exp, backend=backend)))
    return renders


def test_every_rendered_object_validates_against_kubernetes_and_crd_schemas() -> None:
    validator = object_validator()
    count = 0
    for name, objects in _cluster_renders():
        try:
            count += validator.validate_all(objects)
        except Exception as exc:  # report which render failed
            raise AssertionError(f"{name}: {exc}") from exc
    assert count > 40


def _by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def test_pytorchjob_encodes_elasticity_gang_queue_and_exit_codes() -> None:
    exp = load_spec(ELASTIC)
    [job, _] = _by_kind(render(exp), "PyTorchJob")
    spec = job["spec"]
    assert spec["elasticPolicy"]["minReplicas"] == 1 and spec["elasticPolicy"]["maxReplicas"] == 2
    assert {c["key"]: c["value"] for c in spec["elasticPolicy"]["rdzvConf"]}["last_call_timeout"] == "30"
    assert spec["nprocPerNode"] == "8"
    assert spec["runPolicy"] == {"cleanPodPolicy": "Running", "schedulingPolicy": {"minAvailable": 1}, "suspend": True}
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert list(spec["pytorchReplicaSpecs"]) == ["Worker"] and worker["restartPolicy"] == "ExitCode"
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    assert container["command"] == ["python", "-m", "trainer.launch", "--config", "/etc/dino-ctl/config.yaml"]


def test_pod_template_placement_shm_metrics_and_grace() -> None:
    exp = load_spec(ELASTIC)
    job = render_job(exp, "pretrain")
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    container = pod["spec"]["containers"][0]
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["spec"]["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    grace = stage_train_config(exp, "pretrain").checkpoint.preemption_grace_seconds
    assert grace == 300 and pod["spec"]["terminationGracePeriodSeconds"] > grace
    labels = pod["metadata"]["labels"]
    assert {k: labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/managed-by", "dino-ctl.io/experiment",
                                   "dino-ctl.io/stage")} == {
        "app.kubernetes.io/name": "dino-ctl", "app.kubernetes.io/managed-by": "dino-ctl",
        "dino-ctl.io/experiment": "golden", "dino-ctl.io/stage": "pretrain"}
    assert labels["team"] == "vision"


def test_env_has_torchrun_settings_and_only_secret_references() -> None:
    job = render_job(load_spec(ELASTIC), "pretrain")
    env = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["env"]
    by_name = {var["name"]: var for var in env}
    assert by_name["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]["value"] == "1"
    assert by_name["AWS_ENDPOINT_URL"]["value"] == "https://minio.example.com"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY"):
        assert "value" not in by_name[name] and "secretKeyRef" in by_name[name]["valueFrom"]


def test_pvc_streams_are_mounted_where_the_config_points() -> None:
    exp = load_spec(ELASTIC)
    pod = render_job(exp, "pretrain")["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert {"name": "pvc-datasets", "persistentVolumeClaim": {"claimName": "datasets"}} in pod["volumes"]
    assert {"name": "pvc-datasets", "mountPath": "/mnt/dino-ctl/datasets"} in pod["containers"][0]["volumeMounts"]
    assert stage_train_config(exp, "pretrain").data.streams[0].remote == "/mnt/dino-ctl/datasets/in1k-mds"


def test_long_names_are_truncated_consistently() -> None:
    doc = document()
    doc["metadata"]["name"] = "an-experiment-with-a-rather-long-descriptive-name"
    doc["spec"]["stages"][0]["name"] = "pretraining-on-the-curated-set"
    doc["spec"]["stages"][1]["init"] = {"from": "pretraining-on-the-curated-set"}
    objects = render(experiment(doc))
    job = _by_kind(objects, "PyTorchJob")[0]
    assert job["metadata"]["name"] == "an-experiment-with-a-r-pretraining-on-the-cur-4bb667"
    assert job["spec"]["elasticPolicy"]["rdzvId"] == job["metadata"]["name"]
    config_map = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    assert config_map in [obj["metadata"]["name"] for obj in _by_kind(objects, "ConfigMap")]
    assert all(len(obj["metadata"]["name"]) <= 63 for obj in objects)


def test_no_queue_means_not_suspended() -> None:
    doc = document()
    job = render_job(experiment(doc), "pretrain")
    assert "suspend" not in job["spec"]["runPolicy"]
    assert not any(k.startswith("kueue") for k in job["metadata"]["labels"])


def test_trainjob_versions_use_their_override_field() -> None:
    fields = {}
    for version in ("2.0", "2.1", "2.2"):
        [job] = _by_kind(_trainjob_version(version), "TrainJob")
        fields[version] = [k for k in job["spec"] if k.endswith(("Overrides", "Patches"))]
        assert job["spec"]["trainer"]["numNodes"] == 2 and job["spec"]["suspend"] is True
    assert fields == {"2.0": ["podSpecOverrides"], "2.1": ["podTemplateOverrides"], "2.2": ["runtimePatches"]}


def test_training_runtime_retries_preemption_and_fails_on_errors() -> None:
    runtime = render_cluster_training_runtime(load_spec(TRAINJOB))
    job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    rules = job["template"]["spec"]["podFailurePolicy"]["rules"]
    assert [(r["action"], r.get("onExitCodes", {}).get("values")) for r in rules] == [
        ("Ignore", None), ("Ignore", [143]), ("FailJob", [0, 143])]
    container = job["template"]["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "node" and container["ports"][0]["name"] == "metrics"
    assert runtime["spec"]["podGroupPolicy"] == {"coscheduling": {"scheduleTimeoutSeconds": 600}}


def test_trainer_2_2_grace_period_lives_in_the_runtime() -> None:
    """Released Trainer v2.2.0's runtimePatches do not declare terminationGracePeriodSeconds (the real API server
    refuses the TrainJob with HTTP 500): the runtime carries the longest grace any stage needs."""
    exp = load_spec(TRAINJOB)
    [job] = _by_kind(_trainjob_version("2.2"), "TrainJob")
    [patch] = job["spec"]["runtimePatches"]
    pod_spec = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert "terminationGracePeriodSeconds" not in pod_spec["spec"]
    runtime = render_cluster_training_runtime(exp)
    node = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    needed = max(stage_train_config(exp, stage).checkpoint.preemption_grace_seconds
                 for stage in resolve_experiment(exp).order)
    assert node["terminationGracePeriodSeconds"] > needed


def test_volcano_job_is_named_and_gang_scheduled() -> None:
    [job, _] = _by_kind(render(load_spec(ELASTIC), backend="torchx"), "Job")
    assert job["metadata"]["name"] == "golden-pretrain" and job["spec"]["minAvailable"] == 1
    assert job["spec"]["queue"] == "research" and len(job["spec"]["tasks"]) == 2
    command = job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["command"][-1]
    assert "--nnodes 1:2 --nproc_per_node 8" in command
    assert "-m trainer.train --config /etc/dino-ctl/config.yaml" in command


def test_monitoring_objects_follow_the_spec() -> None:
    kinds = [obj["kind"] for obj in render(load_spec(ELASTIC))]
    assert kinds[-2:] == ["PodMonitor", "PrometheusRule"]
    monitor = _by_kind(render(load_spec(ELASTIC)), "PodMonitor")[0]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert "PodMonitor" not in [obj["kind"] for obj in render(load_spec(TRAINJOB))]


def test_render_one_stage() -> None:
    objects = render(load_spec(ELASTIC), stage="highres")
    assert [(o["kind"], o["metadata"]["name"]) for o in objects[:2]] == [
        ("ConfigMap", "golden-highres-config"), ("PyTorchJob", "golden-highres")]


def test_local_backend_renders_as_pytorchjob() -> None:
    doc = copy.deepcopy(document(backend="local"))
    assert render_job(parse_spec(doc), "pretrain")["kind"] == "PyTorchJob"


def test_golden_inputs_exist() -> None:
    assert ELASTIC.exists() and TRAINJOB.exists() and CURATION.exists() and Path(GOLDEN).is_dir()
