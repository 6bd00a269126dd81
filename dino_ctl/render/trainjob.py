"""Kubeflow Trainer v2: the stage's ``TrainJob`` and the project's ``ClusterTrainingRuntime`` (trainer.kubeflow.org).

The TrainJob carries what differs per stage: image, command, env, node count and resources in ``spec.trainer``, and
pod-level settings (config volume, /dev/shm, placement, labels) in the version's pod-override field:
``runtimePatches`` from Trainer 2.2, ``podTemplateOverrides`` in 2.1, ``podSpecOverrides`` in 2.0 (the API changed
between minor releases, so the spec declares the installed version).

The runtime holds what the patch fields cannot express: the ``metrics`` container port, the failure semantics and,
for Trainer 2.2 (whose released ``runtimePatches`` do not declare it), the pods' grace period.
The replicated job ``node`` has a podFailurePolicy: pods disrupted by the cluster and pods that exit 143 (preempted
after a checkpoint) are replaced without counting; any other non-zero exit fails the Job at once, and the JobSet
``failurePolicy`` fails the whole set for that reason instead of restarting it, so the planner counts it.
Trainer v2 has no elastic resizing: ``numNodes`` is fixed (validation requires min == max).
"""

from __future__ import annotations

from typing import Any

from trainer.layout import PREEMPTED_EXIT_CODE

from dino_ctl.naming import LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_NAME, MANAGED_BY
from dino_ctl.render.common import (
    TRAINER_COMMAND,
    StageWork,
    container_resources,
    job_metadata,
    pod_labels,
    pod_spec_extras,
    stage_command,
    termination_grace_seconds,
    trainer_env,
    trainer_volume_mounts,
    trainer_volumes,
)
from dino_ctl.spec import DinoExperiment
from dino_ctl.stages import resolve_experiment

__all__ = ["PATCH_MANAGER", "REPLICATED_JOB", "render_cluster_training_runtime", "render_trainjob"]

API_VERSION = "trainer.kubeflow.org/v1alpha1"
REPLICATED_JOB = "node"
PATCH_MANAGER = "dino-ctl.io/dino-ctl"
"""Owner of dino-ctl's entry in ``runtimePatches`` (each manager owns one entry; Kueue may add its own)."""
_COSCHEDULING_TIMEOUT_SECONDS = 600


def _pod_override(experiment: DinoExperiment, stage: str, config: StageWork) -> dict[str, Any]:
    """Pod spec fields the override/patch APIs accept (containers only take env and volumeMounts)."""
    return {
        **pod_spec_extras(experiment, config),
        "containers": [{"name": REPLICATED_JOB, "volumeMounts": trainer_volume_mounts(experiment)}],
        "volumes": trainer_volumes(experiment, stage),
    }


def _overrides(experiment: DinoExperiment, stage: str, config: StageWork, attempt: int) -> dict[str, Any]:
    version = experiment.spec.train_job.trainer_version
    pod_spec = _pod_override(experiment, stage, config)
    labels = pod_labels(experiment, stage, attempt)
    if version == "2.0":
        return {"podSpecOverrides": [{"targetJobs": [{"name": REPLICATED_JOB}], **pod_spec}]}
    if version == "2.1":
        return {
            "podTemplateOverrides": [
                {"targetJobs": [{"name": REPLICATED_JOB}], "metadata": {"labels": labels}, "spec": pod_spec}
            ]
        }
    # Released Trainer 2.2 does not declare the grace period in a patch: the runtime carries it (see below).
    pod_spec.pop("terminationGracePeriodSeconds")
    pod_template = {"metadata": {"labels": labels}, "spec": pod_spec}
    replicated = {"name": REPLICATED_JOB, "template": {"spec": {"template": pod_template}}}
    patch = {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated]}}}}
    return {"runtimePatches": [patch]}


def render_trainjob(experiment: DinoExperiment, stage: str, config: StageWork, *, attempt: int = 0) -> dict[str, Any]:
    """The stage's TrainJob for the declared Trainer version; suspended when a Kueue queue is set."""
    spec = experiment.spec
    trainer: dict[str, Any] = {
        "image": spec.image,
        "command": stage_command(config),
        "env": trainer_env(experiment, stage),
        "numNodes": spec.stage_nodes(stage).max,
        # An integer from 2.2; earlier versions declared an int-or-string.
        "numProcPerNode": spec.resources.num_procs_per_node,
    }
    resources = container_resources(experiment)
    if resources:
        trainer["resourcesPerNode"] = resources
    body: dict[str, Any] = {
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                       "name": spec.train_job.runtime},
        "trainer": trainer,
        **_overrides(experiment, stage, config, attempt),
    }
    if spec.queue is not None:
        body["suspend"] = True
    return {"apiVersion": API_VERSION, "kind": "TrainJob", "metadata": job_metadata(experiment, stage, attempt),
            "spec": body}


def _pod_failure_policy() -> dict[str, Any]:
    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "Ignore", "onExitCodes": {"containerName": REPLICATED_JOB, "operator": "In",
                                                 "values": [PREEMPTED_EXIT_CODE]}},
            {"action": "FailJob", "onExitCodes": {"containerName": REPLICATED_JOB, "operator": "NotIn",
                                                  "values": [0, PREEMPTED_EXIT_CODE]}},
        ]
    }


def _node_job(port: int, image: str, grace_seconds: int) -> dict[str, Any]:
    """The runtime's replicated job ``node``: the trainer container and the pod failure policy."""
    container = {
        "name": REPLICATED_JOB,
        "image": image,  # replaced by each TrainJob's spec.trainer.image
        "command": list(TRAINER_COMMAND),
        "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
    }
    return {
        "name": REPLICATED_JOB,
        "template": {
            # Trainer applies spec.trainer (image, command, numNodes, PET_* env) to the job with this ancestor label.
            "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
            "spec": {
                "backoffLimit": 0,
                "podFailurePolicy": _pod_failure_policy(),
                "template": {"spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": grace_seconds,
                                      "containers": [container]}},
            },
        },
    }


def render_cluster_training_runtime(experiment: DinoExperiment, *, metrics_port: int | None = None) -> dict[str, Any]:
    """The project's ClusterTrainingRuntime named ``spec.trainJob.runtime`` (cluster-scoped, installed once).

    Its pods' grace period is the longest any stage of ``experiment`` needs: Trainer 2.2's ``runtimePatches`` cannot
    set it per TrainJob (``terminationGracePeriodSeconds`` is not declared there in the released v2.2.0 CRD).
    """
    spec = experiment.spec
    resolved = resolve_experiment(experiment)
    works = [*(stage.config for stage in resolved.stages), *resolved.curations]
    grace = max(termination_grace_seconds(work) for work in works)
    policy: dict[str, Any] = {}
    if spec.train_job.gang_scheduler == "coscheduling":
        policy = {"podGroupPolicy": {"coscheduling": {"scheduleTimeoutSeconds": _COSCHEDULING_TIMEOUT_SECONDS}}}
    elif spec.train_job.gang_scheduler == "volcano":
        policy = {"podGroupPolicy": {"volcano": {}}}
    failure_policy = {
        "maxRestarts": spec.failure_budget.elastic_restarts,
        "rules": [{"name": "trainer-error", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}],
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "ClusterTrainingRuntime",
        "metadata": {
            "name": spec.train_job.runtime,
            "labels": {LABEL_NAME: "dino-ctl", LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: "training-runtime",
                       "trainer.kubeflow.org/framework": "torch"},
        },
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            **policy,
            "template": {"spec": {"failurePolicy": failure_policy,
                                  "replicatedJobs": [_node_job(metrics_port or spec.monitoring.port, spec.image,
                                                               grace)]}},
        },
    }
