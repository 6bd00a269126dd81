"""JSON Schema and the DinoExperiment CRD generated from the spec models: structural, strict, and in agreement."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from dino_ctl.schema import crd_manifest, json_schema, structural
from dino_ctl.validation import load_spec
from tests.dino_ctl.spec_helpers import document, example_specs, object_validator


def _nodes(node: Any, path: str = "") -> list[tuple[str, dict]]:
    found = []
    if isinstance(node, dict):
        found.append((path, node))
        for key in ("properties",):
            for name, child in (node.get(key) or {}).items():
                found += _nodes(child, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                found += _nodes(node[key], f"{path}[{key}]")
    return found


def _open_api() -> dict:
    return crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crd_schema_is_structural() -> None:
    schema = _open_api()
    assert "$ref" not in json.dumps(schema) and "$defs" not in json.dumps(schema)
    for path, node in _nodes(schema):
        untyped = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        assert "type" in node or untyped, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), f"{path} mixes properties"
        assert "anyOf" not in node or node.get("x-kubernetes-int-or-string"), f"{path} has a free anyOf"
        assert "title" not in node and "default" not in node


def test_crd_marks_free_form_and_optional_fields() -> None:
    spec = _open_api()["properties"]["spec"]
    stage = spec["properties"]["stages"]["items"]["properties"]
    assert stage["overrides"] == {"type": "object", "description": stage["overrides"]["description"],
                                  "x-kubernetes-preserve-unknown-fields": True}
    assert stage["after"]["x-kubernetes-preserve-unknown-fields"] is True  # a name or a list of names
    assert stage["init"]["nullable"] is True and stage["init"]["required"] == ["from"]
    cpu = spec["properties"]["resources"]["properties"]["cpu"]
    assert cpu["x-kubernetes-int-or-string"] is True and cpu["nullable"] is True
    proportion = spec["properties"]["data"]["properties"]["streams"]["items"]["properties"]["proportion"]
    assert (proportion["minimum"], proportion["exclusiveMinimum"]) == (0, True)
    assert spec["properties"]["backend"]["enum"] == ["pytorchjob", "trainjob", "torchx", "local"]
    assert spec["required"] == ["image", "storage", "stages"]


def test_crd_passes_the_kubernetes_schema_and_examples_pass_the_crd() -> None:
    validator = object_validator()
    validator.validate(crd_manifest())
    for path in example_specs():
        validator.validate(load_spec(path).to_document())
    validator.validate(document())


def test_crd_rejects_what_the_models_reject() -> None:
    validator = object_validator()
    bad = document(backend="slurm")
    with pytest.raises(Exception, match="'slurm' is not one of"):
        validator.validate(bad)
    unknown = document()
    unknown["spec"]["resources"]["gpus"] = 8
    with pytest.raises(Exception, match="'gpus' was unexpected"):
        validator.validate(unknown)


def test_json_schema_validates_documents() -> None:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(document()))
    assert list(validator.iter_errors(document(image="")))


def test_structural_translation_of_small_nodes() -> None:
    assert structural({"anyOf": [{"type": "integer"}, {"type": "null"}], "description": "d"}) == {
        "type": "integer", "description": "d", "nullable": True}
    assert structural({"type": "object", "additionalProperties": {"type": "string"}}) == {
        "type": "object", "additionalProperties": {"type": "string"}}
    assert structural({"const": "x", "type": "string"}) == {"type": "string", "enum": ["x"]}
    assert structural({}) == {"x-kubernetes-preserve-unknown-fields": True}
