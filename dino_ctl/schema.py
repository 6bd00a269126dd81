"""JSON Schema and the ``DinoExperiment`` CustomResourceDefinition, generated from the models in :mod:`dino_ctl.spec`.

The CRD's ``openAPIV3Schema`` must be *structural* (what the API server requires): no ``$ref``, a ``type`` on every
node, no ``additionalProperties`` beside ``properties``, nullability as ``nullable: true``. :func:`structural`
translates pydantic's JSON Schema into that form; maps of arbitrary values (stage overrides, ``status``) and fields
that accept several types (``after``: a name or a list) become ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import copy
from typing import Any

from dino_ctl.spec import API_VERSION, GROUP, KIND, DinoExperiment

__all__ = ["CRD_NAME", "PLURAL", "crd_manifest", "json_schema", "structural"]

PLURAL = "dinoexperiments"
CRD_NAME = f"{PLURAL}.{GROUP}"
# Keys a structural schema may keep as they are (validation keywords of OpenAPI v3.0 that JSON Schema shares).
_KEPT = ("type", "description", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum", "minItems",
         "maxItems", "required", "format", "x-kubernetes-int-or-string")


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a ``DinoExperiment`` document, wire (camelCase) names."""
    schema = DinoExperiment.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" not in node:
        return node
    target = dict(defs[node["$ref"].rsplit("/", 1)[-1]])
    if "description" in node:  # the field's own docstring beats the class docstring
        target["description"] = node["description"]
    return target


def _union(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    variants = [v for v in node["anyOf"] if v != {"type": "null"}]
    if node.get("x-kubernetes-int-or-string"):
        out: dict[str, Any] = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
    elif len(variants) == 1:
        out = structural({**variants[0], **{k: v for k, v in node.items() if k == "description"}}, defs)
    else:  # several types (e.g. a name or a list of names): the API server stores it, pydantic checks it
        out = {"x-kubernetes-preserve-unknown-fields": True}
    if "description" in node:
        out["description"] = node["description"]
    if len(variants) < len(node["anyOf"]):
        out["nullable"] = True
    return out


def structural(node: dict[str, Any], defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Translate one pydantic JSON Schema node (and its children) into a structural OpenAPI v3 schema."""
    defs = defs or {}
    node = _resolve(node, defs)
    if "anyOf" in node:
        return _union(node, defs)
    out = {key: copy.deepcopy(node[key]) for key in _KEPT if key in node}
    if "const" in node:
        out["enum"] = [node["const"]]
    if "exclusiveMinimum" in node:  # JSON Schema's number form -> OpenAPI v3.0's boolean form
        out.update(minimum=node["exclusiveMinimum"], exclusiveMinimum=True)
    kind = node.get("type")
    if kind is None:  # Any: keep whatever the user wrote
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "object":
        extra = node.get("additionalProperties")
        if "properties" in node:
            out["properties"] = {name: structural(child, defs) for name, child in node["properties"].items()}
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = structural(extra, defs)
        else:  # dict[str, Any]: arbitrary nested values (stage overrides)
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = structural(node.get("items", {}), defs)
    return out


def _open_api_schema() -> dict[str, Any]:
    schema = DinoExperiment.model_json_schema(by_alias=True, mode="validation")
    defs = schema.get("$defs", {})
    spec = structural(schema["properties"]["spec"], defs)
    return {
        "type": "object",
        "description": schema.get("description", ""),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},  # the API server owns metadata's schema
            "spec": spec,
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }


def crd_manifest() -> dict[str, Any]:
    """The ``dinoexperiments.dino-ctl.io`` CustomResourceDefinition (apiextensions.k8s.io/v1), status subresource."""
    version = API_VERSION.split("/", 1)[1]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "dino-ctl", "app.kubernetes.io/managed-by": "dino-ctl"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": PLURAL, "singular": KIND.lower(), "kind": KIND, "shortNames": ["dinoexp"],
                      "categories": ["dino-ctl"]},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
                        {"name": "Backend", "type": "string", "jsonPath": ".spec.backend"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": _open_api_schema()},
                }
            ],
        },
    }
