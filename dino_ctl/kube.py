"""The only module that calls the Kubernetes API.

A thin client over ``kubernetes.client.ApiClient`` that speaks plain dicts (what the renderers produce and
:func:`dino_ctl.observe.observe` reads): server-side apply, get, list by label, delete, pod logs. Request paths are
built by pure functions (:func:`resource_for`, :func:`object_path`) and responses parsed by pure functions
(:func:`list_items`, :func:`kube_error`), which the unit tests check; the HTTP calls go through the real client.

The current kubeconfig context is used (``KubeClient.from_kubeconfig``); in a pod, the in-cluster service account.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from dino_ctl.errors import KubeError
from dino_ctl.naming import LABEL_EXPERIMENT

__all__ = [
    "FIELD_MANAGER",
    "RESOURCES",
    "STATE_KINDS",
    "KubeClient",
    "Resource",
    "kube_error",
    "list_items",
    "object_path",
    "parse_warnings",
    "resource_for",
    "split_lines",
]

logger = logging.getLogger(__name__)

FIELD_MANAGER = "dino-ctl"
_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class Resource:
    """An API resource: how ``(apiVersion, kind)`` maps onto a REST path."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True


RESOURCES: dict[tuple[str, str], Resource] = {
    (r.api_version, r.kind): r
    for r in (
        Resource("v1", "ConfigMap", "configmaps"),
        Resource("v1", "Pod", "pods"),
        Resource("v1", "Secret", "secrets"),
        Resource("kubeflow.org/v1", "PyTorchJob", "pytorchjobs"),
        Resource("trainer.kubeflow.org/v1alpha1", "TrainJob", "trainjobs"),
        Resource("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime", "clustertrainingruntimes", False),
        Resource("batch.volcano.sh/v1alpha1", "Job", "jobs"),
        Resource("monitoring.coreos.com/v1", "PodMonitor", "podmonitors"),
        Resource("monitoring.coreos.com/v1", "PrometheusRule", "prometheusrules"),
        Resource("dino-ctl.io/v1alpha1", "DinoExperiment", "dinoexperiments"),
        Resource("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", False),
    )
}
# Kinds that describe an experiment's state (observe() reads them).
STATE_KINDS = (
    ("v1", "ConfigMap"),
    ("v1", "Pod"),
    ("kubeflow.org/v1", "PyTorchJob"),
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"),
    ("batch.volcano.sh/v1alpha1", "Job"),
)


def resource_for(api_version: str, kind: str) -> Resource:
    """The :class:`Resource` of ``(api_version, kind)``; ValueError naming the known kinds otherwise."""
    try:
        return RESOURCES[(api_version, kind)]
    except KeyError:
        known = ", ".join(f"{k} ({v})" for v, k in RESOURCES)
        raise ValueError(f"kind {kind} ({api_version}): not a kind dino-ctl manages; known: {known}") from None


def object_path(resource: Resource, *, namespace: str | None = None, name: str | None = None) -> str:
    """REST path of a collection (``name`` None) or of one object."""
    base = "/api/v1" if resource.api_version == "v1" else f"/apis/{resource.api_version}"
    if resource.namespaced:
        if not namespace:
            raise ValueError(f"{resource.kind} is namespaced: a namespace is required")
        base += f"/namespaces/{namespace}"
    return f"{base}/{resource.plural}" + (f"/{name}" if name else "")


def list_items(response: Mapping[str, Any], resource: Resource) -> list[dict[str, Any]]:
    """Items of a list response with ``apiVersion``/``kind`` restored (list responses leave them out of items)."""
    return [{"apiVersion": resource.api_version, "kind": resource.kind, **item} for item in response.get("items") or []]


_UNTYPED_OBJECT = "failed to create typed patch object"
CONFLICT_HINT = (
    "another field manager owns these fields; dino-ctl does not overwrite them silently. Change them back, or "
    "re-run with --force-conflicts to take ownership"
)


def kube_error(verb: str, target: str, status: int, body: str | bytes | None) -> KubeError:
    """A :class:`KubeError` from an HTTP status and a ``Status`` body (its message when it has one).

    A server-side-apply conflict (409 on apply) keeps the server's list of conflicting managers and fields and says
    what to do about it.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
    try:
        parsed = json.loads(text)
        reason, names_object = parsed.get("message") or text, bool((parsed.get("details") or {}).get("name"))
    except (ValueError, AttributeError):
        reason, names_object = text, False
    reason = reason.strip() or "no reason given"
    if verb == "apply" and status == 409:
        reason = f"{reason}; {CONFLICT_HINT}"
    elif status == 404 and not names_object:
        # A missing object is a Status naming it; a kind the server does not serve is a bare "404 page not found".
        reason = f"{reason}; the API server does not serve this kind: is its CustomResourceDefinition installed?"
    # Server-side apply answers 500 for an object it cannot type (a field the schema does not declare, duplicate
    # list keys such as two env entries of one name): the object is invalid, retrying cannot help.
    permanent = True if status == 500 and _UNTYPED_OBJECT in reason else None
    return KubeError(verb, target, status, reason, permanent=permanent)


def parse_warnings(headers: Iterable[str]) -> list[str]:
    """The texts of RFC 7234 ``Warning`` headers as the API server sends them (``299 - "text"``)."""
    texts = []
    for header in headers:
        code, _, rest = header.strip().partition(" ")
        _agent, _, text = rest.partition(" ")
        text = text.strip()
        if code == "299" and len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1].replace('\\"', '"')
        texts.append(text or header.strip())
    return texts


def split_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Text lines of a byte stream cut at arbitrary points (a line or a UTF-8 character may span chunks)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line.decode("utf-8", "replace") for line in lines)
    if pending:
        yield pending.decode("utf-8", "replace")


def _target(obj_or_kind: Mapping[str, Any] | str, name: str | None = None, namespace: str | None = None) -> str:
    if isinstance(obj_or_kind, Mapping):
        meta = obj_or_kind.get("metadata") or {}
        obj_or_kind, name, namespace = obj_or_kind.get("kind", "?"), meta.get("name"), meta.get("namespace")
    return f"{obj_or_kind}/{name or '*'}" + (f" in {namespace}" if namespace else "")


_SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _in_cluster_namespace() -> str:
    """A pod's own namespace (its service account's), else ``default``."""
    try:
        with open(_SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as handle:
            return handle.read().strip() or "default"
    except OSError:
        return "default"


class KubeClient:
    """Plain-dict access to the objects dino-ctl manages. Build with :meth:`from_kubeconfig` or an ``ApiClient``."""

    def __init__(self, api_client: Any, *, namespace: str = "default", force_conflicts: bool = False) -> None:
        self.api = api_client
        self.namespace = namespace
        """Default namespace (the kubeconfig context's)."""
        self.force_conflicts = force_conflicts
        """Default of :meth:`apply`'s ``force``: take fields other managers own (the CLI's ``--force-conflicts``)."""
        self.warnings: list[str] = []
        """Every ``Warning`` the API server sent (unknown or duplicate fields, deprecations), oldest first."""

    @classmethod
    def from_kubeconfig(cls, *, context: str | None = None, force_conflicts: bool = False) -> KubeClient:
        """A client for the current kubeconfig context (or ``context``), else the in-cluster service account."""
        from kubernetes import config

        # Read KUBECONFIG now: the kubernetes package reads it once, at import time.
        path = os.environ.get("KUBECONFIG") or None
        try:
            contexts, active = config.list_kube_config_contexts(config_file=path)
            chosen = next((c for c in contexts if c["name"] == context), active) if context else active
            namespace = (chosen or {}).get("context", {}).get("namespace", "default")
            return cls(config.new_client_from_config(config_file=path, context=context), namespace=namespace,
                       force_conflicts=force_conflicts)
        except config.ConfigException as exc:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                raise KubeError("load", "kubeconfig", 0, f"no usable kubeconfig or in-cluster config ({exc})") from exc
            from kubernetes.client import ApiClient

            return cls(ApiClient(), namespace=_in_cluster_namespace(), force_conflicts=force_conflicts)

    def _call(self, verb: str, target: str, method: str, path: str, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            response = self.api.call_api(
                path, method, auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=kwargs.pop("timeout", _TIMEOUT_SECONDS), **kwargs,
            )
        except ApiException as exc:
            raise kube_error(verb, target, exc.status or 0, exc.body) from exc
        except HTTPError as exc:
            raise KubeError(verb, target, 0, f"cannot reach the API server ({exc})") from exc
        for warning in parse_warnings(response.headers.getlist("Warning") if response.headers else []):
            logger.warning("%s %s: the API server warns: %s", verb, target, warning)
            self.warnings.append(f"{verb} {target}: {warning}")
        return response

    def _json(self, verb: str, target: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        headers = {"Accept": "application/json", **kwargs.pop("header_params", {})}
        response = self._call(verb, target, method, path, header_params=headers, **kwargs)
        return json.loads(response.data or b"{}")

    def apply(self, obj: Mapping[str, Any], *, field_manager: str = FIELD_MANAGER, dry_run: bool = False,
              force: bool | None = None) -> dict:
        """Server-side apply ``obj`` (create or update the fields this manager owns); returns the live object.

        A field that another manager set to a different value is a 409 :class:`KubeError` naming the manager and
        the fields, unless ``force`` (default :attr:`force_conflicts`) takes ownership of them. ``dry_run`` asks the API server to validate and admit
        the object without storing it.
        """
        resource = resource_for(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        namespace = meta.get("namespace") or (self.namespace if resource.namespaced else None)
        body = {**obj, "metadata": {**meta, **({"namespace": namespace} if resource.namespaced else {})}}
        path = object_path(resource, namespace=namespace, name=meta["name"])
        force = self.force_conflicts if force is None else force
        query = [("fieldManager", field_manager), *([("force", "true")] if force else []),
                 *([("dryRun", "All")] if dry_run else [])]
        headers = {"Content-Type": "application/apply-patch+yaml"}
        return self._json("apply", _target(body), "PATCH", path, query_params=query, header_params=headers, body=body)

    def patch_status(self, api_version: str, kind: str, name: str, status: Mapping[str, Any], *,
                     namespace: str | None = None) -> dict[str, Any]:
        """JSON-merge-patch ``status`` into the object's ``status`` subresource (a None value removes that key).

        The controller writes its resources' status this way: only the status subresource, never the spec.
        """
        resource = resource_for(api_version, kind)
        namespace = namespace or self.namespace
        path = object_path(resource, namespace=namespace, name=name) + "/status"
        headers = {"Content-Type": "application/merge-patch+json"}
        return self._json("patch status", _target(kind, name, namespace), "PATCH", path, header_params=headers,
                          body={"status": dict(status)})

    def get(self, api_version: str, kind: str, name: str, *, namespace: str | None = None) -> dict[str, Any] | None:
        """One object, or None when it does not exist."""
        resource = resource_for(api_version, kind)
        namespace = namespace or self.namespace
        path = object_path(resource, namespace=namespace, name=name)
        try:
            obj = self._json("get", _target(kind, name, namespace), "GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return {"apiVersion": api_version, "kind": kind, **obj}

    def list(self, api_version: str, kind: str, *, namespace: str | None = None, selector: str = "") -> list[dict]:
        """Objects of a kind matching a label selector; [] when the kind is not installed (its CRD is missing)."""
        resource = resource_for(api_version, kind)
        namespace = namespace or self.namespace
        path = object_path(resource, namespace=namespace)
        query = [("labelSelector", selector)] if selector else []
        try:
            response = self._json("list", _target(kind, None, namespace), "GET", path, query_params=query)
        except KubeError as exc:
            if exc.status == 404:
                logger.debug("%s (%s) is not served by this cluster", kind, api_version)
                return []
            raise
        return list_items(response, resource)

    def delete(self, api_version: str, kind: str, name: str, *, namespace: str | None = None,
               propagation: str = "Foreground") -> bool:
        """Delete one object (``Foreground``: it disappears after its pods). False when it was already gone."""
        resource = resource_for(api_version, kind)
        namespace = namespace or self.namespace
        path = object_path(resource, namespace=namespace, name=name)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            self._json("delete", _target(kind, name, namespace), "DELETE", path, body=body)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def experiment_objects(self, experiment: str, *, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every object labelled ``dino-ctl.io/experiment=<experiment>`` of the kinds :func:`observe` reads."""
        selector = f"{LABEL_EXPERIMENT}={experiment}"
        found: list[dict[str, Any]] = []
        for api_version, kind in STATE_KINDS:
            found.extend(self.list(api_version, kind, namespace=namespace, selector=selector))
        return found

    def pod_logs(self, name: str, *, namespace: str | None = None, container: str | None = None,
                 tail_lines: int | None = None, follow: bool = False) -> Iterator[str]:
        """Lines of a pod's log (streamed while the pod runs when ``follow``)."""
        namespace = namespace or self.namespace
        path = object_path(resource_for("v1", "Pod"), namespace=namespace, name=name) + "/log"
        query = [(key, value) for key, value in (("container", container), ("tailLines", tail_lines),
                                                  ("follow", "true" if follow else None)) if value is not None]
        response = self._call("logs", _target("Pod", name, namespace), "GET", path, query_params=query,
                              header_params={"Accept": "*/*"}, timeout=None if follow else _TIMEOUT_SECONDS)
        yield from split_lines(response.stream(4096))
