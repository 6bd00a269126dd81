"""``dino-ctl curate SPEC --render``: a ConfigMap and one elastic PyTorchJob that runs every step under torchrun.

Golden file, strict validation against the upstream PyTorchJob CRD, the shape a curation stage of a DinoExperiment
renders (same command, elastic policy and restart semantics), and the end of the old indexed Jobs whose later steps
were created suspended with nothing to release them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from curation.config import load_spec, spec_from_dict
from curation.kube import render_curation_jobs

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "curation_jobs.yaml"
IMAGE = "registry.example.com/dino-ctl:0.1.0"


def _rendered() -> list[dict]:
    return render_curation_jobs(load_spec(REPO / "examples" / "curation.yaml"), image=IMAGE)


def _container(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]


def test_matches_golden_file() -> None:
    text = yaml.safe_dump_all(_rendered(), sort_keys=False)
    if os.environ.get("UPDATE_GOLDEN") == "1" or os.environ.get("DINO_CTL_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "rendering changed: rerun with UPDATE_GOLDEN=1 and review the diff"


def test_objects_pass_strict_validation_against_the_upstream_crds() -> None:
    from tests.dino_ctl.spec_helpers import object_validator

    validator = object_validator()
    for obj in _rendered():
        validator.validate(obj)


def test_one_job_runs_every_step_and_nothing_waits_to_be_released() -> None:
    config_map, job = _rendered()
    assert config_map["kind"] == "ConfigMap" and job["kind"] == "PyTorchJob"
    spec = spec_from_dict(yaml.safe_load(config_map["data"]["spec.yaml"]))
    assert spec == load_spec(REPO / "examples" / "curation.yaml")
    command = _container(job)["command"]
    assert command == ["python", "-m", "torch.distributed.run", "-m", "curation.launch", "--spec",
                       "/etc/dino-curation/spec.yaml", "--metrics-port", "9400"]
    assert "--steps" not in command  # every step, each sharded over the ranks
    assert "suspend" not in job["spec"]["runPolicy"] and "annotations" not in job["metadata"]
    # jobs.parallelism pods of jobs.gpus_per_pod ranks; torchrun restarts the group jobs.backoff_limit_per_index times
    policy = job["spec"]["elasticPolicy"]
    assert (policy["minReplicas"], policy["maxReplicas"], policy["maxRestarts"]) == (16, 16, 3)
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 16 and job["spec"]["nprocPerNode"] == "1"
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 16}
    assert _container(job)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    volumes = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"]
    assert volumes[0] == {"name": "spec", "configMap": {"name": config_map["metadata"]["name"]}}
    assert volumes[2] == {"name": "data", "persistentVolumeClaim": {"claimName": "curation-data"}}


def test_same_job_shape_as_a_curation_stage_of_an_experiment() -> None:
    """What ``curate --render`` runs is what a ``curation`` stage renders (dino_ctl.render), up to names and mounts."""
    from dino_ctl.render import render_job
    from dino_ctl.spec import parse_spec
    from dino_ctl.validation import validate_experiment

    section = {"sources": [{"name": "web", "kind": "filelist", "path": "pvc://pools/files.txt"}]}
    document = {"apiVersion": "dino-ctl.io/v1alpha1", "kind": "DinoExperiment", "metadata": {"name": "x"},
                "spec": {"image": IMAGE, "storage": {"checkpoints": "pvc://runs/x"},
                         "resources": {"nodes": {"min": 2, "max": 2}, "gpusPerNode": 4},
                         "stages": [{"name": "curate", "curation": section}]}}
    experiment = parse_spec(document)
    validate_experiment(experiment)
    stage_job = render_job(experiment, "curate")
    standalone = render_curation_jobs(spec_from_dict({
        "name": "curate", "output": "/data/out", "sources": [{"name": "web", "kind": "filelist", "path": "/data/f"}],
        "jobs": {"parallelism": 2, "gpus_per_pod": 4}}), image=IMAGE)[1]
    for job in (stage_job, standalone):
        assert _container(job)["name"] == "pytorch"
        assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "ExitCode"
    assert _container(standalone)["command"][:-3] == _container(stage_job)["command"][:-3]  # up to the spec path
    assert _container(standalone)["command"][-2:] == _container(stage_job)["command"][-2:]  # --metrics-port 9400
    keys = ("rdzvBackend", "minReplicas", "maxReplicas", "maxRestarts", "rdzvConf")
    assert {k: standalone["spec"]["elasticPolicy"][k] for k in keys} == {
        k: stage_job["spec"]["elasticPolicy"][k] for k in keys}
    assert standalone["spec"]["nprocPerNode"] == stage_job["spec"]["nprocPerNode"] == "4"


def test_long_and_odd_names_stay_valid_dns_labels() -> None:
    spec = spec_from_dict(
        {"name": "a" * 60, "output": "/o", "sources": [{"name": "p", "kind": "folder", "path": "/p"}]}
    )
    names = [obj["metadata"]["name"] for obj in render_curation_jobs(spec, image=IMAGE)]
    assert all(len(n) <= 63 for n in names) and len(set(names)) == 2
    assert names[1].endswith("-curation")
    spec = spec_from_dict({"name": "2024_web.v1", "output": "/o",
                           "sources": [{"name": "p", "kind": "folder", "path": "/p"}]})
    assert render_curation_jobs(spec, image=IMAGE)[1]["metadata"]["name"] == "c-2024-web-v1-curation"


def test_image_is_required() -> None:
    spec = spec_from_dict({"name": "x", "output": "/o", "sources": [{"name": "p", "kind": "folder", "path": "/p"}]})
    with pytest.raises(ValueError, match="image must name the container image"):
        render_curation_jobs(spec, image="")


def test_curate_render_prints_the_objects() -> None:
    from dino_ctl.cli.main import app

    result = CliRunner().invoke(app, ["curate", str(REPO / "examples" / "curation.yaml"), "--render",
                                      "--image", IMAGE])
    assert result.exit_code == 0, result.output
    assert [doc["kind"] for doc in yaml.safe_load_all(result.stdout)] == ["ConfigMap", "PyTorchJob"]
