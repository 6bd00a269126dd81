"""Pure renderers: a validated ``DinoExperiment`` in, the Kubernetes objects of each stage out (plain dicts).

- :func:`render_stage`: one stage's ConfigMap (resolved trainer config) and its job for the chosen backend.
- :func:`render`: every object of an experiment (``dino-ctl render``): the TrainJob runtime when the backend needs
  it, each stage's ConfigMap and job, and the monitoring objects (PodMonitor, PrometheusRule) when enabled.

Backends: ``pytorchjob`` (default, elastic), ``trainjob`` (Kubeflow Trainer v2), ``torchx`` (Volcano job, or the
``local_cwd`` command lines). No function here does I/O or talks to a cluster.
"""

from __future__ import annotations

from typing import Any

from trainer import layout

from dino_ctl.curation_stage import CURATION_FILE
from dino_ctl.observe import RestartCounts
from dino_ctl.render.common import StageWork, render_stage_config_map
from dino_ctl.render.monitoring import render_experiment_monitoring
from dino_ctl.render.pytorchjob import render_pytorchjob
from dino_ctl.render.torchx import render_torchx_local, render_volcano_job
from dino_ctl.render.trainjob import render_cluster_training_runtime, render_trainjob
from dino_ctl.spec import DinoExperiment
from dino_ctl.stages import resolve_experiment

__all__ = ["RENDER_BACKENDS", "render", "render_job", "render_stage"]

RENDER_BACKENDS = ("pytorchjob", "trainjob", "torchx")


def _effective_backend(experiment: DinoExperiment, backend: str | None) -> str:
    chosen = backend or experiment.spec.backend
    # ``local`` runs on this machine; rendering it for a cluster means the default cluster backend.
    return "pytorchjob" if chosen == "local" else chosen


def render_job(
    experiment: DinoExperiment, stage: str, *, backend: str | None = None, attempt: int = 0
) -> dict[str, Any]:
    """The job object of one stage for ``backend`` (default: the spec's). A curation stage renders as the same
    PyTorchJob, TrainJob or TorchX job, running ``curation.launch`` instead of the trainer."""
    resolved = resolve_experiment(experiment)
    chosen = _effective_backend(experiment, backend)
    if resolved.is_curation(stage):
        config: StageWork = resolved.curation(stage)
        # local_cwd: curation.launch reads the curation.yaml ``dino-ctl run`` writes into the stage's output
        local_path = layout.join(config.spec.output, CURATION_FILE)
    else:
        config = resolved.config(stage)
        local_path = layout.join(resolved.stage(stage).checkpoint_dir, layout.CONFIG_FILE)
    if chosen == "pytorchjob":
        return render_pytorchjob(experiment, stage, config, attempt=attempt)
    if chosen == "trainjob":
        return render_trainjob(experiment, stage, config, attempt=attempt)
    if chosen == "torchx":
        if experiment.spec.torchx.scheduler == "local_cwd":
            # local_cwd runs on this machine: the trainer reads the file ``dino-ctl run`` writes beside the checkpoints
            return render_torchx_local(experiment, stage, config, config_path=local_path)
        return render_volcano_job(experiment, stage, config, attempt=attempt)
    raise ValueError(f"backend {chosen!r}: allowed: {', '.join(RENDER_BACKENDS)}")  # the CLI checks the choice first


def render_stage(
    experiment: DinoExperiment,
    stage: str,
    *,
    backend: str | None = None,
    attempt: int = 0,
    restarts: RestartCounts | None = None,
    counted_job_uid: str | None = None,
) -> list[dict[str, Any]]:
    """``[ConfigMap, job]`` of one stage: what a submission of the stage applies, in that order."""
    resolved = resolve_experiment(experiment)
    config = resolved.curation(stage) if resolved.is_curation(stage) else resolved.config(stage)
    config_map = render_stage_config_map(experiment, stage, config, restarts=restarts, counted_job_uid=counted_job_uid)
    return [config_map, render_job(experiment, stage, backend=backend, attempt=attempt)]


def render(experiment: DinoExperiment, *, backend: str | None = None, stage: str | None = None) -> list[dict[str, Any]]:
    """Every object of the experiment (or of one ``stage``), in apply order. ``experiment`` must be validated."""
    chosen = _effective_backend(experiment, backend)
    objects: list[dict[str, Any]] = []
    if chosen == "trainjob":
        objects.append(render_cluster_training_runtime(experiment))
    stages = [stage] if stage else resolve_experiment(experiment).order
    for name in stages:
        objects.extend(render_stage(experiment, name, backend=chosen))
    monitoring = experiment.spec.monitoring
    on_this_machine = chosen == "torchx" and experiment.spec.torchx.scheduler == "local_cwd"
    if monitoring.pod_monitor and not on_this_machine:
        release = {"release": monitoring.release} if monitoring.release else None
        objects.extend(
            render_experiment_monitoring(
                experiment=experiment.name,
                namespace=experiment.namespace,
                release_labels=release,
                scrape_interval=monitoring.scrape_interval,
            )
        )
    return objects
