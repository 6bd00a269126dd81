"""A small in-memory Kubernetes API server over real HTTP, for testing kube.py and the CLI without a cluster.

It is a network peer of the real ``kubernetes`` client (which is not mocked): it stores objects by REST path and
answers the verbs dino-ctl uses — server-side apply (PATCH ``application/apply-patch+yaml``), GET, LIST with an
equality ``labelSelector``, DELETE, and ``pods/<name>/log`` — with the status codes and ``Status`` bodies the real API
server sends. Tests play the operators by editing ``objects`` (job status, pods with exit codes). Every request is
recorded in ``requests``.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

_OBJECT = re.compile(
    r"^/(api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))(/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)"
    r"(/(?P<name>[^/]+))?(/(?P<sub>log))?$"
)


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any


@dataclass
class FakeApiServer:
    """State of the fake server; ``served`` lists the plurals it knows (others answer 404 like a missing CRD)."""

    served: set[str] = field(default_factory=lambda: {
        "configmaps", "pods", "pytorchjobs", "trainjobs", "jobs", "dinoexperiments", "clustertrainingruntimes"})
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    _uids: Any = field(default_factory=lambda: itertools.count(1))

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        """The stored object of ``kind`` called ``name`` (any namespace)."""
        return next((o for o in self.objects.values() if o.get("kind") == kind and o["metadata"]["name"] == name), None)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects.values() if o.get("kind") == kind]

    def add(self, obj: dict[str, Any], path: str) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{next(self._uids)}")
        meta.setdefault("creationTimestamp", f"2026-01-01T00:00:{len(self.objects):02d}Z")
        self.objects[path] = obj
        return obj


def _merge(live: dict[str, Any], applied: dict[str, Any]) -> dict[str, Any]:
    """A simplified server-side apply: applied maps merge recursively, other applied values replace."""
    out = copy.deepcopy(live)
    for key, value in applied.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _selected(obj: dict[str, Any], selector: str) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    terms = [term.split("=", 1) for term in selector.split(",") if term]
    return all(labels.get(key) == value for key, value in terms)


def _handler(state: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            del args

        def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _status(self, code: int, reason: str, message: str) -> None:
            self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                              "reason": reason, "code": code})

        def _handle(self, method: str) -> None:
            url = urlsplit(self.path)
            query = dict(parse_qsl(url.query))
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            state.requests.append(Recorded(method, url.path, query, self.headers.get("Content-Type", ""), body))
            match = _OBJECT.match(url.path)
            if not match or match["plural"] not in state.served:
                self._status(404, "NotFound", f"the server could not find the requested resource ({url.path})")
                return
            collection = url.path.rsplit("/", 1)[0] if match["name"] else url.path
            if match["sub"] == "log":
                pod_path = url.path[: -len("/log")]
                if pod_path not in state.objects:
                    self._status(404, "NotFound", f'pods "{match["name"]}" not found')
                    return
                lines = state.logs.get(match["name"], "").splitlines(keepends=True)
                tail = int(query["tailLines"]) if "tailLines" in query else None
                self._send(200, "".join(lines[-tail:] if tail else lines), "text/plain")
            elif method == "GET" and not match["name"]:
                items = [copy.deepcopy(o) for p, o in state.objects.items()
                         if p.rsplit("/", 1)[0] == collection and _selected(o, query.get("labelSelector", ""))]
                for item in items:  # the real server leaves kind/apiVersion out of built-in list items
                    item.pop("kind", None), item.pop("apiVersion", None)
                self._send(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items})
            elif method == "GET":
                if url.path not in state.objects:
                    self._status(404, "NotFound", f'{match["plural"]} "{match["name"]}" not found')
                    return
                self._send(200, state.objects[url.path])
            elif method == "PATCH":
                if self.headers.get("Content-Type") != "application/apply-patch+yaml" or "fieldManager" not in query:
                    self._status(415, "UnsupportedMediaType", "only server-side apply is supported here")
                    return
                live = state.objects.get(url.path)
                if query.get("dryRun") == "All":  # admitted, not stored
                    self._send(200, _merge(live or {}, body))
                    return
                obj = state.add(body, url.path) if live is None else _merge(live, body)
                state.objects[url.path] = obj
                self._send(200, obj)
            elif method == "DELETE":
                if state.objects.pop(url.path, None) is None:
                    self._status(404, "NotFound", f'{match["plural"]} "{match["name"]}" not found')
                    return
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
            else:
                self._status(405, "MethodNotAllowed", method)

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            self._handle("GET")

        def do_PATCH(self) -> None:  # noqa: N802
            self._handle("PATCH")

        def do_DELETE(self) -> None:  # noqa: N802
            self._handle("DELETE")

    return Handler


class RunningServer:
    """Context manager: serve ``state`` on 127.0.0.1 and give a matching kubeconfig."""

    def __init__(self, state: FakeApiServer | None = None) -> None:
        self.state = state or FakeApiServer()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def write_kubeconfig(self, path: Path, *, namespace: str = "ml") -> Path:
        """A kubeconfig whose current context points at this server."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": namespace}}],
        }
        path.write_text(json.dumps(config))
        return path

    def client(self, *, namespace: str = "ml") -> Any:
        """A :class:`dino_ctl.kube.KubeClient` talking to this server through the real kubernetes client."""
        from kubernetes.client import ApiClient, Configuration

        from dino_ctl.kube import KubeClient

        configuration = Configuration(host=self.url)
        return KubeClient(ApiClient(configuration), namespace=namespace)
