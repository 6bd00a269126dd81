"""Strict offline validation of rendered Kubernetes objects.

Built-in kinds are checked with ``kubernetes_validate`` in strict mode (unknown fields are errors). Custom resources are
checked against CustomResourceDefinitions (the upstream ones in ``k8s-schemas/``, and dino-ctl's own): their
``openAPIV3Schema`` is translated to JSON Schema the way the API server reads it, and made strict, because a real API
server silently prunes unknown fields, which is how a misspelled field goes unnoticed:

- ``x-kubernetes-int-or-string`` accepts an integer or a string;
- ``x-kubernetes-preserve-unknown-fields`` and ``additionalProperties`` keep unknown keys; every other object that
  lists ``properties`` rejects keys it does not list;
- ``nullable`` accepts ``null``; ``x-kubernetes-embedded-resource`` requires ``apiVersion``/``kind``/``metadata``;
- the root ``metadata`` is validated as a built-in ObjectMeta.

CEL rules (``x-kubernetes-validations``) need an API server and are not checked. ``kubernetes_validate`` and
``jsonschema`` are development dependencies, imported when a validator is built.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "KUBE_VERSION",
    "SCHEMAS_ENV",
    "ObjectValidator",
    "ValidationFailed",
    "find_k8s_schemas",
    "load_crd_schemas",
    "strict_schema",
]

logger = logging.getLogger(__name__)

KUBE_VERSION = "1.31"
"""Kubernetes minor version built-in kinds are validated against (the oldest release the chart supports)."""
SCHEMAS_ENV = "DINO_CTL_K8S_SCHEMAS"


class ValidationFailed(ValueError):
    """An object does not validate; the message names the object, the field path and the problem."""


def find_k8s_schemas(repo_root: Path) -> Path | None:
    """The upstream CRD folder: ``$DINO_CTL_K8S_SCHEMAS``, else ``<repo>/../shared/k8s-schemas``; None if absent."""
    configured = os.environ.get(SCHEMAS_ENV)
    candidate = Path(configured) if configured else repo_root.parent / "shared" / "k8s-schemas"
    return candidate if candidate.is_dir() else None


def strict_schema(node: Any) -> Any:
    """Translate one structural (CRD) schema node into a strict JSON-Schema node (see the module docstring)."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, Mapping):
        return node
    out = {key: strict_schema(value) for key, value in node.items() if not key.startswith("x-kubernetes-")}
    out.pop("nullable", None)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    if node.get("x-kubernetes-embedded-resource"):
        out.setdefault("properties", {})
        out["required"] = sorted({*out.get("required", []), "apiVersion", "kind"})
        preserve = True  # the embedded object's own fields are checked by its own schema, not this one
    if "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def load_crd_schemas(documents: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(apiVersion, kind): strict schema}`` for every served version of every CRD in ``documents``."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for crd in documents:
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            schema = strict_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}  # checked as ObjectMeta instead
            schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = schema
    return schemas


def _read_crd_folder(folder: Path) -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.yaml")):
        documents.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return documents


def _describe(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{metadata.get('name', '<unnamed>')}"


class ObjectValidator:
    """Validates rendered objects strictly; custom kinds need their CRD (from a folder or given directly).

    Args:
        crd_folder: folder of upstream CRD YAML files (e.g. ``find_k8s_schemas(...)``), or None.
        crds: more CRD documents (dino-ctl's own ``DinoExperiment`` CRD).
        kube_version: Kubernetes minor version for built-in kinds.
    """

    def __init__(
        self,
        *,
        crd_folder: Path | None = None,
        crds: Iterable[Mapping[str, Any]] = (),
        kube_version: str = KUBE_VERSION,
    ) -> None:
        documents = [*(_read_crd_folder(crd_folder) if crd_folder else []), *crds]
        self.crd_schemas = load_crd_schemas(documents)
        self.kube_version = kube_version

    def validate(self, obj: Mapping[str, Any]) -> None:
        """Raise :class:`ValidationFailed` listing every problem of ``obj``."""
        import jsonschema
        import kubernetes_validate

        key = (obj.get("apiVersion", ""), obj.get("kind", ""))
        if key in self.crd_schemas:
            validator = jsonschema.Draft202012Validator(self.crd_schemas[key])
            problems = [
                f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
                for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
            ]
            # The root metadata of a custom resource is an ObjectMeta: check it as a ConfigMap's.
            probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
            problems += self._builtin_problems(probe, kubernetes_validate)
        else:
            problems = self._builtin_problems(obj, kubernetes_validate)
        if problems:
            raise ValidationFailed(f"{_describe(obj)} ({key[0]}): " + "; ".join(problems))

    def _builtin_problems(self, obj: Mapping[str, Any], kubernetes_validate: Any) -> list[str]:
        try:
            kubernetes_validate.validate(dict(obj), self.kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:  # a jsonschema error: the first problem only
            return [f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"]
        except kubernetes_validate.SchemaNotFoundError:
            return [f"no schema for {obj.get('apiVersion')} {obj.get('kind')}: not a built-in kind, and no CRD given"]
        return []

    def validate_all(self, objects: Iterable[Mapping[str, Any]]) -> int:
        """Validate every object; raise one :class:`ValidationFailed` naming all failures. Returns the count."""
        failures, count = [], 0
        for obj in objects:
            count += 1
            try:
                self.validate(obj)
            except ValidationFailed as error:
                failures.append(str(error))
        if failures:
            raise ValidationFailed("\n".join(failures))
        return count
