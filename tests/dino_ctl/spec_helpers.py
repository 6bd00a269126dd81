"""Spec documents and validators shared by the control-plane tests (a helper module, not a conftest)."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import pytest

from dino_ctl.spec import DinoExperiment, parse_spec
from dino_ctl.validation import validate_experiment

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
GOLDEN = REPO_ROOT / "tests" / "golden"
UPDATE_GOLDEN = os.environ.get("DINO_CTL_UPDATE_GOLDEN") == "1"


def example_specs() -> list[Path]:
    """The DinoExperiment files of examples/ (the folder also holds other documents, e.g. curation configs)."""
    import yaml

    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        kinds = {doc.get("kind") for doc in yaml.safe_load_all(path.read_text()) if isinstance(doc, dict)}
        if "DinoExperiment" in kinds:
            found.append(path)
    return found


def document(**spec_overrides: Any) -> dict[str, Any]:
    """A small valid three-stage DinoExperiment document (CPU-sized recipe); ``spec`` keys replaced as given."""
    base: dict[str, Any] = {
        "apiVersion": "dino-ctl.io/v1alpha1",
        "kind": "DinoExperiment",
        "metadata": {"name": "demo", "namespace": "ml"},
        "spec": {
            "image": "registry.example.com/dino-ctl:0.1.0",
            "storage": {"checkpoints": "s3://bucket/runs/demo", "credentials": {"secretName": "s3-creds"}},
            "data": {"streams": [{"remote": "s3://bucket/data/a", "proportion": 0.5},
                                 {"remote": "s3://bucket/data/b", "proportion": 0.5}]},
            "resources": {"nodes": {"min": 2, "max": 2}, "gpusPerNode": 8},
            "stages": [
                {"name": "pretrain", "recipe": "tiny", "overrides": {"data.dataset": "mds"}},
                {"name": "highres", "recipe": "tiny", "init": {"from": "pretrain"},
                 "overrides": {"data.dataset": "mds", "stage.kind": "highres", "model.img_size": 64,
                               "data.crops.global_size": 64}},
                {"name": "distill", "recipe": "tiny", "teacher": {"from": "highres"},
                 "overrides": {"data.dataset": "mds", "stage.kind": "distill", "model.depth": 2}},
            ],
        },
    }
    base["spec"].update(copy.deepcopy(spec_overrides))
    return base


def experiment(doc: dict[str, Any] | None = None, **spec_overrides: Any) -> DinoExperiment:
    """Parse and fully validate a document (default: :func:`document` with ``spec_overrides``)."""
    parsed = parse_spec(doc if doc is not None else document(**spec_overrides))
    validate_experiment(parsed)
    return parsed


@functools.cache
def object_validator() -> Any:
    """The strict offline validator (built-in kinds + upstream CRDs + dino-ctl's CRD); skips without the CRDs."""
    from dino_ctl.controller.validate import ObjectValidator, find_k8s_schemas
    from dino_ctl.schema import crd_manifest

    folder = find_k8s_schemas(REPO_ROOT)
    if folder is None:
        pytest.skip("upstream CRD schemas not found: set DINO_CTL_K8S_SCHEMAS or provide ../shared/k8s-schemas")
    return ObjectValidator(crd_folder=folder, crds=[openapi_bounds_as_json_schema(crd_manifest())])


def openapi_bounds_as_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's ``minimum: x, exclusiveMinimum: true`` -> JSON Schema 2020's ``exclusiveMinimum: x``.

    The API server reads the boolean form; jsonschema's 2020-12 validator reads the number form.
    """
    if isinstance(node, list):
        return [openapi_bounds_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: openapi_bounds_as_json_schema(value) for key, value in node.items()}
    if out.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    return out
