"""The kopf controller as the chart installs it, for the tests against the real API server (a helper, not a test).

:func:`install_chart_identity` creates the chart's ServiceAccount, Role and RoleBinding in a namespace exactly as the
project renders ``charts/dino-ctl`` for a release there, and returns a kubeconfig holding a token the TokenRequest
API issued for that ServiceAccount: what the controller's pod would mount. :class:`ControllerProcess` runs
``python -m dino_ctl.controller`` with it as a subprocess, its health and metrics endpoints on 127.0.0.1, and stops
exactly that process (by PID).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.processes import HOST, REPO, free_port, http_status, stop_process

__all__ = ["ChartIdentity", "ControllerProcess", "chart_objects", "install_chart_identity", "listening_addresses"]

CHART_DIR = REPO / "charts" / "dino-ctl"


def chart_objects(namespace: str, values: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """``charts/dino-ctl`` rendered by the project for a release in ``namespace`` (template file -> objects)."""
    from dino_ctl.controller.manifests import render_chart

    return render_chart(CHART_DIR, values, namespace=namespace)


@dataclass(frozen=True)
class ChartIdentity:
    """The chart's ServiceAccount in one namespace: its Role's rules, a token and a kubeconfig with that token."""

    namespace: str
    service_account: str
    role: dict[str, Any]
    token: str
    kubeconfig: Path

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` authenticated as the ServiceAccount."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def install_chart_identity(dynamic: Any, admin_api: Any, namespace: str, kubeconfig_for: Any,
                           values: dict[str, Any] | None = None) -> ChartIdentity:
    """Apply the chart's ServiceAccount, Role and RoleBinding (server-side, as the admin) and issue a token."""
    from kubernetes import client

    rendered = chart_objects(namespace, values)
    objects = rendered["serviceaccount.yaml"] + rendered["rbac.yaml"]
    for obj in objects:
        api = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        api.server_side_apply(body=obj, name=obj["metadata"]["name"], namespace=namespace, field_manager="helm")
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    (role,) = [o for o in objects if o["kind"] == "Role"]
    name = account["metadata"]["name"]
    request = client.CoreV1Api(admin_api).create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": 3600}})
    token = request.status.token
    return ChartIdentity(namespace, name, role, token, kubeconfig_for(namespace, token))


@dataclass
class ControllerProcess:
    """``python -m dino_ctl.controller`` for one namespace, authenticated by ``kubeconfig``; restartable."""

    kubeconfig: Path
    namespace: str
    log_dir: Path
    interval: float = 1.0
    health_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    popen: subprocess.Popen | None = None
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.log_dir / f"controller-{self.starts}.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dino_ctl.controller", "--namespace", self.namespace,
                "--bind-address", HOST, "--health-port", str(self.health_port),
                "--metrics-port", str(self.metrics_port), "--interval", str(self.interval), "--log-level", "DEBUG"]

    def start(self, *, wait: bool = True) -> ControllerProcess:
        assert self.popen is None or self.popen.poll() is not None, "already running"
        self.starts += 1
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until kopf's /healthz answers 200 (the operator has started and its watches are up)."""
        deadline = time.monotonic() + timeout
        url = f"http://{HOST}:{self.health_port}/healthz"
        while time.monotonic() < deadline:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise AssertionError(f"the controller exited with {self.popen.returncode}:\n{self.tail()}")
            if http_status(url) == 200:
                return
            time.sleep(0.1)
        raise AssertionError(f"the controller's {url} did not answer in {timeout:.0f} s:\n{self.tail()}")

    def metrics(self) -> str:
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback)
            return response.read().decode()

    def kill(self) -> None:
        """SIGKILL: no shutdown handler, no cleanup; whatever was in flight is cut off."""
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (kopf stops gracefully), SIGKILL after 10 s; only this process, by PID."""
        stop_process(self.popen, grace=10)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.log_dir.glob("controller-*.log")))


def listening_addresses(ports: set[int]) -> set[tuple[str, int]]:
    """``(address, port)`` of every listening TCP socket on one of ``ports`` (read from /proc/net/tcp{,6})."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, port = local.split(":")
            if state != "0A" or int(port, 16) not in ports:  # 0A: LISTEN
                continue
            found.add((_address(address, width), int(port, 16)))
    return found


def _address(hex_address: str, width: int) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_address)
    if width == 8:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


class AdmissionGate:
    """A validating admission webhook on 127.0.0.1 that holds the first real CREATE of a kind until released.

    While it holds, the client that sent the request (the controller) is stuck in the middle of its pass, exactly
    between two API calls: the moment to kill it. Served with the stack's own serving certificate (it names
    127.0.0.1) and trusted through the stack's CA. Dry-run requests pass at once (they probe that it is active).
    """

    def __init__(self, stack: Any, namespace: str, *, group: str, version: str, resource: str) -> None:
        import threading

        self.stack, self.namespace = stack, namespace
        self.rule = {"apiGroups": [group], "apiVersions": [version], "operations": ["CREATE"],
                     "resources": [resource], "scope": "Namespaced"}
        self.name = f"gate-{namespace}"
        self.held = threading.Event()
        self.release = threading.Event()
        self.requests: list[dict[str, Any]] = []
        self._server: Any = None

    def _handler(self) -> type:
        import json
        from http.server import BaseHTTPRequestHandler

        gate = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                del args

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = review["request"]
                gate.requests.append(request)
                if not request.get("dryRun") and not gate.held.is_set():
                    gate.held.set()
                    gate.release.wait(timeout=20)
                body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                   "response": {"uid": request["uid"], "allowed": True}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def __enter__(self) -> AdmissionGate:
        import base64
        import ssl
        import threading
        from http.server import ThreadingHTTPServer

        self._server = ThreadingHTTPServer((HOST, 0), self._handler())
        self._server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.stack.pki / "apiserver.crt", self.stack.pki / "apiserver.key")
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        port = self._server.server_address[1]
        from kubernetes import client

        from tests.cluster.conftest import api_client

        self._admission = client.AdmissionregistrationV1Api(api_client(self.stack))
        self._admission.create_validating_webhook_configuration({
            "metadata": {"name": self.name},
            "webhooks": [{
                "name": "gate.dino-ctl.test",
                "clientConfig": {"url": f"https://{HOST}:{port}/validate",
                                 "caBundle": base64.b64encode(self.stack.ca_file.read_bytes()).decode()},
                "rules": [self.rule],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.namespace}},
                "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Fail",
                "timeoutSeconds": 25,
            }],
        })
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self._admission.delete_validating_webhook_configuration(self.name)
        self._server.shutdown()
        self._server.server_close()


class AddedRecorder:
    """Watches kinds in a namespace (as the admin) and records the uid of every object ADDED, by ``Kind/name``."""

    def __init__(self, admin_api: Any, namespace: str) -> None:
        self.admin_api, self.namespace = admin_api, namespace
        self.added: dict[str, list[str]] = {}
        self.error: Exception | None = None
        self._stopped = False
        self._watches: list[Any] = []
        self._threads: list[Any] = []

    def _record(self, kind: str, list_call: Any, *args: Any) -> None:
        from kubernetes import watch

        stream = watch.Watch()
        self._watches.append(stream)
        try:
            for event in stream.stream(list_call, *args, timeout_seconds=300):
                obj = event["object"]
                meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata.to_dict()
                if event["type"] == "ADDED":
                    uids = self.added.setdefault(f"{kind}/{meta['name']}", [])
                    if meta["uid"] not in uids:
                        uids.append(meta["uid"])
        except Exception as exc:  # the stream is cut when the stack stops; before that it is a failure
            if not self._stopped:
                self.error = exc

    def __enter__(self) -> AddedRecorder:
        import threading

        from kubernetes import client

        core, custom = client.CoreV1Api(self.admin_api), client.CustomObjectsApi(self.admin_api)
        for kind, call, args in (
            ("ConfigMap", core.list_namespaced_config_map, (self.namespace,)),
            ("PyTorchJob", custom.list_namespaced_custom_object, ("kubeflow.org", "v1", self.namespace, "pytorchjobs")),
        ):
            thread = threading.Thread(target=self._record, args=(kind, call, *args), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stopped = True
        for stream in self._watches:
            stream.stop()
        assert self.error is None, f"a watch failed: {self.error!r}"
