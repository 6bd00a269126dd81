"""How the in-cluster controller scales: N concurrent three-stage experiments on fake GPU nodes, to completion.

Runs the project's test control plane (``tests/cluster/stack.py``: etcd, kube-apiserver, controller manager,
scheduler on 127.0.0.1, binaries from ``scripts/k8s-stack.sh``) with the real Kubeflow training-operator and kwok
(``tests/cluster/training/training_components.py``: nodes with 8 x nvidia.com/gpu, pods that run and exit 0 after
1.5 s), then, for each size in ``--sizes`` (default 10 then 50, in this one run), a fresh controller
(``python -m dino_ctl.controller`` with the chart's ServiceAccount and Role, as in the cluster tests) in a fresh
namespace, and N DinoExperiments applied at once. Measured per size:

- ``reaction_seconds``: p50/p99/max of the time from a job's terminal state (the operator's ``Succeeded``, as a watch
  in this process sees it) to the controller's next action (the next stage's job created, or for the last stage the
  experiment's status ``Succeeded``), seen by the same watches;
- ``api_requests_per_experiment``: every request the controller's identity made (kube-apiserver audit log: kopf's
  watches, patches and events plus dino-ctl's reads and writes), divided by N, and the same by verb;
- ``controller_cpu_seconds``, ``controller_peak_rss_mib`` (/proc of the controller process), ``wall_seconds``.

Prints one JSON object. ``--interval`` is the controller's periodic pass (jobs change state without touching the
DinoExperiment, so the pass is what notices a finished stage: the reaction time is bounded by it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the control plane and its components are defined with the cluster tests

from bench._cli import positive_int  # noqa: E402

STAGES = ("pretrain", "highres", "distill")
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
"""


def _stack_class() -> type:
    from tests.cluster.stack import KubeStack

    class AuditedStack(KubeStack):
        """The test control plane with an audit log of every request made by a ServiceAccount (the controller)."""

        def _spawn(self, name: str, args: list[str]) -> Any:
            if name == "kube-apiserver":
                policy = self.workdir / "audit-policy.yaml"
                policy.write_text(AUDIT_POLICY)
                args = [*args, f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                        "--audit-log-format=json", "--audit-log-mode=batch", "--audit-log-batch-max-wait=1s"]
            return super()._spawn(name, args)

        @property
        def audit_log(self) -> Path:
            return self.workdir / "audit.log"

    return AuditedStack


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Timeline:
    """Watches PyTorchJobs and DinoExperiments of a namespace; first-arrival times of the moments that matter."""

    def __init__(self, admin_api: Any, namespace: str) -> None:
        self.admin_api, self.namespace = admin_api, namespace
        self.job_added: dict[str, float] = {}
        self.job_succeeded: dict[str, float] = {}
        self.experiment_succeeded: dict[str, float] = {}
        self._streams: list[Any] = []
        self._stopped = False
        self.errors: list[Exception] = []

    def _watch(self, plural: str, group: str, version: str, record: Any) -> None:
        from kubernetes import client, watch

        stream = watch.Watch()
        self._streams.append(stream)
        api = client.CustomObjectsApi(self.admin_api)
        try:
            for event in stream.stream(api.list_namespaced_custom_object, group, version, self.namespace, plural,
                                       timeout_seconds=3600, _request_timeout=3700):
                record(event["type"], event["object"], time.monotonic())
        except Exception as exc:
            if not self._stopped:
                self.errors.append(exc)

    def _job(self, kind: str, obj: dict[str, Any], now: float) -> None:
        name = obj["metadata"]["name"]
        if kind == "ADDED":
            self.job_added.setdefault(name, now)
        conditions = (obj.get("status") or {}).get("conditions") or []
        if any(c["type"] == "Succeeded" and c["status"] == "True" for c in conditions):
            self.job_succeeded.setdefault(name, now)

    def _experiment(self, kind: str, obj: dict[str, Any], now: float) -> None:
        del kind
        if (obj.get("status") or {}).get("phase") == "Succeeded":
            self.experiment_succeeded.setdefault(obj["metadata"]["name"], now)

    def start(self) -> Timeline:
        for args in (("pytorchjobs", "kubeflow.org", "v1", self._job),
                     ("dinoexperiments", "dino-ctl.io", "v1alpha1", self._experiment)):
            threading.Thread(target=self._watch, args=args, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped = True
        for stream in self._streams:
            stream.stop()

    def reactions(self, experiments: list[str]) -> list[float]:
        """Seconds from each job's Succeeded to the controller's next action."""
        found = []
        for name in experiments:
            jobs = [f"{name}-{stage}" for stage in STAGES]
            for job, next_job in zip(jobs, jobs[1:], strict=False):
                found.append(self.job_added[next_job] - self.job_succeeded[job])
            found.append(self.experiment_succeeded[name] - self.job_succeeded[jobs[-1]])
        return found


def experiment_document(name: str, namespace: str, pool: str) -> dict[str, Any]:
    from tests.cluster.training.training_components import (
        GPU_PRODUCT,
        GPU_PRODUCT_LABEL,
        GPU_RESOURCE,
        LABEL_AUTO_SUCCEED,
        LABEL_POOL,
    )
    from tests.dino_ctl.spec_helpers import document

    doc = document(resources={
        "nodes": {"min": 2, "max": 2}, "gpusPerNode": 8, "cpu": "16", "memory": "64Gi",
        "nodeSelector": {GPU_PRODUCT_LABEL: GPU_PRODUCT, LABEL_POOL: pool},
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]})
    doc["metadata"].update(name=name, namespace=namespace, labels={LABEL_AUTO_SUCCEED: "true"})
    return doc


def _proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])  # kB
    raise KeyError(field)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def audit_requests(log: Path, username: str) -> Counter:
    """Requests of ``username`` in the audit log, by verb."""
    verbs: Counter = Counter()
    if not log.exists():
        return verbs
    with log.open() as handle:
        for line in handle:
            event = json.loads(line)
            if event.get("user", {}).get("username") == username:
                verbs[event["verb"]] += 1
    return verbs


def run_size(stack: Any, admin_api: Any, dynamic: Any, size: int, *, interval: float, workers: int, pool: str,
             workdir: Path, timeout: float) -> dict[str, Any]:
    from kubernetes import client

    from dino_ctl.kube import KubeClient
    from tests.cluster.controller_process import ControllerProcess, install_chart_identity
    from tests.cluster.stack import ADMIN_TOKEN, kubeconfig

    namespace = f"scale-{size}"
    core = client.CoreV1Api(admin_api)
    core.create_namespace({"metadata": {"name": namespace}})
    deadline = time.monotonic() + 30
    while not core.list_namespaced_service_account(namespace).items and time.monotonic() < deadline:
        time.sleep(0.1)

    def kubeconfig_for(ns: str, token: str | None = None) -> Path:
        path = workdir / f"kubeconfig-{ns}-{'sa' if token else 'admin'}"
        path.write_text(json.dumps(kubeconfig(stack.server, stack.ca_file, token or ADMIN_TOKEN, namespace=ns)))
        return path

    identity = install_chart_identity(dynamic, admin_api, namespace, kubeconfig_for)
    username = f"system:serviceaccount:{namespace}:{identity.service_account}"
    log_dir = workdir / f"controller-{size}"
    log_dir.mkdir()
    controller = ControllerProcess(identity.kubeconfig, namespace, log_dir, interval=interval)
    controller.command = lambda: [  # type: ignore[method-assign]  # INFO: DEBUG logging is a cost of its own
        sys.executable, "-m", "dino_ctl.controller", "--namespace", namespace, "--bind-address", "127.0.0.1",
        "--health-port", str(controller.health_port), "--metrics-port", str(controller.metrics_port),
        "--interval", str(interval), "--workers", str(workers), "--log-level", "INFO"]
    controller.start()
    pid = controller.popen.pid  # type: ignore[union-attr]
    cpu_before = _cpu_seconds(pid)
    timeline = Timeline(admin_api, namespace).start()
    time.sleep(1)  # the watches are up
    kube = KubeClient(admin_api, namespace=namespace)
    names = [f"exp-{index:03d}" for index in range(size)]
    started = time.monotonic()
    for name in names:
        kube.apply(experiment_document(name, namespace, pool))
    try:
        while len(timeline.experiment_succeeded) < size:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{size} experiments: only {len(timeline.experiment_succeeded)} succeeded after "
                                   f"{timeout:.0f} s; controller log:\n{controller.tail(40)}")
            if controller.popen.poll() is not None:  # type: ignore[union-attr]
                raise RuntimeError(f"the controller exited:\n{controller.tail(40)}")
            time.sleep(0.5)
        wall = time.monotonic() - started
        cpu = _cpu_seconds(pid) - cpu_before
        peak_rss_kib = _proc_status(pid, "VmHWM")
    finally:
        timeline.stop()
        controller.stop()
    time.sleep(2.5)  # the audit log's batches (max wait 1 s) reach the file
    verbs = audit_requests(stack.audit_log, username)
    total = sum(verbs.values())
    reactions = timeline.reactions(names)
    return {
        "experiments": size,
        "jobs": 3 * size,
        "wall_seconds": round(wall, 1),
        "reaction_seconds": {"p50": round(percentile(reactions, 50), 3), "p99": round(percentile(reactions, 99), 3),
                             "max": round(max(reactions), 3), "mean": round(statistics.fmean(reactions), 3),
                             "samples": len(reactions)},
        "api_requests_per_experiment": round(total / size, 1),
        "api_requests_per_experiment_by_verb": {verb: round(count / size, 1) for verb, count in sorted(verbs.items())},
        "api_requests_total": total,
        "controller_cpu_seconds": round(cpu, 2),
        "controller_cpu_seconds_per_experiment": round(cpu / size, 3),
        "controller_peak_rss_mib": round(peak_rss_kib / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[10, 50],
                        help="numbers of concurrent experiments, each run with a fresh controller (default 10 50)")
    parser.add_argument("--nodes", type=positive_int, default=200, help="fake GPU nodes (8 GPUs each)")
    parser.add_argument("--interval", type=float, default=2.0, help="the controller's periodic pass, seconds")
    parser.add_argument("--workers", type=positive_int, default=16, help="the controller's --workers")
    parser.add_argument("--timeout", type=float, default=600.0, help="per size, seconds")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the logs here (default: a temp dir)")
    args = parser.parse_args(argv)

    from kubernetes import client
    from kubernetes.dynamic import DynamicClient

    from tests.cluster.conftest import api_client, install_crds, load_yaml_documents, upstream_crd_folder
    from tests.cluster.training.training_components import Kwok, TrainingOperator, fake_gpu_node
    from dino_ctl.schema import crd_manifest

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="controller-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = _stack_class()(workdir / "stack")
    operator = kwok = None
    try:
        stack.start()
        admin_api = api_client(stack)
        dynamic = DynamicClient(admin_api)
        crds = [doc for path in sorted(upstream_crd_folder().glob("*.yaml")) for doc in load_yaml_documents(path)
                if doc.get("kind") == "CustomResourceDefinition"]
        install_crds(dynamic, [*crds, crd_manifest()])
        operator = TrainingOperator.for_stack(stack, workdir / "operator", threads=4, qps=200).start(admin_api)
        kwok = Kwok.for_stack(stack, workdir / "kwok").start()
        core = client.CoreV1Api(admin_api)
        pool = "scale"
        for index in range(args.nodes):
            core.create_node(fake_gpu_node(f"gpu-{index:03d}", pool))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready = sum(any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
                        for node in core.list_node(label_selector=f"dino-ctl.test/pool={pool}").items)
            if ready == args.nodes:
                break
            time.sleep(0.5)
        results = [run_size(stack, admin_api, dynamic, size, interval=args.interval, workers=args.workers, pool=pool,
                            workdir=workdir, timeout=args.timeout) for size in args.sizes]
        print(json.dumps({
            "benchmark": "controller_scale",
            "nodes": args.nodes,
            "gpus_per_node": 8,
            "controller_interval_seconds": args.interval,
            "controller_workers": args.workers,
            "pod_run_seconds": 1.5,
            "cpus": os.cpu_count(),
            "components": {"training_operator": "v1.9.3", "kwok": "v0.8.0", "kubernetes": "v1.36.3"},
            "runs": results,
            "workdir": str(workdir),
        }, indent=1))
    finally:
        for component in (kwok, operator):
            if component is not None:
                component.stop()
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
