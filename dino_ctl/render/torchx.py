"""TorchX: the stage as an ``AppDef`` from torchx's own ``dist.ddp``/``torchrun`` component, dry-run on a scheduler.

- ``kubernetes``: torchx renders a Volcano ``batch.volcano.sh/v1alpha1`` Job (Volcano required). The dry run is made
  deterministic (torchx names jobs ``<name>-<random>`` and adds a session uuid) and completed with what the component
  cannot express: dino-ctl's labels, the stage ConfigMap, a sized /dev/shm, Secret-referenced credentials, placement,
  the grace period and gang ``minAvailable``. ``validate_spec=False`` keeps the dry run offline.
- ``local_cwd``: processes on this machine (the embedded default); the dry run shows the command lines.

torchx is imported lazily: ``dino-ctl validate`` and the other backends never load it.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from dino_ctl.curation_stage import ResolvedCuration
from dino_ctl.naming import child_name
from dino_ctl.render.common import (
    CONFIG_PATH,
    CURATION_PATH,
    StageWork,
    container_resources,
    job_metadata,
    pod_labels,
    pod_spec_extras,
    stage_metrics_port,
    trainer_env,
    trainer_volume_mounts,
    trainer_volumes,
)
from dino_ctl.render.pytorchjob import JOIN_TIMEOUT_SECONDS, LAST_CALL_TIMEOUT_SECONDS
from dino_ctl.spec import DinoExperiment

if TYPE_CHECKING:
    from torchx.specs import AppDef

__all__ = ["render_torchx_local", "render_volcano_job", "torchx_appdef"]

logger = logging.getLogger(__name__)

_SESSION_ENV = "TORCHX_INTERNAL_SESSION_ID"  # a per-process uuid: dropped so renders are reproducible


def _plain_env(experiment: DinoExperiment, stage: str) -> dict[str, str]:
    """The trainer env with literal values (Secret references are added to the pod after the dry run)."""
    return {var["name"]: var["value"] for var in trainer_env(experiment, stage) if "value" in var}


def torchx_appdef(
    experiment: DinoExperiment, stage: str, config: StageWork, *, config_path: str | None = None
) -> AppDef:
    """The stage as a TorchX AppDef: one role, ``-j min:max x procs``, c10d rendezvous, ``-m trainer.train``
    (``-m curation.launch --spec ... --metrics-port ...`` for a curation stage). ``config_path`` defaults to where
    the stage ConfigMap is mounted."""
    from torchx.components import dist

    # Recent torchx renamed dist.ddp to dist.torchrun (ddp is kept as a deprecated alias with the same defaults).
    component = getattr(dist, "torchrun", None) or dist.ddp
    spec = experiment.spec
    nodes = spec.stage_nodes(stage)
    if isinstance(config, ResolvedCuration):
        module = "curation.launch"
        args = ["--spec", config_path or CURATION_PATH, "--metrics-port", str(config.metrics_port)]
    else:
        module, args = "trainer.train", ["--config", config_path or CONFIG_PATH]
    app = component(
        *args,
        m=module,
        image=spec.image,
        name=child_name(experiment.name, stage),
        gpu=spec.resources.gpus_per_node,
        j=f"{nodes.min}:{nodes.max}x{spec.resources.num_procs_per_node}",
        env=_plain_env(experiment, stage),
        rdzv_conf=f"join_timeout={JOIN_TIMEOUT_SECONDS},last_call_timeout={LAST_CALL_TIMEOUT_SECONDS}",
        max_retries=0,  # restarts are the planner's decision, counted by reason
    )
    for role in app.roles:
        role.port_map = {"metrics": stage_metrics_port(config)}
    return app


def _dryrun(app: AppDef, scheduler: str, cfg: dict[str, Any]) -> Any:
    from torchx.runner import get_runner

    with get_runner() as runner:
        return runner.dryrun(app, scheduler, cfg=cfg).request


def _complete_pod(
    experiment: DinoExperiment, stage: str, config: StageWork, pod: dict[str, Any], attempt: int
) -> None:
    """Add dino-ctl's labels, volumes, env and placement to one pod template of the Volcano job (in place)."""
    pod["metadata"].setdefault("labels", {}).update(pod_labels(experiment, stage, attempt))
    spec = pod["spec"]
    spec.update(pod_spec_extras(experiment, config))
    spec["volumes"] = trainer_volumes(experiment, stage)
    secret_env = [var for var in trainer_env(experiment, stage) if "valueFrom" in var]
    for container in spec["containers"]:
        container["env"] = [var for var in container.get("env", []) if var["name"] != _SESSION_ENV] + secret_env
        container["volumeMounts"] = trainer_volume_mounts(experiment)
        container["resources"] = container_resources(experiment)
        container.pop("securityContext", None)  # torchx's is empty
        if not container["resources"]:
            container.pop("resources")
    if not spec.get("nodeSelector"):
        spec.pop("nodeSelector", None)


def render_volcano_job(
    experiment: DinoExperiment, stage: str, config: StageWork, *, attempt: int = 0
) -> dict[str, Any]:
    """The stage's Volcano Job from torchx's kubernetes dry run, named ``<experiment>-<stage>``."""
    from kubernetes.client import ApiClient

    spec = experiment.spec
    if spec.queue is not None:
        logger.warning("spec.queue has no effect with backend torchx: Volcano queues jobs (spec.torchx.volcanoQueue)")
    app = torchx_appdef(experiment, stage, config)
    cfg = {"queue": spec.torchx.volcano_queue, "namespace": experiment.namespace, "validate_spec": False}
    if spec.service_account_name:
        cfg["service_account"] = spec.service_account_name
    request = _dryrun(app, "kubernetes", cfg)
    resource = ApiClient().sanitize_for_serialization(request.resource)
    name = child_name(experiment.name, stage)
    # torchx's unique id appears in the name, labels, rdzv id and TORCHX_JOB_ID: pin it to the stable name.
    resource = json.loads(json.dumps(resource).replace(resource["metadata"]["name"], name))
    metadata = job_metadata(experiment, stage, attempt)
    metadata["labels"] = {k: v for k, v in metadata["labels"].items() if not k.startswith("kueue.x-k8s.io/")}
    resource["metadata"] = metadata
    resource["spec"]["minAvailable"] = spec.stage_nodes(stage).min  # gang: torchrun's minimum
    for task in resource["spec"]["tasks"]:
        _complete_pod(experiment, stage, config, task["template"], attempt)
    return resource


def render_torchx_local(
    experiment: DinoExperiment, stage: str, config: StageWork, *, config_path: str
) -> dict[str, Any]:
    """What ``local_cwd`` would run for the stage: one entry per process group (command, env), no cluster object."""
    request = _dryrun(torchx_appdef(experiment, stage, config, config_path=config_path), "local_cwd", {})
    replicas = [
        {"args": list(param.args), "env": {k: v for k, v in param.env.items() if k in _plain_env(experiment, stage)}}
        for params in request.role_params.values()
        for param in params
    ]
    return {
        "apiVersion": "dino-ctl.io/v1alpha1",
        "kind": "TorchXLocalRun",
        "metadata": {"name": child_name(experiment.name, stage)},
        "scheduler": "local_cwd",
        "configPath": config_path,
        "replicas": json.loads(json.dumps(replicas).replace(request.app_id, child_name(experiment.name, stage))),
    }
