"""Curation stages: the spec shape, its rules (exact messages), resolution, and a golden walk of the planner.

The planner golden (tests/golden/curation-plan.yaml) walks spec-curation.yaml (curate -> pretrain) through the
cluster states a run passes: nothing yet, curation running, failed (exit 1), succeeded, pretraining running, all
done. Each state records the experiment phase, the actions, what a submission applies (kind, name, command) and the
controller's per-stage status. Regenerate with ``DINO_CTL_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from dino_ctl.cli.output import yaml_stream
from dino_ctl.controller.status import experiment_status
from dino_ctl.errors import SpecErrors
from dino_ctl.observe import observe
from dino_ctl.plan import experiment_phase, plan
from dino_ctl.render import render, render_job, render_stage
from dino_ctl.render.common import pod_labels
from dino_ctl.spec import parse_spec
from dino_ctl.stages import resolve_experiment
from dino_ctl.validation import load_spec, validate_experiment
from tests.dino_ctl.spec_helpers import EXAMPLES, GOLDEN, UPDATE_GOLDEN

CURATION = GOLDEN / "spec-curation.yaml"


def _doc() -> dict[str, Any]:
    return yaml.safe_load(CURATION.read_text())


def _messages(doc: dict[str, Any], backend: str | None = None) -> list[str]:
    with pytest.raises(SpecErrors) as caught:
        validate_experiment(parse_spec(doc), backend=backend)
    return [str(error) for error in caught.value.errors]


def _curation(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["stages"][0]["curation"]


# --- resolution ---------------------------------------------------------------------------------------------------


def test_curation_stage_resolves_to_the_spec_its_pods_read() -> None:
    resolved = resolve_experiment(load_spec(CURATION))
    assert resolved.order == ["curate", "pretrain"]
    assert [stage.name for stage in resolved] == ["pretrain"]  # rules about trainer configs walk training stages
    curation = resolved.curation("curate")
    spec = curation.spec
    assert (spec.name, spec.seed, spec.output) == ("curate", 0, "/mnt/dino-ctl/runs/golden/curate")
    assert [s.path for s in spec.sources] == ["/mnt/dino-ctl/pools/web/files.txt", "/mnt/dino-ctl/pools/imagenet/train"]
    assert spec.embed.checkpoint == "/mnt/dino-ctl/pools/weights/dinov2_vitl14.pth"
    assert (curation.nodes.min, curation.nodes.max, curation.world_sizes) == (4, 4, [32])
    assert curation.dataset == {"remote": "/mnt/dino-ctl/runs/golden/curate/dataset"}
    assert "jobs" not in yaml.safe_load(curation.spec_text())


def test_a_training_stage_takes_the_curated_dataset_as_its_only_stream() -> None:
    config = resolve_experiment(load_spec(CURATION)).config("pretrain")
    assert config.data.dataset == "mds"
    assert [(s.remote, s.local) for s in config.data.streams] == [("/mnt/dino-ctl/runs/golden/curate/dataset", None)]
    assert config.data.num_canonical_nodes == 2


def test_published_dataset_is_read_from_the_object_store() -> None:
    resolved = resolve_experiment(load_spec(EXAMPLES / "curate-pretrain-distill.yaml"))
    stream = {"remote": "s3://ml-datasets/curated/lvd-curated-mds"}
    assert resolved.curation("curate").dataset == stream
    for stage in ("pretrain", "distill-vits14"):
        assert [(s.remote, s.local) for s in resolved.config(stage).data.streams] == [(stream["remote"], None)]
    assert resolved.curation("curate").spec.output == "/mnt/dino-ctl/curation-scratch/lvd-curated"


def test_local_output_is_read_in_place_and_seed_follows_the_stage() -> None:
    doc = _doc()
    doc["spec"]["storage"] = {"checkpoints": "file:///runs/golden"}
    doc["spec"]["stages"][0]["seed"] = 7
    resolved = validate_experiment(parse_spec(doc), backend="local")
    assert resolved.curation("curate").dataset == {"local": "/runs/golden/curate/dataset"}
    assert resolved.curation("curate").spec.seed == 7


def test_every_stage_mounts_the_curation_claims() -> None:
    objects = render(load_spec(CURATION))
    for job in [o for o in objects if o["kind"] == "PyTorchJob"]:
        pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v] == [
            "runs", "pools"]


def test_curation_job_runs_curation_launch_under_torchrun() -> None:
    exp = load_spec(CURATION)
    config_map, job = render_stage(exp, "curate")
    assert list(config_map["data"]) == ["curation.yaml"]
    assert yaml.safe_load(config_map["data"]["curation.yaml"])["output"] == "/mnt/dino-ctl/runs/golden/curate"
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    assert container["command"] == ["python", "-m", "torch.distributed.run", "-m", "curation.launch", "--spec",
                                    "/etc/dino-ctl/curation.yaml", "--metrics-port", "9400"]
    assert job["spec"]["elasticPolicy"]["minReplicas"] == job["spec"]["elasticPolicy"]["maxReplicas"] == 4
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "curation"
    trainjob = render_job(exp, "curate", backend="trainjob")
    assert trainjob["spec"]["trainer"]["command"] == container["command"]
    assert trainjob["spec"]["trainer"]["numNodes"] == 4


# --- rules ----------------------------------------------------------------------------------------------------------


def test_curation_fields_are_checked_by_curation_and_named_in_the_spec() -> None:
    doc = _doc()
    _curation(doc)["dedup"] = {"threshold": 1.5}
    assert _messages(doc) == [
        "spec.stages[0].curation.dedup.threshold: invalid value 1.5; allowed: input should be less than or equal to 1"]
    doc = _doc()
    _curation(doc)["embed"]["modle"] = "vit_large"
    assert _messages(doc) == ["spec.stages[0].curation.embed.modle: invalid value 'vit_large'; allowed: a known "
                              "key: model, checkpoint, image_size, thumbnail_size, batch_size, num_workers, device, "
                              "dtype, num_shards"]


def test_curation_semantic_rules_are_named_in_the_spec() -> None:
    doc = _doc()
    _curation(doc)["balance"] = {"enabled": True}
    assert _messages(doc) == ["spec.stages[0].curation.balance.target_size: invalid value None; allowed: a positive "
                              "integer when balance.enabled is true"]


def test_a_stage_trains_or_curates() -> None:
    doc = _doc()
    del doc["spec"]["stages"][1]["recipe"]
    assert _messages(doc) == ["spec.stages[1].recipe: invalid value None; allowed: a recipe (a training stage) or a "
                              "curation section (a curation stage)"]
    doc = _doc()
    doc["spec"]["stages"][0]["recipe"] = "tiny"
    assert _messages(doc) == ["spec.stages[0].curation: invalid value '<curation section>'; allowed: no curation "
                              "section beside recipe: a stage either trains (recipe) or curates (curation)"]


def test_a_curation_stage_has_no_trainer_fields() -> None:
    doc = _doc()
    doc["spec"]["stages"][0].update(overrides={"optim.iterations": 10}, init={"from": "pretrain"})
    messages = _messages(doc)
    assert "spec.stages[0].overrides: invalid value {'optim.iterations': 10}; allowed: nothing on a curation stage: " \
           "it runs curation.launch, not the trainer (set its steps in curation)" in messages
    assert "spec.stages[0].init: invalid value {'from': 'pretrain'}; allowed: nothing on a curation stage: it runs " \
           "curation.launch, not the trainer (set its steps in curation)" in messages


def test_jobs_is_not_part_of_an_experiment_stage() -> None:
    doc = _doc()
    _curation(doc)["jobs"] = {"pvc": "data"}
    assert _messages(doc) == ["spec.stages[0].curation.jobs: invalid value {'pvc': 'data'}; allowed: no jobs section "
                              "in an experiment: a curation stage runs on spec.resources and the stage's nodes (jobs "
                              "is for dino-ctl curate --render)"]


def test_data_from_names_a_curation_stage_that_writes() -> None:
    doc = _doc()
    doc["spec"]["stages"][1]["data"] = {"from": "nowhere"}
    assert _messages(doc) == ["spec.stages[1].data.from: invalid value 'nowhere'; allowed: the name of another "
                              "stage: curate"]
    doc = _doc()
    doc["spec"]["stages"].append({"name": "again", "recipe": "vits14", "data": {"from": "pretrain"}})
    assert _messages(doc) == ["spec.stages[2].data.from: invalid value 'pretrain'; allowed: a curation stage: curate"]
    doc = _doc()
    _curation(doc)["write"] = {"enabled": False}
    assert _messages(doc) == ["spec.stages[1].data.from: invalid value 'curate'; allowed: a curation stage whose "
                              "write step is enabled (its write.enabled is false: it writes no dataset)"]


def test_output_must_be_a_shared_filesystem() -> None:
    doc = _doc()
    doc["spec"]["storage"] = {"checkpoints": "s3://bucket/runs"}
    assert _messages(doc) == [
        "spec.stages[0].curation.output: invalid value None; allowed: pvc://claim/path (file:// for dino-ctl run): "
        "spec.storage.checkpoints is s3://bucket/runs, and curation works on a shared filesystem (write.remote "
        "publishes the dataset to an object store)"]
    _curation(doc)["output"] = "/data/curation"
    assert _messages(doc) == [
        "spec.stages[0].curation.output: invalid value '/data/curation'; allowed: pvc://claim/path, or "
        "file:///absolute/path for dino-ctl run (curation works on a shared filesystem; write.remote publishes the "
        "dataset to an object store)"]
    _curation(doc)["output"] = "file:///data/curation"
    assert _messages(doc) == [
        "spec.stages[0].curation.output: invalid value 'file:///data/curation'; allowed: pvc://claim/path for "
        "backend pytorchjob: file:// is pod-local disk, which the next stage's pods cannot read"]


def test_trainjob_needs_fixed_nodes_for_a_curation_stage_too() -> None:
    doc = _doc()
    doc["spec"]["stages"][0]["nodes"] = {"min": 2, "max": 4}
    assert _messages(doc, backend="trainjob") == [
        "spec.stages[0].nodes: invalid value {'min': 2, 'max': 4}; allowed: min == max for backend trainjob "
        "(Kubeflow Trainer v2 has no elastic resizing; use pytorchjob or torchx)"]


def test_torchx_runs_curation_launch_with_torchrun() -> None:
    exp = load_spec(CURATION)
    job = render_job(exp, "curate", backend="torchx")
    container = job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]
    script = container["command"][-1]  # bash -c "torchrun ... -m MODULE ARGS"
    assert script.startswith("torchrun ") and "--nnodes 4:4 --nproc_per_node 8" in script
    assert script.endswith("-m curation.launch --spec /etc/dino-ctl/curation.yaml --metrics-port 9400")
    assert job["spec"]["minAvailable"] == 4
    doc = _doc()
    doc["spec"].update(backend="torchx", torchx={"scheduler": "local_cwd"}, storage={"checkpoints": "file:///runs/g"})
    local = render_job(validate_experiment(parse_spec(doc)).experiment, "curate")
    assert local["configPath"] == "/runs/g/curate/curation.yaml"  # where dino-ctl run writes it
    assert local["replicas"][0]["args"][-1].endswith("-m curation.launch --spec /runs/g/curate/curation.yaml "
                                                     "--metrics-port 9400")


# --- planner, status ------------------------------------------------------------------------------------------------


def _job(exp: Any, stage: str, condition: str) -> dict[str, Any]:
    job = render_job(exp, stage)
    job["metadata"]["uid"] = f"uid-{stage}"
    job["spec"]["runPolicy"].pop("suspend", None)  # admitted by Kueue
    job["status"] = {"conditions": [{"type": condition, "status": "True", "reason": f"PyTorchJob{condition}",
                                     "message": f"PyTorchJob golden-{stage} is {condition.lower()}."}]}
    return job


def _pod(exp: Any, stage: str, exit_code: int) -> dict[str, Any]:
    terminated = {"terminated": {"exitCode": exit_code, "reason": "Error"}}
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": f"golden-{stage}-worker-0", "namespace": "ml", "labels": pod_labels(exp, stage, 0)},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "pytorch", "state": terminated}]}}


def _states(exp: Any) -> dict[str, list[dict[str, Any]]]:
    return {
        "nothing submitted": [],
        "curation running": [_job(exp, "curate", "Running")],
        "curation failed (exit 1)": [_job(exp, "curate", "Failed"), _pod(exp, "curate", 1)],
        "curation succeeded": [_job(exp, "curate", "Succeeded")],
        "pretraining running": [_job(exp, "curate", "Succeeded"), _job(exp, "pretrain", "Running")],
        "all succeeded": [_job(exp, "curate", "Succeeded"), _job(exp, "pretrain", "Succeeded")],
    }


def _applied(exp: Any, action: Any) -> list[dict[str, Any]]:
    applied = []
    for obj in render_stage(exp, action.stage, attempt=action.attempt, restarts=action.restarts):
        entry = {"kind": obj["kind"], "name": obj["metadata"]["name"]}
        if obj["kind"] == "ConfigMap":
            entry["files"] = sorted(obj["data"])
        else:
            entry["command"] = obj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0][
                "command"]
        applied.append(entry)
    return applied


def _walk() -> list[dict[str, Any]]:
    exp = load_spec(CURATION)
    walk = []
    for state, objects in _states(exp).items():
        observed = observe(copy.deepcopy(objects), experiment="golden")
        actions = plan(exp, observed)
        phase = experiment_phase(exp, observed)
        status = experiment_status(exp, observed, actions, phase, previous=None, now="2026-01-01T00:00:00Z")
        walk.append({
            "state": state,
            "phase": phase.value,
            "actions": [{"kind": a.kind.value, "stage": a.stage, "reason": a.reason, "attempt": a.attempt,
                         "message": a.message, **({"applies": _applied(exp, a)} if a.kind.value == "submit" else {})}
                        for a in actions],
            "status": {"message": status["message"], "currentStage": status.get("currentStage"),
                       "stages": [{k: s[k] for k in ("name", "phase", "restarts", "message") if k in s}
                                  for s in status["stages"]]},
        })
    return walk


def test_planner_golden_chains_curation_into_pretraining() -> None:
    text = yaml_stream(_walk())
    path = GOLDEN / "curation-plan.yaml"
    if UPDATE_GOLDEN:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with DINO_CTL_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), "curation-plan.yaml differs from the golden file (DINO_CTL_UPDATE_GOLDEN=1)"


def test_planner_submits_pretraining_only_after_curation_succeeded() -> None:
    walk = {entry["state"]: entry for entry in _walk()}
    submits = {state: [(a["stage"], a["reason"]) for a in entry["actions"] if a["kind"] == "submit"]
               for state, entry in walk.items()}
    assert submits["nothing submitted"] == [("curate", "start")]
    assert submits["curation running"] == [] and walk["curation running"]["phase"] == "Running"
    assert [(a["kind"], a["stage"], a["reason"]) for a in walk["curation failed (exit 1)"]["actions"]] == [
        ("delete", "curate", "failure")]
    assert submits["curation succeeded"] == [("pretrain", "start")]
    assert walk["all succeeded"]["phase"] == "Succeeded"
    assert [a["kind"] for a in walk["all succeeded"]["actions"]] == ["complete"]


# --- CLI --------------------------------------------------------------------------------------------------------------


def test_validate_lists_the_curation_stage_and_render_renders_it() -> None:
    import json

    from typer.testing import CliRunner

    from dino_ctl.cli.main import app

    result = CliRunner().invoke(app, ["validate", str(CURATION), "-o", "json"])
    assert result.exit_code == 0, result.output
    stages = json.loads(result.stdout)["stages"]
    assert [(s["name"], s["recipe"], s["after"], s["worldSizes"]) for s in stages] == [
        ("curate", "curation", "-", "32..32"), ("pretrain", "vits14", "curate", "16..16")]
    assert stages[0]["checkpointDir"] == "/mnt/dino-ctl/runs/golden/curate"
    result = CliRunner().invoke(app, ["render", str(CURATION), "--stage", "curate", "-o", "json"])
    assert result.exit_code == 0, result.output
    kinds = [(o["kind"], o["metadata"]["name"]) for o in json.loads(result.stdout)["items"]]
    assert kinds[:2] == [("ConfigMap", "golden-curate-config"), ("PyTorchJob", "golden-curate")]


def test_an_invalid_curation_section_exits_2_with_one_line(tmp_path) -> None:
    from typer.testing import CliRunner

    from dino_ctl.cli.main import app

    doc = _doc()
    _curation(doc)["dedup"] = {"k": 0}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "spec.stages[0].curation.dedup.k: invalid value 0; allowed: input should be greater than or equal to 1" \
        in result.output


def test_controller_pass_chains_curation_into_pretraining() -> None:
    from dino_ctl.controller.core import reconcile

    exp = load_spec(CURATION)
    first = reconcile(exp, observe([], experiment="golden"), None, now="2026-01-01T00:00:00Z")
    assert [(a.kind.value, a.stage) for a in first.actions] == [("submit", "curate")]
    assert [(e.reason, e.message) for e in first.events][0] == ("StageSubmitted", "Submitted stage curate (attempt 0)")
    assert first.status["currentStage"] == "curate"
    failed = observe([_job(exp, "curate", "Failed"), _pod(exp, "curate", 1)], experiment="golden")
    retry = reconcile(exp, failed, first.status, now="2026-01-01T00:05:00Z")
    assert [e.reason for e in retry.events][0] == "StageFailed"
    deleted = observe([{**render_stage(exp, "curate")[0], "metadata": {
        **render_stage(exp, "curate")[0]["metadata"],
        "annotations": {"dino-ctl.io/restarts": '{"failure": 1, "preemption": 0, "eviction": 0}'}}}],
        experiment="golden")
    resubmit = reconcile(exp, deleted, retry.status, now="2026-01-01T00:06:00Z")
    assert [(e.reason, e.message) for e in resubmit.events][0] == (
        "StageResubmitted", "Resubmitted stage curate (attempt 1); curation resumes from the shards its steps finished")
    done = reconcile(exp, observe([_job(exp, "curate", "Succeeded")], experiment="golden"), resubmit.status,
                     now="2026-01-01T01:00:00Z")
    assert [(a.kind.value, a.stage) for a in done.actions] == [("submit", "pretrain")]
    assert done.status["currentStage"] == "pretrain"
    assert [s["phase"] for s in done.status["stages"]] == ["Succeeded", "Pending"]
