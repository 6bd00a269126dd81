"""Pieces every backend's renderer shares: metadata, the trainer container, volumes, and the stage ConfigMap.

Everything here is pure (spec in, plain dicts out). Backends differ only in how they wrap the pod: PyTorchJob takes a
full pod template, TrainJob splits it between the runtime, ``trainer`` and the version's pod-override field, and
TorchX builds its own pod which :mod:`dino_ctl.render.torchx` completes.
"""

from __future__ import annotations

import math
from typing import Any

import yaml
from trainer import layout
from trainer.config import TrainConfig

from dino_ctl.curation_stage import CURATION_FILE, CURATION_GRACE_SECONDS, ResolvedCuration
from dino_ctl.naming import (
    ANNOTATION_RESTARTS,
    LABEL_COMPONENT,
    child_name,
    experiment_labels,
    stage_labels,
)
from dino_ctl.observe import ANNOTATION_COUNTED_JOB, LABEL_ATTEMPT, RestartCounts
from dino_ctl.spec import DinoExperiment
from dino_ctl.stages import pvc_claims, pvc_mount_path

__all__ = [
    "CONFIG_DIR",
    "CONFIG_FILE",
    "CONFIG_PATH",
    "CREDENTIALS_DIR",
    "CURATION_PATH",
    "KUEUE_PRIORITY_LABEL",
    "KUEUE_QUEUE_LABEL",
    "TRAINER_COMMAND",
    "StageWork",
    "config_map_name",
    "container_resources",
    "job_metadata",
    "pod_labels",
    "pod_spec_extras",
    "render_experiment_record",
    "render_stage_config_map",
    "stage_command",
    "stage_metrics_port",
    "state_annotations",
    "termination_grace_seconds",
    "trainer_env",
    "trainer_volume_mounts",
    "trainer_volumes",
]

CONFIG_DIR = "/etc/dino-ctl"
CONFIG_FILE = layout.CONFIG_FILE
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
CREDENTIALS_DIR = "/var/run/secrets/dino-ctl/storage"
# trainer.launch runs torchrun (configured by the operators' PET_* variables) around trainer.train and keeps exit
# code 143 when SIGTERM ended in a preemption checkpoint; plain torchrun would exit 1 and burn the failure budget.
TRAINER_COMMAND = ("python", "-m", "trainer.launch", "--config", CONFIG_PATH)
CURATION_PATH = f"{CONFIG_DIR}/{CURATION_FILE}"
# A curation stage: torchrun (configured by the same PET_* variables) around curation.launch, one shard of the pool
# per rank. Steps resume from their finished shards, so torchrun's own exit code is all the planner needs.
CURATION_COMMAND = ("python", "-m", "torch.distributed.run", "-m", "curation.launch", "--spec", CURATION_PATH)
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# Time after SIGTERM beyond the trainer's own checkpoint budget: finishing the step and process teardown.
_GRACE_MARGIN_SECONDS = 60


def config_map_name(experiment: DinoExperiment, stage: str) -> str:
    """Name of the ConfigMap holding stage ``stage``'s resolved trainer config (and its restart counts)."""
    return child_name(experiment.name, stage, "config", max_length=63)


StageWork = TrainConfig | ResolvedCuration
"""What a stage's pods run: a training stage's resolved config or a curation stage's resolved curation spec."""


def termination_grace_seconds(config: StageWork) -> int:
    """Pod grace period: longer than the trainer's preemption grace so the SIGTERM checkpoint can finish (a curation
    stage saves nothing on SIGTERM: :data:`~dino_ctl.curation_stage.CURATION_GRACE_SECONDS`)."""
    if isinstance(config, ResolvedCuration):
        return CURATION_GRACE_SECONDS
    return math.ceil(config.checkpoint.preemption_grace_seconds) + _GRACE_MARGIN_SECONDS


def stage_command(config: StageWork) -> list[str]:
    """The container command: ``trainer.launch`` for a training stage, torchrun around ``curation.launch`` (with
    ``--metrics-port``) for a curation stage."""
    if isinstance(config, ResolvedCuration):
        return [*CURATION_COMMAND, "--metrics-port", str(config.metrics_port)]
    return list(TRAINER_COMMAND)


def stage_metrics_port(config: StageWork) -> int:
    """The port of the container port named ``metrics``."""
    return config.metrics_port if isinstance(config, ResolvedCuration) else config.metrics.port


def pod_labels(experiment: DinoExperiment, stage: str, attempt: int) -> dict[str, str]:
    """Labels of a stage's pods: stage labels plus the attempt, so pods of an older submission are told apart; the
    component is ``curation`` for a curation stage's pods, else ``trainer``."""
    labels = stage_labels(experiment.name, stage, extra=experiment.metadata.labels)
    component = "curation" if experiment.spec.stage(stage).is_curation else "trainer"
    return {**labels, LABEL_COMPONENT: component, LABEL_ATTEMPT: str(attempt)}


def job_metadata(experiment: DinoExperiment, stage: str, attempt: int) -> dict[str, Any]:
    """Metadata of a stage's job: name, namespace, labels (with the Kueue queue when set)."""
    labels = {**pod_labels(experiment, stage, attempt)}
    queue = experiment.spec.queue
    if queue is not None:
        labels[KUEUE_QUEUE_LABEL] = queue.name
        if queue.priority_class:
            labels[KUEUE_PRIORITY_LABEL] = queue.priority_class
    return {"name": child_name(experiment.name, stage), "namespace": experiment.namespace, "labels": labels}


def trainer_env(experiment: DinoExperiment, stage: str) -> list[dict[str, Any]]:
    """Env of the trainer container: torchrun settings, storage endpoint/credentials (Secret refs), user env."""
    spec = experiment.spec
    env: list[dict[str, Any]] = [
        # Restarted workers otherwise reuse the agent's TCP store and get stale peer addresses (environment.md).
        {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "DINO_CTL_EXPERIMENT", "value": experiment.name},
        {"name": "DINO_CTL_STAGE", "value": stage},
    ]
    storage = spec.storage
    if storage.endpoint_url:
        env += [{"name": name, "value": storage.endpoint_url} for name in ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")]
    credentials = storage.credentials
    if credentials is not None and credentials.mount == "env":
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": credentials.secret_name, "key": key}}}
            for key in credentials.env_keys
        ]
    elif credentials is not None:
        path = f"{CREDENTIALS_DIR}/{credentials.key}"
        env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": path})
    for var in spec.env:
        if var.secret_key_ref is not None:
            ref = {"name": var.secret_key_ref.name, "key": var.secret_key_ref.key}
            env.append({"name": var.name, "valueFrom": {"secretKeyRef": ref}})
        else:
            env.append({"name": var.name, "value": var.value})
    return env


def trainer_volumes(experiment: DinoExperiment, stage: str) -> list[dict[str, Any]]:
    """Pod volumes: the stage config, a memory-backed /dev/shm, PVCs of pvc:// storage, the credentials Secret."""
    spec = experiment.spec
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(experiment, stage)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}},
    ]
    volumes += [
        {"name": f"pvc-{claim}"[:63], "persistentVolumeClaim": {"claimName": claim}} for claim in pvc_claims(experiment)
    ]
    credentials = spec.storage.credentials
    if credentials is not None and credentials.mount == "file":
        volumes.append({"name": "storage-credentials", "secret": {"secretName": credentials.secret_name}})
    return volumes


def trainer_volume_mounts(experiment: DinoExperiment) -> list[dict[str, Any]]:
    """Mounts matching :func:`trainer_volumes` (PVCs at :func:`dino_ctl.stages.pvc_mount_path`)."""
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    mounts += [{"name": f"pvc-{claim}"[:63], "mountPath": pvc_mount_path(claim)} for claim in pvc_claims(experiment)]
    credentials = experiment.spec.storage.credentials
    if credentials is not None and credentials.mount == "file":
        mounts.append({"name": "storage-credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True})
    return mounts


def container_resources(experiment: DinoExperiment) -> dict[str, Any]:
    """Requests/limits of one node's trainer container: whole GPUs as limits, cpu/memory as given."""
    resources = experiment.spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    for name, value in (("cpu", resources.cpu), ("memory", resources.memory)):
        if value is not None:
            requests[name] = limits[name] = value
    if resources.gpus_per_node:
        limits[resources.gpu_resource] = str(resources.gpus_per_node)
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def pod_spec_extras(experiment: DinoExperiment, config: StageWork) -> dict[str, Any]:
    """Pod-level fields every backend sets: placement, identity and the grace period."""
    spec = experiment.spec
    extras: dict[str, Any] = {"terminationGracePeriodSeconds": termination_grace_seconds(config)}
    if spec.resources.node_selector:
        extras["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        extras["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.resources.tolerations]
    if spec.service_account_name:
        extras["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        extras["imagePullSecrets"] = [{"name": name} for name in spec.image_pull_secrets]
    return extras


def render_stage_config_map(
    experiment: DinoExperiment,
    stage: str,
    config: StageWork,
    *,
    restarts: RestartCounts | None = None,
    counted_job_uid: str | None = None,
) -> dict[str, Any]:
    """The stage's ConfigMap: ``config.yaml`` = the resolved trainer config (``curation.yaml`` = the resolved
    curation spec for a curation stage); restart counts as annotations."""
    labels = {**stage_labels(experiment.name, stage, extra=experiment.metadata.labels), LABEL_COMPONENT: "stage-config"}
    if isinstance(config, ResolvedCuration):
        data = {CURATION_FILE: config.spec_text()}
    else:
        data = {CONFIG_FILE: layout.stage_config_text(config)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(experiment, stage),
            "namespace": experiment.namespace,
            "labels": labels,
            "annotations": state_annotations(restarts or RestartCounts(), counted_job_uid),
        },
        "data": data,
    }


def state_annotations(restarts: RestartCounts, counted_job_uid: str | None = None) -> dict[str, str]:
    """The planner's per-stage state: restart counts and the uid of the last job they counted."""
    annotations = {ANNOTATION_RESTARTS: restarts.to_json()}
    if counted_job_uid:
        annotations[ANNOTATION_COUNTED_JOB] = counted_job_uid
    return annotations


def render_experiment_record(experiment: DinoExperiment) -> dict[str, Any]:
    """The experiment's record for CLI submissions: the spec itself, so any machine can ``status``/``resume``."""
    labels = {**experiment_labels(experiment.name, extra=experiment.metadata.labels), LABEL_COMPONENT: "experiment"}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": child_name(experiment.name, "experiment", max_length=63),
            "namespace": experiment.namespace,
            "labels": labels,
        },
        "data": {"spec.yaml": yaml.safe_dump(experiment.to_document(), sort_keys=False)},
    }
