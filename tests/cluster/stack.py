"""A real Kubernetes control plane on 127.0.0.1 for the tests: etcd, kube-apiserver, controller manager, scheduler.

The binaries come from ``scripts/k8s-stack.sh`` (built from the Go module proxy, cached outside the repository).
:class:`KubeStack` generates its own PKI with ``openssl`` (a CA, the API server's serving certificate for 127.0.0.1,
a service-account signing key), starts the four processes with every port on 127.0.0.1, waits for ``/readyz``,
writes an admin kubeconfig (a static token in ``system:masters``) and stops exactly the processes it started, by PID.

The API server runs what a cluster runs and a fake cannot: RBAC authorization, the default admission chain with
PodSecurity, the ServiceAccount admission and the TokenRequest API; the controller manager adds garbage collection,
namespace deletion and service-account tokens; the scheduler binds pods to nodes.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.processes import HOST, REPO, free_port, http_status, log_tail, stack_script_output, wait_ready

__all__ = ["ADMIN_TOKEN", "KubeStack", "StackError", "bin_dir", "crd_dir", "free_port", "kubeconfig"]

ADMIN_TOKEN = "dino-ctl-test-admin"  # noqa: S105 (a test cluster's static token, loopback only)
SERVICE_CIDR = "10.96.0.0/16"


class StackError(RuntimeError):
    """The control plane could not be started; the message names the piece and its log."""


def bin_dir() -> Path:
    """Where ``scripts/k8s-stack.sh`` puts the binaries (``$DINO_CTL_K8S_BIN`` overrides)."""
    configured = os.environ.get("DINO_CTL_K8S_BIN")
    return Path(configured) if configured else stack_script_output("--print")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca_and_serving_cert(directory: Path, *, ca_subject: str, subject: str, alt_names: str, stem: str,
                             days: int) -> None:
    """``ca.key``/``ca.crt`` and a serving certificate ``<stem>.key``/``<stem>.crt`` it signs for ``alt_names``."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days",
             str(days), "-subj", ca_subject, cwd=directory)
    (directory / "san.cnf").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        f"subjectAltName={alt_names}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
             "-subj", subject, cwd=directory)
    _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{stem}.crt", "-days", str(days), "-extfile", "san.cnf", cwd=directory)


def make_pki(directory: Path) -> None:
    """CA, API-server serving certificate (127.0.0.1, localhost, the service IP) and a service-account key pair."""
    make_ca_and_serving_cert(
        directory, ca_subject="/CN=dino-ctl-test-ca", subject="/CN=kube-apiserver", stem="apiserver", days=2,
        alt_names="IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
                  "DNS:kubernetes.default.svc")
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=directory)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)


def kubeconfig(server: str, ca_file: Path, token: str, *, namespace: str = "default", user: str = "admin") -> dict:
    """A kubeconfig (as a dict) for ``server`` with a bearer token."""
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": user, "namespace": namespace}}],
    }


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen
    log: Path


@dataclass
class KubeStack:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler in ``workdir``; use as a context manager."""

    workdir: Path
    binaries: Path = field(default_factory=bin_dir)
    processes: list[_Process] = field(default_factory=list)
    api_port: int = 0
    startup_seconds: float = 0.0

    @property
    def server(self) -> str:
        return f"https://{HOST}:{self.api_port}"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> KubeStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        started = time.monotonic()
        missing = [name for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
                   if not (self.binaries / name).is_file()]
        if missing:
            raise StackError(f"Kubernetes binaries missing in {self.binaries}: {', '.join(missing)}; "
                             "build them with `bash scripts/k8s-stack.sh` (part of scripts/setup.sh)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        make_pki(self.pki)
        (self.workdir / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"\n')
        self.api_port = free_port()
        self.admin_kubeconfig.write_text(json.dumps(kubeconfig(self.server, self.ca_file, ADMIN_TOKEN)))
        etcd_url = self._start_etcd()
        self._start_apiserver(etcd_url)
        self._wait_ready()
        self._start_controller_manager()
        self._start_scheduler()
        self._wait_default_service_account()
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Stop every process this stack started (by PID; SIGTERM, then SIGKILL after 3 s), in reverse order."""
        for proc in reversed(self.processes):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3  # a test stack keeps nothing worth a graceful shutdown
        for proc in reversed(self.processes):
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        self.processes.clear()

    # -- pieces ------------------------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> _Process:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as handle:  # the child keeps its own descriptor
            popen = subprocess.Popen([str(self.binaries / name), *args], stdout=handle,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        proc = _Process(name, popen, log)
        self.processes.append(proc)
        return proc

    def _start_etcd(self) -> str:
        client, peer = free_port(), free_port()
        client_url, peer_url = f"http://{HOST}:{client}", f"http://{HOST}:{peer}"
        proc = self._spawn("etcd", [
            f"--data-dir={self.workdir / 'etcd'}", f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}", f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}", f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync", "--quota-backend-bytes=2147483648", "--log-level=warn",
        ])
        self._poll(proc, lambda: http_status(f"{client_url}/health") == 200, what="etcd /health", timeout=60)
        return client_url

    def _start_apiserver(self, etcd_url: str) -> None:
        pki = self.pki
        self._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}", f"--bind-address={HOST}", f"--advertise-address={HOST}",
            f"--secure-port={self.api_port}", f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}", f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={self.workdir / 'tokens.csv'}", "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            # The default admission chain (PodSecurity and ServiceAccount included) stays on, plus what hardened
            # clusters add: setting blockOwnerDeletion needs `update` on the owner's finalizers.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            "--allow-privileged=true", "--profiling=false", "--watch-cache=true",
            "--endpoint-reconciler-type=none", "--v=1",
        ])

    def _wait_ready(self) -> None:
        apiserver = next(p for p in self.processes if p.name == "kube-apiserver")
        context = ssl.create_default_context(cafile=str(self.ca_file))
        self._poll(apiserver, lambda: http_status(f"{self.server}/readyz", token=ADMIN_TOKEN, context=context) == 200,
                   what="kube-apiserver /readyz", timeout=120)

    def _start_controller_manager(self) -> None:
        pki = self.pki
        kubeconfig_path = str(self.admin_kubeconfig)
        self._spawn("kube-controller-manager", [
            f"--kubeconfig={kubeconfig_path}", f"--authentication-kubeconfig={kubeconfig_path}",
            f"--authorization-kubeconfig={kubeconfig_path}", f"--bind-address={HOST}",
            f"--secure-port={free_port()}", "--leader-elect=false",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--use-service-account-credentials=false",
            # Everything a cluster runs, minus what needs a cloud or a kubelet's certificates.
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller",
            "--concurrent-gc-syncs=5", "--v=1",
        ])

    def _start_scheduler(self) -> None:
        kubeconfig_path = str(self.admin_kubeconfig)
        self._spawn("kube-scheduler", [
            f"--kubeconfig={kubeconfig_path}", f"--authentication-kubeconfig={kubeconfig_path}",
            f"--authorization-kubeconfig={kubeconfig_path}", f"--bind-address={HOST}",
            f"--secure-port={free_port()}", "--leader-elect=false", "--v=1",
        ])

    def _wait_default_service_account(self) -> None:
        """The controller manager is working once it has made the ``default`` namespace's ServiceAccount."""
        manager = next(p for p in self.processes if p.name == "kube-controller-manager")
        context = ssl.create_default_context(cafile=str(self.ca_file))
        url = f"{self.server}/api/v1/namespaces/default/serviceaccounts/default"
        self._poll(manager, lambda: http_status(url, token=ADMIN_TOKEN, context=context) == 200,
                   what="the default ServiceAccount (controller manager)", timeout=90)

    def _poll(self, proc: _Process, ready: Any, *, what: str, timeout: float) -> None:
        wait_ready(proc.popen, ready, name=proc.name, what=what, timeout=timeout, log=proc.log, error=StackError)

    def logs(self) -> str:
        """The last lines of every process's log (for a failing test's report)."""
        return "\n".join(f"--- {p.name} ({p.log})\n{log_tail(p.log)}" for p in self.processes)

    def kubectl(self) -> Path | None:
        """The kubectl of the same release, when it was built."""
        path = self.binaries / "kubectl"
        return path if path.is_file() else None


def crd_dir() -> Path:
    """The upstream CRDs ``scripts/k8s-stack.sh`` downloads from the Go module proxy."""
    return stack_script_output("--print-crds")
