"""Kubernetes objects for a curation run on its own (``dino-ctl curate SPEC --render``): pure, spec in, dicts out.

Two objects, in apply order:

1. a ConfigMap ``<name>-curation-spec`` holding the spec (``spec.yaml``);
2. a Kubeflow ``PyTorchJob`` ``<name>-curation`` (Training Operator 1.9), the same shape a ``curation`` stage of a
   DinoExperiment renders (``dino_ctl.render``): an elastic policy with a c10d rendezvous, ``jobs.parallelism``
   Worker pods (default 1), each running ``python -m torch.distributed.run -m curation.launch --spec ...`` with
   ``max(jobs.gpus_per_pod, 1)`` ranks. torchrun reads the ``PET_*`` variables the operator injects; every rank owns
   a shard of the pool in every step (embed, dedup, retrieve, balance, write), so one job runs the whole pipeline
   and nothing has to release a later step. ``restartPolicy: ExitCode`` retries pods killed by a signal (exit > 127)
   in place and fails the job on a real error (1, or 2 for a bad spec); torchrun restarts the worker group up to
   ``jobs.backoff_limit_per_index`` times, and a restarted step reuses the shards it finished.

Rank 0 of each pod serves Prometheus metrics on the container port named ``metrics`` (:data:`METRICS_PORT`).
The output directory and the sources must be on the ReadWriteMany PVC ``jobs.pvc`` mounted at ``jobs.mount_path``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from curation.config import CurationSpec

__all__ = ["JOIN_TIMEOUT_SECONDS", "METRICS_PORT", "SPEC_MOUNT", "curation_command", "render_curation_jobs"]

SPEC_MOUNT = "/etc/dino-curation"
SPEC_FILE = "spec.yaml"
METRICS_PORT = 9400
"""``--metrics-port`` of ``curation.launch`` (rank 0 of each pod binds it; local rank r binds ``port + r``)."""
JOIN_TIMEOUT_SECONDS = 900
"""Rendezvous join timeout: GPU nodes pulling a multi-GB image can take minutes to start."""
LAST_CALL_TIMEOUT_SECONDS = 30
LABEL_CURATION = "dino-ctl.io/curation"


def _name(base: str, suffix: str) -> str:
    """``<base>-<suffix>`` as a DNS-1035 label of at most 63 characters (long bases keep a short hash)."""
    # Job names are DNS-1035 labels: no '_' or '.' (a curation name may hold them), a letter first.
    name = f"{base}-{suffix}".replace("_", "-").replace(".", "-")
    name = name if name[0].isalpha() else f"c-{name}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    return f"{name[: 63 - len(suffix) - 8].rstrip('-')}-{digest}-{suffix}"


def _labels(spec: CurationSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "dino-ctl",
        "app.kubernetes.io/managed-by": "dino-ctl",
        "app.kubernetes.io/component": "curation",
        LABEL_CURATION: spec.name,
    }


def curation_command(spec_path: str, metrics_port: int = METRICS_PORT) -> list[str]:
    """The container command: torchrun (configured by the operator's ``PET_*`` variables) around curation.launch."""
    return ["python", "-m", "torch.distributed.run", "-m", "curation.launch", "--spec", spec_path,
            "--metrics-port", str(metrics_port)]


def _config_map(spec: CurationSpec) -> dict[str, Any]:
    text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": _name(spec.name, "curation-spec"), "namespace": spec.jobs.namespace,
                     "labels": _labels(spec)},
        "data": {SPEC_FILE: text},
    }


def _container(spec: CurationSpec, image: str) -> dict[str, Any]:
    jobs = spec.jobs
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": jobs.cpu, "memory": jobs.memory},
        "limits": {"memory": jobs.memory},
    }
    if jobs.gpus_per_pod:
        resources["limits"]["nvidia.com/gpu"] = str(jobs.gpus_per_pod)
    mounts = [{"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if jobs.pvc is not None:
        mounts.append({"name": "data", "mountPath": jobs.mount_path})
    return {
        "name": "pytorch",  # the Training Operator requires this name
        "image": image,
        "command": curation_command(f"{SPEC_MOUNT}/{SPEC_FILE}"),
        # Restarted workers otherwise reuse the agent's TCP store and get stale peer addresses.
        "env": [{"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"}],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "resources": resources,
        "volumeMounts": mounts,
    }


def _pod_spec(spec: CurationSpec, image: str) -> dict[str, Any]:
    jobs = spec.jobs
    volumes: list[dict[str, Any]] = [
        {"name": "spec", "configMap": {"name": _name(spec.name, "curation-spec")}},
        # DataLoader workers pass batches through shared memory; the container default of 64 MB is too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    if jobs.pvc is not None:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": jobs.pvc}})
    pod: dict[str, Any] = {"containers": [_container(spec, image)], "volumes": volumes}
    if jobs.node_selector:
        pod["nodeSelector"] = dict(jobs.node_selector)
    if jobs.gpus_per_pod:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if jobs.service_account:
        pod["serviceAccountName"] = jobs.service_account
    return pod


def _pytorchjob(spec: CurationSpec, image: str) -> dict[str, Any]:
    jobs = spec.jobs
    name = _name(spec.name, "curation")
    nodes = jobs.parallelism or 1
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": jobs.namespace, "labels": _labels(spec)},
        "spec": {
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "rdzvId": name,
                "minReplicas": nodes,
                "maxReplicas": nodes,
                "maxRestarts": jobs.backoff_limit_per_index,
                "rdzvConf": [
                    {"key": "join_timeout", "value": str(JOIN_TIMEOUT_SECONDS)},
                    {"key": "last_call_timeout", "value": str(LAST_CALL_TIMEOUT_SECONDS)},
                ],
            },
            "nprocPerNode": str(max(jobs.gpus_per_pod, 1)),
            "runPolicy": {"cleanPodPolicy": "Running", "schedulingPolicy": {"minAvailable": nodes}},
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": nodes,
                    "restartPolicy": "ExitCode",
                    "template": {"metadata": {"labels": _labels(spec)}, "spec": _pod_spec(spec, image)},
                }
            },
        },
    }


def render_curation_jobs(spec: CurationSpec, *, image: str) -> list[dict[str, Any]]:
    """The ConfigMap and the PyTorchJob that run every step of ``spec``, in apply order."""
    if not image:
        raise ValueError(
            "image must name the container image holding dino-ctl, e.g. registry.example.com/dino-ctl:0.1.0"
        )
    return [_config_map(spec), _pytorchjob(spec, image)]
