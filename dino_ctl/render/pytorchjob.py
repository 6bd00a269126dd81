"""Kubeflow ``PyTorchJob`` (kubeflow.org/v1, Training Operator 1.9) with an elastic policy: the default backend.

Shape (kubernetes.md): only a ``Worker`` replica spec (elastic jobs have no Master); the operator injects PET_NNODES
(``min:max``), PET_RDZV_* and PET_NPROC_PER_NODE that torchrun reads. ``restartPolicy: ExitCode`` retries pods that
exit with a code above 127 (143 = preempted after a checkpoint, 137 = killed) and fails the job on codes 1-127, so a
real bug is not retried in place; the planner then decides (failure budget). ``cleanPodPolicy: Running`` frees GPUs
when the job ends but keeps finished pods, whose exit codes and eviction reasons the planner reads.
"""

from __future__ import annotations

from typing import Any

from dino_ctl.naming import child_name
from dino_ctl.render.common import (
    StageWork,
    container_resources,
    job_metadata,
    pod_labels,
    pod_spec_extras,
    stage_command,
    stage_metrics_port,
    trainer_env,
    trainer_volume_mounts,
    trainer_volumes,
)
from dino_ctl.spec import DinoExperiment

__all__ = ["JOIN_TIMEOUT_SECONDS", "LAST_CALL_TIMEOUT_SECONDS", "render_pytorchjob", "trainer_container"]

JOIN_TIMEOUT_SECONDS = 900
"""Rendezvous join timeout: GPU nodes pulling a multi-GB image can take minutes to start."""
LAST_CALL_TIMEOUT_SECONDS = 30
"""After ``min`` nodes joined, wait this long for more: pods that start together join one rendezvous instead of
forcing a resize (and a restart of every worker) seconds later. Fixed-size jobs complete at ``max`` and never wait."""


def trainer_container(experiment: DinoExperiment, stage: str, config: StageWork, *, name: str) -> dict[str, Any]:
    """The trainer container (named ``pytorch`` for PyTorchJob, ``node`` for TrainJob); a curation stage's runs
    ``curation.launch`` under torchrun instead of the trainer."""
    spec = experiment.spec
    container: dict[str, Any] = {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": stage_command(config),
        "env": trainer_env(experiment, stage),
        "ports": [{"name": "metrics", "containerPort": stage_metrics_port(config), "protocol": "TCP"}],
        "volumeMounts": trainer_volume_mounts(experiment),
    }
    resources = container_resources(experiment)
    if resources:
        container["resources"] = resources
    return container


def _elastic_policy(experiment: DinoExperiment, stage: str) -> dict[str, Any]:
    nodes = experiment.spec.stage_nodes(stage)
    return {
        "rdzvBackend": "c10d",
        "rdzvId": child_name(experiment.name, stage),
        "minReplicas": nodes.min,
        "maxReplicas": nodes.max,
        "maxRestarts": experiment.spec.failure_budget.elastic_restarts,
        "rdzvConf": [
            {"key": "join_timeout", "value": str(JOIN_TIMEOUT_SECONDS)},
            {"key": "last_call_timeout", "value": str(LAST_CALL_TIMEOUT_SECONDS)},
        ],
    }


def render_pytorchjob(
    experiment: DinoExperiment, stage: str, config: StageWork, *, attempt: int = 0
) -> dict[str, Any]:
    """The stage's PyTorchJob. Created suspended when a Kueue queue is set (Kueue admits by unsuspending)."""
    spec = experiment.spec
    nodes = spec.stage_nodes(stage)
    run_policy: dict[str, Any] = {
        "cleanPodPolicy": "Running",
        # Gang scheduling (Volcano / scheduler-plugins): never start fewer pods than torchrun needs.
        "schedulingPolicy": {"minAvailable": nodes.min},
    }
    if spec.queue is not None:
        run_policy["suspend"] = True
    container = trainer_container(experiment, stage, config, name="pytorch")
    # The training-operator appends PYTHONUNBUFFERED=1 to every container of the pods it creates: ours would make it
    # a duplicate env entry in every pod (the API server warns on each create).
    container["env"] = [var for var in container["env"] if var["name"] != "PYTHONUNBUFFERED"]
    pod_spec = {
        **pod_spec_extras(experiment, config),
        "containers": [container],
        "volumes": trainer_volumes(experiment, stage),
    }
    template = {"metadata": {"labels": pod_labels(experiment, stage, attempt)}, "spec": pod_spec}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": job_metadata(experiment, stage, attempt),
        "spec": {
            "elasticPolicy": _elastic_policy(experiment, stage),
            "nprocPerNode": str(spec.resources.num_procs_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": {
                "Worker": {"replicas": nodes.max, "restartPolicy": "ExitCode", "template": template}
            },
        },
    }
