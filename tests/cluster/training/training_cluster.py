"""What the training tests share: a pool of fake GPU nodes, the spec that targets it, the CLI, pod actions, a recorder.

A helper module (not a conftest): :class:`Training` bundles one test's namespace, its GPU pool (fake nodes kwok
manages, labelled with the test's own pool so tests never share nodes) and the ways a test acts on the cluster the
way a user or a kubelet would: run ``dino-ctl``, make a trainer container exit with a code, evict a pod, delete a node.
:class:`Recorder` watches the namespace (as the admin) and keeps every event in the order the API server sent it,
so a test can assert what happened before what.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from dino_ctl.kube import KubeClient
from tests.cluster.conftest import wait_for
from tests.cluster.stack import REPO
from tests.cluster.training.training_components import (
    ANNOTATION_EXIT_CODE,
    GPU_PRODUCT,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    LABEL_AUTO_SUCCEED,
    LABEL_POOL,
    fake_gpu_node,
)
from tests.dino_ctl.spec_helpers import document

__all__ = ["JOB", "Recorder", "Training", "cli_passes", "exit_codes"]

JOB = ("kubeflow.org/v1", "PyTorchJob")
EXPERIMENT = "demo"


def exit_codes(pod: dict[str, Any]) -> list[int]:
    """Exit codes of the pod's terminated containers."""
    return [s["state"]["terminated"]["exitCode"] for s in (pod.get("status") or {}).get("containerStatuses") or []
            if (s.get("state") or {}).get("terminated")]


def cli_passes(output: str) -> list[dict[str, Any]]:
    """The JSON objects ``dino-ctl ... --wait -o json`` printed, one per reconcile pass."""
    decoder, passes, index = json.JSONDecoder(), [], 0
    text = output.strip()
    while index < len(text):
        obj, end = decoder.raw_decode(text, index)
        passes.append(obj)
        index = end
        while index < len(text) and text[index].isspace():
            index += 1
    return passes


def _true_conditions(obj: dict[str, Any]) -> list[str]:
    return [c["type"] for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]


@dataclass(frozen=True)
class Seen:
    """One watch event, reduced to what the tests assert on."""

    seq: int
    type: str
    kind: str
    name: str
    uid: str
    obj: dict[str, Any]

    @property
    def conditions(self) -> list[str]:
        return _true_conditions(self.obj)

    @property
    def deleting(self) -> bool:
        return bool(self.obj["metadata"].get("deletionTimestamp"))


class Recorder:
    """Watches PyTorchJobs, Pods, Services and ConfigMaps of one namespace; every event kept, in arrival order."""

    KINDS = ("PyTorchJob", "Pod", "Service", "ConfigMap")

    def __init__(self, admin_api: Any, namespace: str) -> None:
        self.admin_api, self.namespace = admin_api, namespace
        self.events: list[Seen] = []
        self.errors: list[Exception] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._watches: list[Any] = []
        self._started: dict[str, threading.Event] = {kind: threading.Event() for kind in self.KINDS}

    def _list_call(self, kind: str) -> tuple[Any, tuple[Any, ...]]:
        from kubernetes import client

        core, custom = client.CoreV1Api(self.admin_api), client.CustomObjectsApi(self.admin_api)
        return {
            "PyTorchJob": (custom.list_namespaced_custom_object, ("kubeflow.org", "v1", self.namespace, "pytorchjobs")),
            "Pod": (core.list_namespaced_pod, (self.namespace,)),
            "Service": (core.list_namespaced_service, (self.namespace,)),
            "ConfigMap": (core.list_namespaced_config_map, (self.namespace,)),
        }[kind]

    def _watch(self, kind: str) -> None:
        from kubernetes import watch

        call, args = self._list_call(kind)
        stream = watch.Watch()
        self._watches.append(stream)
        try:
            # resourceVersion "0"-less start: the initial ADDED events replay what exists (the namespace is fresh).
            for event in stream.stream(call, *args, timeout_seconds=600, _request_timeout=660):
                self._started[kind].set()
                obj = event["object"]
                if not isinstance(obj, dict):
                    obj = self.admin_api.sanitize_for_serialization(obj)
                meta = obj.get("metadata") or {}
                with self._lock:
                    self.events.append(Seen(len(self.events), event["type"], kind, meta.get("name", ""),
                                            meta.get("uid", ""), obj))
        except Exception as exc:  # the stream is cut when the test ends; before that it is a failure
            if not self._stopped:
                self.errors.append(exc)

    def __enter__(self) -> Recorder:
        for kind in self.KINDS:
            threading.Thread(target=self._watch, args=(kind,), daemon=True, name=f"watch-{kind}").start()
        # The ConfigMap watch replays kube-root-ca.crt at once: a sign the watches are up.
        wait_for(lambda: self.of("ConfigMap", "kube-root-ca.crt"), what="the namespace watches to start")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stopped = True
        for stream in self._watches:
            stream.stop()
        assert not self.errors, f"a watch failed: {self.errors!r}"

    def of(self, kind: str, name: str | None = None) -> list[Seen]:
        with self._lock:
            return [e for e in self.events if e.kind == kind and (name is None or e.name == name)]

    def added(self) -> dict[str, int]:
        """``Kind/name`` -> how many distinct objects (uids) of that name were created."""
        uids: dict[str, set[str]] = {}
        for seen in list(self.events):
            uids.setdefault(f"{seen.kind}/{seen.name}", set()).add(seen.uid)
        return {key: len(value) for key, value in uids.items()}

    def first(self, kind: str, name: str, predicate: Any) -> Seen | None:
        return next((e for e in self.of(kind, name) if predicate(e)), None)

    def job_condition_at(self, name: str, condition: str) -> Seen | None:
        """The first event in which job ``name`` had ``condition`` True."""
        return self.first("PyTorchJob", name, lambda e: condition in e.conditions)

    def job_created_at(self, name: str) -> Seen | None:
        return self.first("PyTorchJob", name, lambda e: e.type == "ADDED")


@dataclass
class GpuPool:
    """Fake GPU nodes (kwok) labelled with one pool name; deleted at the end of the test."""

    core: Any
    name: str
    nodes: list[str] = field(default_factory=list)

    def add(self, count: int = 1) -> list[str]:
        names = []
        for _ in range(count):
            node = f"{self.name}-{len(self.nodes)}"
            self.core.create_node(fake_gpu_node(node, self.name))
            self.nodes.append(node)
            names.append(node)
        for node in names:
            wait_for(lambda node=node: self._ready(node), what=f"kwok to make node {node} Ready")
        return names

    def _ready(self, node: str) -> bool:
        status = self.core.read_node(node).status
        return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])

    def delete(self, node: str) -> None:
        self.core.delete_node(node)

    def cleanup(self) -> None:
        from kubernetes.client.exceptions import ApiException

        for node in self.nodes:
            try:
                self.core.delete_node(node)
            except ApiException as exc:
                if exc.status != 404:
                    raise


@dataclass
class Training:
    """One test's view of the cluster: namespace, GPU pool, dino-ctl, pods."""

    namespace: str
    kube: KubeClient
    admin_api: Any
    kubeconfig: Path
    workdir: Path
    pool: GpuPool
    background: list[subprocess.Popen] = field(default_factory=list)

    # -- the experiment ------------------------------------------------------------------------------------------

    def spec(self, *, nodes: tuple[int, int] = (2, 2), auto_succeed: bool = False,
             failure_budget: dict[str, Any] | None = None) -> dict[str, Any]:
        """The three-stage experiment (``document()``, ``examples/vitl14-pretrain-highres-distill.yaml``'s shape)
        on this test's GPU pool: 8 GPUs per node, the product's nodeSelector and the pool's toleration."""
        resources = {
            "nodes": {"min": nodes[0], "max": nodes[1]}, "gpusPerNode": 8, "cpu": "16", "memory": "64Gi",
            "nodeSelector": {GPU_PRODUCT_LABEL: GPU_PRODUCT, LABEL_POOL: self.pool.name},
            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        }
        extra: dict[str, Any] = {"resources": resources}
        if failure_budget is not None:
            extra["failureBudget"] = failure_budget
        doc = document(**extra)
        doc["metadata"]["namespace"] = self.namespace
        if auto_succeed:  # dino-ctl copies metadata.labels onto every pod: kwok's pod-succeed Stage selects it
            doc["metadata"]["labels"] = {LABEL_AUTO_SUCCEED: "true"}
        return doc

    def write(self, doc: dict[str, Any]) -> Path:
        path = self.workdir / f"spec-{uuid.uuid4().hex[:4]}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    # -- dino-ctl ------------------------------------------------------------------------------------------------

    def cli(self, *args: str) -> Any:
        """``dino-ctl ARGS`` in this process (KUBECONFIG: the admin's, defaulting to the test's namespace)."""
        from dino_ctl.cli.main import app

        previous = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(self.kubeconfig)
        try:
            return CliRunner().invoke(app, list(args))
        finally:
            if previous is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = previous

    def cli_background(self, *args: str) -> subprocess.Popen:
        """``python -m dino_ctl ARGS`` as a process (e.g. ``submit --wait`` while the test plays the kubelet)."""
        log = self.workdir / f"dino-ctl-{len(self.background)}.log"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        with log.open("wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "dino_ctl", *args], cwd=REPO, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        process.log = log  # type: ignore[attr-defined]
        self.background.append(process)
        return process

    def finish(self, process: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
        """Wait for a background dino-ctl; its exit code and output."""
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"dino-ctl did not finish in {timeout:.0f} s:\n"
                                 f"{process.log.read_text()[-4000:]}") from None  # type: ignore[attr-defined]
        return code, process.log.read_text()  # type: ignore[attr-defined]

    def stop_background(self) -> None:
        for process in self.background:
            if process.poll() is None:
                process.kill()
                process.wait()

    def status(self) -> dict[str, Any]:
        """``dino-ctl status demo -o json``."""
        result = self.cli("status", EXPERIMENT, "-o", "json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    # -- jobs and pods -------------------------------------------------------------------------------------------

    def job(self, stage: str) -> dict[str, Any] | None:
        return self.kube.get(*JOB, f"{EXPERIMENT}-{stage}")

    def pods(self, stage: str | None = None) -> list[dict[str, Any]]:
        selector = f"dino-ctl.io/experiment={EXPERIMENT}" + (f",dino-ctl.io/stage={stage}" if stage else "")
        return sorted(self.kube.list("v1", "Pod", selector=selector), key=lambda p: p["metadata"]["name"])

    def running_pods(self, stage: str, count: int, *, timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until ``count`` pods of the stage's current job run (not being deleted); return them."""
        def running() -> list[dict[str, Any]] | None:
            job = self.job(stage)
            if job is None:
                return None
            attempt = job["metadata"]["labels"]["dino-ctl.io/attempt"]
            found = [p for p in self.pods(stage) if p["status"].get("phase") == "Running"
                     and not p["metadata"].get("deletionTimestamp")
                     and p["metadata"]["labels"]["dino-ctl.io/attempt"] == attempt]
            return found if len(found) == count else None

        return wait_for(running, what=f"{count} running pods of stage {stage}", timeout=timeout)

    def exit(self, pod: str, code: int) -> None:
        """The pod's trainer container exits with ``code`` (kwok's pod-exit Stage plays it)."""
        from kubernetes import client

        client.CoreV1Api(self.admin_api).patch_namespaced_pod(
            pod, self.namespace, {"metadata": {"annotations": {ANNOTATION_EXIT_CODE: str(code)}}})

    def succeed(self, stage: str, count: int) -> None:
        """Every worker of the stage's job finishes training: its pods exit 0."""
        for pod in self.running_pods(stage, count):
            self.exit(pod["metadata"]["name"], 0)
        wait_for(lambda: "Succeeded" in [c["type"] for c in (self.job(stage) or {}).get("status", {}).get(
            "conditions", []) if c["status"] == "True"], what=f"the operator to mark stage {stage}'s job Succeeded")

    def evict(self, pod: str) -> None:
        """Evict the pod through the Eviction API (what ``kubectl drain`` and the cluster autoscaler do)."""
        from kubernetes import client

        client.CoreV1Api(self.admin_api).create_namespaced_pod_eviction(
            pod, self.namespace, {"apiVersion": "policy/v1", "kind": "Eviction",
                                  "metadata": {"name": pod, "namespace": self.namespace}})

    def events(self, name: str) -> list[tuple[str, str, str]]:
        """(type, reason, message) of the events about object ``name``, as the API server stores them."""
        from kubernetes import client

        found = client.CoreV1Api(self.admin_api).list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}").items
        return [(e.type, e.reason, e.message) for e in found]

    def recorder(self) -> Recorder:
        return Recorder(self.admin_api, self.namespace)
