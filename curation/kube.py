"""Kubernetes Jobs for a curation run (pure: spec in, plain dicts out, no API calls).

Three Jobs plus the ConfigMap holding the spec, in the order they must run:

1. ``<name>-embed``: an indexed Job (``completionMode: Indexed``), one completion per embedding shard; each pod
   computes shard ``JOB_COMPLETION_INDEX`` (Kubernetes sets it) and the pod finishing the last shard commits the step.
2. ``<name>-select``: one pod running dedup, retrieve and balance (k-NN and k-means over the whole pool).
3. ``<name>-write``: an indexed Job, one completion per MDS partition; the last one merges the index and writes the
   manifest.

Jobs have no dependencies in Kubernetes, so the later two are rendered suspended with a ``dino-ctl.io/after``
annotation naming their predecessor: a control plane (or ``kubectl patch job NAME -p '{"spec":{"suspend":false}}'``)
unsuspends each once the previous one has succeeded. Every step is resumable, so a retried pod redoes only its shard.
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from curation.config import CurationSpec

__all__ = ["SPEC_MOUNT", "render_curation_jobs"]

SPEC_MOUNT = "/etc/dino-curation"
SPEC_FILE = "spec.yaml"
LABEL_CURATION = "dino-ctl.io/curation"
LABEL_STEP = "dino-ctl.io/step"
ANNOTATION_AFTER = "dino-ctl.io/after"


def _name(base: str, suffix: str) -> str:
    """``<base>-<suffix>`` as a DNS-1123 label of at most 63 characters (long bases keep a short hash)."""
    name = f"{base}-{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    return f"{base[: 63 - len(suffix) - 8].rstrip('-')}-{digest}-{suffix}"


def _labels(spec: CurationSpec, step: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "dino-ctl",
        "app.kubernetes.io/managed-by": "dino-ctl",
        "app.kubernetes.io/component": "curation",
        LABEL_CURATION: spec.name,
    }
    if step is not None:
        labels[LABEL_STEP] = step
    return labels


def _config_map(spec: CurationSpec) -> dict[str, Any]:
    text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": _name(spec.name, "curation-spec"),
            "namespace": spec.jobs.namespace,
            "labels": _labels(spec),
        },
        "data": {SPEC_FILE: text},
    }


def _pod_spec(spec: CurationSpec, *, image: str, steps: str, gpus: int) -> dict[str, Any]:
    jobs = spec.jobs
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": jobs.cpu, "memory": jobs.memory},
        "limits": {"memory": jobs.memory},
    }
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = gpus
    mounts = [{"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True}, {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [
        {"name": "spec", "configMap": {"name": _name(spec.name, "curation-spec")}},
        # DataLoader workers pass batches through shared memory; the container default of 64 MB is too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    if jobs.pvc is not None:
        mounts.append({"name": "data", "mountPath": jobs.mount_path})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": jobs.pvc}})
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # required by backoffLimitPerIndex; the Job controller retries failed indexes
        "containers": [
            {
                "name": "curate",
                "image": image,
                "command": ["python", "-m", "curation", f"{SPEC_MOUNT}/{SPEC_FILE}", "--steps", steps],
                "resources": resources,
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
    }
    if jobs.node_selector:
        pod["nodeSelector"] = dict(jobs.node_selector)
    if gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if jobs.service_account:
        pod["serviceAccountName"] = jobs.service_account
    return pod


def _job(
    spec: CurationSpec, step: str, *, image: str, steps: str, completions: int, gpus: int, after: str | None
) -> dict[str, Any]:
    labels = _labels(spec, step)
    job_spec: dict[str, Any] = {
        "completions": completions,
        "parallelism": min(spec.jobs.parallelism or completions, completions),
        "template": {
            "metadata": {"labels": dict(labels)},
            "spec": _pod_spec(spec, image=image, steps=steps, gpus=gpus),
        },
    }
    if completions > 1 or step in ("embed", "write"):
        job_spec["completionMode"] = "Indexed"
        job_spec["backoffLimitPerIndex"] = spec.jobs.backoff_limit_per_index
    else:
        job_spec["backoffLimit"] = spec.jobs.backoff_limit_per_index
    metadata: dict[str, Any] = {"name": _name(spec.name, step), "namespace": spec.jobs.namespace, "labels": labels}
    if after is not None:
        metadata["annotations"] = {ANNOTATION_AFTER: after}
        job_spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def render_curation_jobs(spec: CurationSpec, *, image: str) -> list[dict[str, Any]]:
    """The ConfigMap and the three Jobs (embed, select, write) of ``spec``, in apply order."""
    if not image:
        raise ValueError(
            "image must name the container image holding dino-ctl, e.g. registry.example.com/dino-ctl:0.1.0"
        )
    gpus = spec.jobs.gpus_per_pod
    embed = _job(spec, "embed", image=image, steps="embed", completions=spec.embed.num_shards, gpus=gpus, after=None)
    select = _job(
        spec,
        "select",
        image=image,
        steps="dedup,retrieve,balance",
        completions=1,
        gpus=gpus,
        after=embed["metadata"]["name"],
    )
    write = _job(
        spec,
        "write",
        image=image,
        steps="write",
        completions=spec.write.num_shards,
        gpus=0,
        after=select["metadata"]["name"],
    )
    return [_config_map(spec), embed, select, write]
