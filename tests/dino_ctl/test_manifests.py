"""The committed manifests/ and chart data files equal what `python -m dino_ctl.controller.manifests` generates."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml

from dino_ctl.controller import manifests
from dino_ctl.controller.validate import SCHEMAS_ENV, ObjectValidator, find_k8s_schemas
from dino_ctl.schema import crd_manifest

pytest.importorskip("helm_python", reason="helm-python-sdk (a dev dependency) renders the chart")

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    for folder in ("charts", "manifests"):
        shutil.copytree(REPO_ROOT / folder, tmp_path / folder)
    return tmp_path


def test_committed_files_are_current(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        status = manifests.main(["--root", str(REPO_ROOT), "--check"])
    assert status == 0, "stale: " + "; ".join(caplog.messages) + " - run python -m dino_ctl.controller.manifests"


def test_check_names_a_stale_file_and_writing_fixes_it(repo_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    rules = repo_copy / "charts/dino-ctl/files/prometheus-rules.yaml"
    rules.write_text(rules.read_text().replace("stallMinutes", "stallMinutez"))
    orphan = repo_copy / "manifests/old-template.yaml"
    orphan.write_text("kind: ConfigMap\n")
    with caplog.at_level(logging.ERROR):
        assert manifests.main(["--root", str(repo_copy), "--check"]) == 1
    assert caplog.messages == [
        "stale generated file: charts/dino-ctl/files/prometheus-rules.yaml "
        "(regenerate: python -m dino_ctl.controller.manifests)"
    ]
    assert manifests.main(["--root", str(repo_copy)]) == 0
    assert not orphan.exists()
    assert manifests.main(["--root", str(repo_copy), "--check"]) == 0


def test_check_finds_a_hand_edited_manifest(repo_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    deployment = repo_copy / "manifests/deployment.yaml"
    text = deployment.read_text()
    deployment.write_text(text.replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"))
    with caplog.at_level(logging.ERROR):
        assert manifests.main(["--root", str(repo_copy), "--check"]) == 1
    assert "manifests/deployment.yaml" in caplog.text


def test_wrong_root_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        manifests.main(["--root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no charts/dino-ctl/Chart.yaml there; run from the repository root" in capsys.readouterr().err


def test_manifests_validate_and_kustomization_lists_them() -> None:
    folder = find_k8s_schemas(REPO_ROOT)
    if folder is None:
        pytest.skip(f"upstream CRD schemas not found: set {SCHEMAS_ENV} or provide ../shared/k8s-schemas")
    validator = ObjectValidator(crd_folder=folder, crds=[crd_manifest()])
    root = REPO_ROOT / "manifests"
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {str(p.relative_to(root)) for p in root.rglob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    objects = [doc for name in sorted(listed) for doc in yaml.safe_load_all((root / name).read_text()) if doc]
    # The CRD itself is a built-in kind (apiextensions.k8s.io/v1): validated strictly like the rest.
    assert validator.validate_all(objects) == len(objects)
    kinds = {o["kind"] for o in objects}
    assert kinds >= {"CustomResourceDefinition", "Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment",
                     "PodMonitor", "PrometheusRule", "ConfigMap"}
    namespaced = [o for o in objects if o["kind"] not in ("CustomResourceDefinition", "Namespace",
                                                            "ClusterTrainingRuntime")]
    assert {o["metadata"]["namespace"] for o in namespaced} == {manifests.DEFAULT_NAMESPACE}
