"""The Kubeflow training-operator and kwok as processes against the test control plane (a helper, not a test).

:class:`TrainingOperator` runs ``training-operator`` (github.com/kubeflow/training-operator v1.9, built by
``scripts/k8s-stack.sh``) with only the PyTorchJob controller, its metrics and health endpoints on 127.0.0.1.
Its webhooks cannot be switched off: the cert-controller it embeds wants the Secret ``training-operator-webhook-cert``
in its namespace (``$MY_POD_NAMESPACE``) and the serving certificate files in the fixed directory
``/tmp/k8s-webhook-server/serving-certs``; we create the Secret (the operator fills it) and write the files (the
stack's own serving certificate). The ValidatingWebhookConfiguration is NOT installed, so the API server never calls
the webhook: PyTorchJobs are only checked by the CRD's schema. The webhook server itself listens on a free port on
every interface (controller-runtime's ``webhook.Options.Host`` has no flag); nothing connects to it.

:class:`Kwok` runs ``kwok`` (sigs.k8s.io/kwok v0.8.0) managing the nodes labelled ``type=kwok`` with the Stages in
:data:`POD_STAGES` (instead of kwok's defaults), which play the kubelet of a GPU node:

- a pod bound to a kwok node becomes Running (``pod-ready``);
- a Running pod labelled ``kwok.dino-ctl.test/auto-succeed=true`` (the label comes from the spec's
  ``metadata.labels``, which dino-ctl copies onto every pod) exits 0 after :data:`AUTO_SUCCEED_MS` (``pod-succeed``);
- a Running pod annotated ``kwok.dino-ctl.test/exit-code=N`` (the test writes it) exits with code N: phase
  Succeeded for 0, else Failed (``pod-exit``);
- a pod being deleted gracefully exits 143 first, as the trainer does when SIGTERM arrives (it checkpoints and
  exits 143), then disappears (``pod-terminate-gracefully``, ``pod-delete``).

:class:`Kueue` runs Kueue v0.17.0 (PyTorchJob integration only; see its docstring for what its certificates need).

All are stopped by PID (SIGTERM, then SIGKILL); their logs stay in the work directory for failure reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.stack import KubeStack, make_ca_and_serving_cert
from tests.processes import HOST, free_port, http_status, log_tail, stop_process, wait_ready

__all__ = [
    "ANNOTATION_EXIT_CODE",
    "AUTO_SUCCEED_MS",
    "GPU_PRODUCT",
    "GPU_PRODUCT_LABEL",
    "GPU_RESOURCE",
    "LABEL_AUTO_SUCCEED",
    "LABEL_POOL",
    "OPERATOR_NAMESPACE",
    "POD_STAGES",
    "WEBHOOK_CERT_DIR",
    "ComponentError",
    "Kueue",
    "Kwok",
    "TrainingOperator",
    "fake_gpu_node",
]

OPERATOR_VERSION = "v1.9.3"
KWOK_VERSION = "v0.8.0"
KUEUE_VERSION = "v0.17.0"
KUEUE_NAMESPACE = "kueue-system"
OPERATOR_NAMESPACE = "kubeflow"
WEBHOOK_SECRET = "training-operator-webhook-cert"
WEBHOOK_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")  # noqa: S108 (hard-coded in the operator's pkg/cert)

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
LABEL_POOL = "dino-ctl.test/pool"
"""Each test's fake nodes carry their own pool label (and the spec selects it), so tests never share nodes."""
LABEL_AUTO_SUCCEED = "kwok.dino-ctl.test/auto-succeed"
ANNOTATION_EXIT_CODE = "kwok.dino-ctl.test/exit-code"
AUTO_SUCCEED_MS = 1500
TERMINATION_MS = 500
"""SIGTERM to exit: the trainer's preemption checkpoint (minutes on a real cluster)."""
REMOVAL_MS = 1000
"""Container exit to the pod object's removal: the kubelet reports the terminal status, cleans up, then deletes."""


class ComponentError(RuntimeError):
    """A component did not start; the message names it and ends with its log."""


@dataclass
class _Component:
    name: str
    binary: Path
    workdir: Path
    popen: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> None:
        if not self.binary.is_file():
            raise ComponentError(f"{self.binary} is missing: build it with `bash scripts/k8s-stack.sh`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen([str(self.binary), *args], stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                          start_new_session=True)

    def _wait(self, ready: Any, *, what: str, timeout: float) -> None:
        assert self.popen is not None
        wait_ready(self.popen, ready, name=self.name, what=what, timeout=timeout, log=self.log, error=ComponentError)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 5 s: only this process, by PID."""
        stop_process(self.popen, grace=5)

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.name} ({self.log})\n{log_tail(self.log, lines)}"

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the running process (from /proc)."""
        assert self.popen is not None
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ensure_namespace(core: Any, name: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        core.create_namespace({"metadata": {"name": name}})
    except ApiException as exc:
        if exc.status != 409:
            raise


@dataclass
class TrainingOperator(_Component):
    """``training-operator --enable-scheme=pytorchjob`` against ``stack`` as its admin."""

    stack: KubeStack | None = None
    threads: int = 2
    qps: int = 50
    metrics_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    webhook_port: int = field(default_factory=free_port)

    @classmethod
    def for_stack(cls, stack: KubeStack, workdir: Path, **kwargs: Any) -> TrainingOperator:
        return cls("training-operator", stack.binaries / f"training-operator-{OPERATOR_VERSION}", workdir,
                   stack=stack, **kwargs)

    def prepare_webhook_certificates(self, admin_api: Any) -> None:
        """The Secret the embedded cert-controller fills and the certificate files its webhook server reads."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        assert self.stack is not None
        core = client.CoreV1Api(admin_api)
        _ensure_namespace(core, OPERATOR_NAMESPACE)
        try:
            core.create_namespaced_secret(OPERATOR_NAMESPACE, {"metadata": {"name": WEBHOOK_SECRET},
                                                               "type": "Opaque"})
        except ApiException as exc:
            if exc.status != 409:
                raise
        WEBHOOK_CERT_DIR.mkdir(parents=True, exist_ok=True)
        for source, target in (("apiserver.crt", "tls.crt"), ("apiserver.key", "tls.key")):
            partial = WEBHOOK_CERT_DIR / f".{target}.{os.getpid()}"
            partial.write_bytes((self.stack.pki / source).read_bytes())
            partial.replace(WEBHOOK_CERT_DIR / target)  # atomic: a running watcher never reads half a file

    def start(self, admin_api: Any, *, timeout: float = 90) -> TrainingOperator:
        assert self.stack is not None
        self.prepare_webhook_certificates(admin_api)
        self._spawn([
            f"-kubeconfig={self.stack.admin_kubeconfig}", "-enable-scheme=pytorchjob",
            f"-metrics-bind-address={HOST}:{self.metrics_port}",
            f"-health-probe-bind-address={HOST}:{self.health_port}",
            f"-webhook-server-port={self.webhook_port}", "-leader-elect=false",
            f"-controller-threads={self.threads}", f"-kube-api-qps={self.qps}", f"-kube-api-burst={self.qps * 2}",
            "-zap-log-level=info",
        ], env={"MY_POD_NAMESPACE": OPERATOR_NAMESPACE, "TMPDIR": "/tmp"})  # noqa: S108 (the operator's own)
        # /readyz answers 200 once the certificates are in place and the webhook server listens; the PyTorchJob
        # controller is registered right after (same goroutine), its informers sync within a second.
        self._wait(lambda: http_status(f"http://{HOST}:{self.health_port}/readyz") == 200,
                   what="/readyz (certificates ready, webhook server up)", timeout=timeout)
        self._wait(lambda: "Starting workers" in self.log.read_text(errors="replace"),
                   what="the PyTorchJob controller's workers", timeout=timeout)
        return self

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=5) as response:  # noqa: S310
            return response.read().decode()


def _pod_selector(*expressions: dict[str, Any]) -> dict[str, Any]:
    return {"matchExpressions": list(expressions)}


def _field(key: str, operator: str, *values: str) -> dict[str, Any]:
    expression: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        expression["values"] = list(values)
    return expression


_NOT_DELETING = _field(".metadata.deletionTimestamp", "DoesNotExist")
_RUNNING = _field(".status.phase", "In", "Running")

_RUNNING_STATUS = """\
{{ $now := Now }}
conditions:
- {lastTransitionTime: {{ $now | Quote }}, status: "True", type: Initialized}
- {lastTransitionTime: {{ $now | Quote }}, status: "True", type: Ready}
- {lastTransitionTime: {{ $now | Quote }}, status: "True", type: ContainersReady}
- {lastTransitionTime: {{ $now | Quote }}, status: "True", type: PodScheduled}
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  imageID: ""
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  started: true
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) \
( or .metadata.namespace "" ) | Quote }}
phase: Running
startTime: {{ $now | Quote }}
"""


def _terminated_status(exit_code: str, phase: str, reason: str) -> str:
    """A status template: every container terminated with ``exit_code`` (a template expression), pod ``phase``."""
    return f"""\
{{{{ $now := Now }}}}
{{{{ $code := {exit_code} }}}}
conditions:
- {{lastTransitionTime: {{{{ $now | Quote }}}}, status: "True", type: Initialized}}
- {{lastTransitionTime: {{{{ $now | Quote }}}}, status: "False", type: Ready, reason: PodCompleted}}
- {{lastTransitionTime: {{{{ $now | Quote }}}}, status: "False", type: ContainersReady, reason: PodCompleted}}
- {{lastTransitionTime: {{{{ $now | Quote }}}}, status: "True", type: PodScheduled}}
containerStatuses:
{{{{ range .status.containerStatuses }}}}
- image: {{{{ .image | Quote }}}}
  imageID: ""
  name: {{{{ .name | Quote }}}}
  ready: false
  restartCount: 0
  started: false
  state:
    terminated:
      exitCode: {{{{ $code }}}}
      reason: {reason}
      startedAt: {{{{ $now | Quote }}}}
      finishedAt: {{{{ $now | Quote }}}}
{{{{ end }}}}
phase: {phase}
"""


def _stage(name: str, selector: dict[str, Any], next_: dict[str, Any], *, delay_ms: int | None = None,
           weight: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"resourceRef": {"apiGroup": "v1", "kind": "Pod"}, "selector": selector, "next": next_}
    if delay_ms is not None:
        spec["delay"] = {"durationMilliseconds": delay_ms}
    if weight is not None:
        spec["weight"] = weight
    return {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage", "metadata": {"name": name}, "spec": spec}


_EXIT_CODE_JQ = f'.metadata.annotations["{ANNOTATION_EXIT_CODE}"]'
_EXIT_CODE_TEMPLATE = f'index .metadata.annotations "{ANNOTATION_EXIT_CODE}"'

POD_STAGES: list[dict[str, Any]] = [
    _stage("pod-ready", _pod_selector(
        _NOT_DELETING, _field(".status.phase", "In", "Pending"),
        _field('.status.conditions.[] | select( .type == "Ready" ) | .status', "NotIn", "True")),
        {"statusTemplate": _RUNNING_STATUS}, delay_ms=100),
    _stage("pod-succeed", _pod_selector(
        _NOT_DELETING, _RUNNING, _field(f'.metadata.labels["{LABEL_AUTO_SUCCEED}"]', "In", "true"),
        _field(_EXIT_CODE_JQ, "DoesNotExist")),
        {"statusTemplate": _terminated_status("0", "Succeeded", "Completed")}, delay_ms=AUTO_SUCCEED_MS),
    _stage("pod-exit-zero", _pod_selector(_NOT_DELETING, _RUNNING, _field(_EXIT_CODE_JQ, "In", "0")),
           {"statusTemplate": _terminated_status("0", "Succeeded", "Completed")}),
    _stage("pod-exit", _pod_selector(_NOT_DELETING, _RUNNING, _field(_EXIT_CODE_JQ, "Exists"),
                                     _field(_EXIT_CODE_JQ, "NotIn", "0")),
           {"statusTemplate": _terminated_status(_EXIT_CODE_TEMPLATE, "Failed", "Error")}),
    # Graceful deletion: SIGTERM reaches the trainer, which checkpoints and exits 143; then the pod goes.
    _stage("pod-terminate-gracefully", _pod_selector(_field(".metadata.deletionTimestamp", "Exists"), _RUNNING),
           {"statusTemplate": _terminated_status("143", "Failed", "Error")}, delay_ms=TERMINATION_MS),
    _stage("pod-delete", _pod_selector(_field(".metadata.deletionTimestamp", "Exists"),
                                       _field(".status.phase", "NotIn", "Running")),
           {"delete": True}, delay_ms=REMOVAL_MS),
]

NODE_STAGES_SOURCE = "kustomize/stage/node/fast/node-initialize.yaml"


def _node_initialize_stage() -> dict[str, Any]:
    """kwok's own node-initialize Stage (Ready, addresses, the capacity the node object declares)."""
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage", "metadata": {"name": "node-initialize"},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Node"},
            "selector": _pod_selector(_field('.status.conditions.[] | select( .type == "Ready" ) | .status',
                                             "NotIn", "True")),
            "next": {"statusTemplate": """\
{{ $now := Now }}
{{ $lastTransitionTime := or .metadata.creationTimestamp $now }}
conditions:
{{ range NodeConditions }}
- lastHeartbeatTime: {{ $now | Quote }}
  lastTransitionTime: {{ $lastTransitionTime | Quote }}
  message: {{ .message | Quote }}
  reason: {{ .reason | Quote }}
  status: {{ .status | Quote }}
  type: {{ .type  | Quote}}
{{ end }}
addresses:
- {address: {{ NodeIP | Quote }}, type: InternalIP}
- {address: {{ NodeName | Quote }}, type: Hostname}
allocatable:
{{ YAML .status.allocatable 1 }}
capacity:
{{ YAML .status.capacity 1 }}
nodeInfo:
  architecture: amd64
  kubeletVersion: kwok
  operatingSystem: linux
phase: Running
"""},
        },
    }


@dataclass
class Kwok(_Component):
    """``kwok`` managing the nodes labelled ``type=kwok`` with :data:`POD_STAGES`."""

    stack: KubeStack | None = None
    port: int = field(default_factory=free_port)

    @classmethod
    def for_stack(cls, stack: KubeStack, workdir: Path) -> Kwok:
        return cls("kwok", stack.binaries / f"kwok-{KWOK_VERSION}", workdir, stack=stack)

    @property
    def config(self) -> Path:
        return self.workdir / "kwok.yaml"

    def start(self, *, timeout: float = 60) -> Kwok:
        assert self.stack is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        documents = [{"apiVersion": "config.kwok.x-k8s.io/v1alpha1", "kind": "KwokConfiguration",
                      "options": {"cidr": "10.0.0.0/16", "nodeIP": "10.255.0.1",
                                  "podPlayStageParallelism": 8, "nodePlayStageParallelism": 4,
                                  "nodeLeaseParallelism": 4, "podsOnNodeSyncParallelism": 2,
                                  "nodeLeaseDurationSeconds": 40, "enableDebuggingHandlers": False,
                                  "enableProfilingHandler": False}},
                     _node_initialize_stage(), *POD_STAGES]
        self.config.write_text(yaml.safe_dump_all(documents, sort_keys=False))
        self._spawn([f"--kubeconfig={self.stack.admin_kubeconfig}", f"--config={self.config}",
                     "--manage-nodes-with-label-selector=type=kwok", f"--server-address={HOST}:{self.port}",
                     "--node-lease-duration-seconds=40"])
        self._wait(lambda: http_status(f"http://{HOST}:{self.port}/healthz") == 200, what="/healthz",
                   timeout=timeout)
        return self


@dataclass
class Kueue(_Component):
    """Kueue (sigs.k8s.io/kueue v0.17.0) with only the PyTorchJob integration, every port on 127.0.0.1.

    Its admission webhooks are not registered with the API server (no Mutating/ValidatingWebhookConfiguration):
    dino-ctl creates queued jobs suspended itself. Two things cannot be left out: the embedded cert-controller waits
    until it has put its CA into the conversion webhooks of five Kueue CRDs (v1beta1 <-> v1beta2), so those CRDs
    are installed with a conversion webhook (an URL on 127.0.0.1, Kueue's own webhook server); and the certificate
    it serves must be one the API server accepts for that URL, so we pre-fill its Secret with a CA and a serving
    certificate for both the in-cluster service name and 127.0.0.1 (the rotator keeps a valid pair). The visibility
    API server (an aggregated API on all interfaces) is switched off with its feature gate.
    """

    stack: KubeStack | None = None
    health_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    webhook_port: int = field(default_factory=free_port)

    CONVERTED = ("localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters")

    @classmethod
    def for_stack(cls, stack: KubeStack, workdir: Path) -> Kueue:
        return cls("kueue", stack.binaries / f"kueue-{KUEUE_VERSION}", workdir, stack=stack)

    @property
    def certs(self) -> Path:
        return self.workdir / "certs"

    def _certificates(self) -> None:
        # Valid for a year: the rotator replaces a pair that expires within 90 days.
        make_ca_and_serving_cert(self.certs, ca_subject="/CN=kueue-test-ca", subject="/CN=kueue-webhook", stem="tls",
                                 alt_names=f"DNS:kueue-webhook-service.{KUEUE_NAMESPACE}.svc,IP:{HOST}", days=365)

    def _b64(self, name: str) -> str:
        import base64

        return base64.b64encode((self.certs / name).read_bytes()).decode()

    def crds(self) -> list[dict[str, Any]]:
        """Kueue's CRDs from its module (the Go module proxy), the converted ones with the conversion webhook."""
        out = subprocess.run(["go", "mod", "download", "-json", f"sigs.k8s.io/kueue@{KUEUE_VERSION}"],
                             capture_output=True, text=True, check=True, cwd="/")
        folder = Path(json.loads(out.stdout)["Dir"]) / "config" / "components" / "crd" / "bases"
        conversion = {"strategy": "Webhook", "webhook": {"conversionReviewVersions": ["v1"], "clientConfig": {
            "url": f"https://{HOST}:{self.webhook_port}/convert", "caBundle": self._b64("ca.crt")}}}
        found = []
        for path in sorted(folder.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    if doc["spec"]["names"]["plural"] in self.CONVERTED:
                        doc["spec"]["conversion"] = conversion
                    found.append(doc)
        return found

    def start(self, admin_api: Any, install_crds: Any, *, timeout: float = 90) -> Kueue:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        assert self.stack is not None
        self._certificates()
        install_crds(self.crds())
        core = client.CoreV1Api(admin_api)
        _ensure_namespace(core, KUEUE_NAMESPACE)
        secret = {"metadata": {"name": "kueue-webhook-server-cert"},
                  "data": {name: self._b64(name) for name in ("ca.crt", "ca.key", "tls.crt", "tls.key")}}
        try:
            core.create_namespaced_secret(KUEUE_NAMESPACE, secret)
        except ApiException as exc:
            if exc.status != 409:
                raise
            core.replace_namespaced_secret("kueue-webhook-server-cert", KUEUE_NAMESPACE, secret)
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": KUEUE_NAMESPACE,
            "health": {"healthProbeBindAddress": f"{HOST}:{self.health_port}"},
            "metrics": {"bindAddress": f"{HOST}:{self.metrics_port}"},
            "webhook": {"port": self.webhook_port, "host": HOST, "certDir": str(self.certs)},
            "leaderElection": {"leaderElect": False},
            "integrations": {"frameworks": ["kubeflow.org/pytorchjob"]},
        }
        (self.workdir / "kueue.yaml").write_text(yaml.safe_dump(config))
        self._spawn([f"--config={self.workdir / 'kueue.yaml'}", f"--kubeconfig={self.stack.admin_kubeconfig}",
                     "--feature-gates=VisibilityOnDemand=false", "--zap-log-level=info"])
        log = lambda: self.log.read_text(errors="replace")  # noqa: E731
        self._wait(lambda: "CA certs are injected to webhooks" in log(), what="its certificates", timeout=timeout)
        self._wait(lambda: any('"logger":"pytorchjob"' in line and "Starting workers" in line
                               for line in log().splitlines()), what="its PyTorchJob controller", timeout=timeout)
        return self


def fake_gpu_node(name: str, pool: str, *, gpus: int = 8, cpu: str = "192", memory: str = "2Ti",
                  extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A Node kwok manages: ``gpus`` x nvidia.com/gpu, the GPU pool's product label and NoSchedule taint."""
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", GPU_RESOURCE: str(gpus)}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", GPU_PRODUCT_LABEL: GPU_PRODUCT, LABEL_POOL: pool,
                       **(extra_labels or {})},
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}]},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
