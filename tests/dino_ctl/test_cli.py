"""The CLI through Typer's CliRunner: exit codes, output, ``--output json`` (cluster commands: tests/cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from tests.dino_ctl.spec_helpers import EXAMPLES, GOLDEN, document

runner = CliRunner()


def _spec_file(tmp_path: Path, doc: dict | None = None) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc or document()))
    return path


def test_validate_valid_spec(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(_spec_file(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "valid" in result.stdout and "DinoExperiment demo" in result.stdout and "pretrain" in result.stdout


def test_validate_json(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(_spec_file(tmp_path)), "--output", "json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["valid"] is True and [s["name"] for s in report["stages"]] == ["pretrain", "highres", "distill"]
    assert report["stages"][0]["worldSizes"] == "16..16" and report["stages"][0]["globalBatchSize"] == 32


def test_validate_invalid_spec_exits_2_with_the_field_path(tmp_path: Path) -> None:
    doc = document()
    doc["spec"]["stages"][0]["overrides"]["optim.iteratoins"] = 5
    result = runner.invoke(app, ["validate", str(_spec_file(tmp_path, doc))])
    assert result.exit_code == 2
    assert "spec.stages[0].overrides.optim.iteratoins: invalid value 5" in result.stderr
    result = runner.invoke(app, ["validate", str(_spec_file(tmp_path, doc)), "-o", "json"])
    assert result.exit_code == 2
    [error] = json.loads(result.stdout)["errors"]
    assert error["path"] == "spec.stages[0].overrides.optim.iteratoins" and error["value"] == 5


def test_validate_missing_file_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2 and "a path to an existing spec file" in result.stderr


def test_render_prints_a_yaml_stream_matching_the_golden_file() -> None:
    result = runner.invoke(app, ["render", str(GOLDEN / "spec-elastic.yaml")])
    assert result.exit_code == 0, result.output
    assert result.stdout == (GOLDEN / "pytorchjob.yaml").read_text()
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout)]
    assert kinds.count("PyTorchJob") == 2 and kinds.count("ConfigMap") == 2


def test_render_backend_stage_and_json() -> None:
    result = runner.invoke(app, ["render", str(EXAMPLES / "trainjob-vits14.yaml"), "--stage", "pretrain", "-o", "json"])
    assert result.exit_code == 0
    listing = json.loads(result.stdout)
    assert listing["kind"] == "List"
    assert [o["kind"] for o in listing["items"]] == ["ClusterTrainingRuntime", "ConfigMap", "TrainJob", "PodMonitor",
                                                     "PrometheusRule"]
    result = runner.invoke(app, ["render", str(GOLDEN / "spec-elastic.yaml"), "--backend", "torchx", "--stage",
                                 "highres"])
    assert result.exit_code == 0
    jobs = [d["metadata"]["name"] for d in yaml.safe_load_all(result.stdout) if d["kind"] == "Job"]
    assert jobs == ["golden-highres"]


def test_render_rejects_unknown_stage_and_invalid_backend_combinations() -> None:
    result = runner.invoke(app, ["render", str(GOLDEN / "spec-elastic.yaml"), "--stage", "nope"])
    assert result.exit_code == 2
    assert "--stage: invalid value 'nope'; allowed: one of pretrain, highres" in result.stderr
    result = runner.invoke(app, ["render", str(GOLDEN / "spec-elastic.yaml"), "--backend", "trainjob"])
    assert result.exit_code == 2 and "min == max for backend trainjob" in result.stderr
    result = runner.invoke(app, ["render", str(GOLDEN / "spec-elastic.yaml"), "--backend", "slurm"])
    assert result.exit_code == 2


def test_render_of_a_local_spec_is_checked_as_a_cluster_spec(tmp_path: Path) -> None:
    doc = document(backend="local", storage={"checkpoints": "file:///runs/demo"})
    assert runner.invoke(app, ["validate", str(_spec_file(tmp_path, doc))]).exit_code == 0
    result = runner.invoke(app, ["render", str(_spec_file(tmp_path, doc))])
    assert result.exit_code == 2 and "file:// is pod-local disk" in result.stderr


def test_schema_json_and_crd() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0 and json.loads(result.stdout)["title"] == "DinoExperiment"
    result = runner.invoke(app, ["schema", "--kind", "crd", "-o", "text"])
    crd = yaml.safe_load(result.stdout)
    assert crd["kind"] == "CustomResourceDefinition" and crd["metadata"]["name"] == "dinoexperiments.dino-ctl.io"


def test_submit_dry_run_needs_no_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    result = runner.invoke(app, ["submit", str(_spec_file(tmp_path)), "--dry-run"])
    assert result.exit_code == 0, result.output
    names = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout)]
    assert names == [("ConfigMap", "demo-experiment"), ("ConfigMap", "demo-pretrain-config"),
                     ("PyTorchJob", "demo-pretrain")]


def test_submit_local_backend_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["submit", str(_spec_file(tmp_path, document(backend="local"))), "--dry-run"])
    assert result.exit_code == 2 and "`dino-ctl run` runs backend local on this machine" in result.stderr


def test_cluster_commands_without_a_cluster_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    result = runner.invoke(app, ["status", "demo", "-o", "json"])
    assert result.exit_code == 1
    assert "no usable kubeconfig" in json.loads(result.stdout)["error"]


def test_shell_completion_is_offered() -> None:
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.stdout
