"""Client-side reconciliation: read the cluster, :func:`~dino_ctl.plan.plan`, execute the actions through kube.py.

``dino-ctl submit --wait`` and ``resume`` loop over :func:`reconcile_once`; all state lives in the cluster (the
experiment record, the stage ConfigMaps' annotations, the jobs), so a loop on another machine picks up where a dead
one stopped. The in-cluster controller makes the same decisions (same ``plan``) with its own executor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import yaml

from dino_ctl.errors import KubeError, SpecError, SpecErrors
from dino_ctl.kube import KubeClient
from dino_ctl.naming import ANNOTATION_CANCEL, child_name
from dino_ctl.observe import JOB_KINDS, Observed, observe
from dino_ctl.plan import Action, ActionKind, ExperimentPhase, experiment_phase, plan
from dino_ctl.render import render_stage
from dino_ctl.render.common import config_map_name, render_experiment_record, state_annotations
from dino_ctl.spec import DinoExperiment, parse_spec
from dino_ctl.validation import validate_experiment

__all__ = [
    "Pass",
    "execute",
    "load_experiment",
    "read_state",
    "reconcile_once",
    "set_cancel",
    "submit",
    "wait",
]

logger = logging.getLogger(__name__)

STATE_FIELD_MANAGER = "dino-ctl-state"
"""Field manager of the state annotations, so applying them never drops fields the renderer's manager owns.

The renderer writes the stage ConfigMap's state annotations too (a resubmitted stage carries its counts), so it
co-owns them; the state manager applies them with ``force``: recording a new count takes the annotations over rather
than failing with a 409 conflict against the renderer's older value."""
_JOB_API = {"PyTorchJob": "kubeflow.org/v1", "TrainJob": "trainer.kubeflow.org/v1alpha1",
            "Job": "batch.volcano.sh/v1alpha1"}
assert set(_JOB_API) == set(JOB_KINDS)


@dataclass(frozen=True)
class Pass:
    """One reconciliation pass: what was observed, the actions taken and the resulting phase."""

    observed: Observed
    actions: list[Action]
    phase: ExperimentPhase


def read_state(client: KubeClient, experiment: DinoExperiment) -> Observed:
    """Observe the experiment's objects in its namespace."""
    objects = client.experiment_objects(experiment.name, namespace=experiment.namespace)
    return observe(objects, experiment=experiment.name)


def _apply_state(client: KubeClient, experiment: DinoExperiment, action: Action) -> None:
    assert action.stage is not None and action.restarts is not None
    client.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": config_map_name(experiment, action.stage),
                "namespace": experiment.namespace,
                "annotations": state_annotations(action.restarts, action.counted_job_uid),
            },
        },
        field_manager=STATE_FIELD_MANAGER,
        force=True,
    )


def execute(client: KubeClient, experiment: DinoExperiment, actions: list[Action], observed: Observed) -> None:
    """Carry out ``actions`` in order. SUBMIT applies ConfigMap then job; DELETE records counts, then deletes."""
    for action in actions:
        logger.info("%s %s: %s %s", action.kind.value, action.stage or experiment.name, action.reason, action.message)
        if action.kind == ActionKind.SUBMIT:
            assert action.stage is not None
            for obj in render_stage(experiment, action.stage, attempt=action.attempt, restarts=action.restarts,
                                    counted_job_uid=action.counted_job_uid):
                client.apply(obj)
        elif action.kind == ActionKind.DELETE:
            assert action.stage is not None
            obs = observed.stage(action.stage)
            if action.restarts is not None:  # recorded first: a crash between the two steps cannot lose a count
                _apply_state(client, experiment, action)
            kind = obs.job_kind or "PyTorchJob"
            client.delete(_JOB_API[kind], kind, obs.job_name or child_name(experiment.name, action.stage),
                          namespace=experiment.namespace)


def reconcile_once(client: KubeClient, experiment: DinoExperiment, *, retry_failed: bool = False) -> Pass:
    """Observe, plan, execute; return what happened."""
    observed = read_state(client, experiment)
    actions = plan(experiment, observed, retry_failed=retry_failed)
    execute(client, experiment, actions, observed)
    return Pass(observed=observed, actions=actions, phase=experiment_phase(experiment, observed))


def submit(client: KubeClient, experiment: DinoExperiment) -> Pass:
    """Record the experiment in the cluster (its spec, for any later ``status``/``resume``) and start it."""
    if experiment.spec.backend == "local":
        allowed = "pytorchjob, trainjob or torchx to submit to a cluster (`dino-ctl run` runs backend local here)"
        raise SpecErrors([SpecError("spec.backend", "local", allowed)])
    client.apply(render_experiment_record(experiment))
    return reconcile_once(client, experiment)


def load_experiment(client: KubeClient, name: str, *, namespace: str | None = None) -> DinoExperiment:
    """The experiment ``name`` as recorded in the cluster: the CLI's record ConfigMap, else the DinoExperiment CR."""
    record = client.get("v1", "ConfigMap", child_name(name, "experiment", max_length=63), namespace=namespace)
    if record is not None:
        document = yaml.safe_load(record["data"]["spec.yaml"])
    else:
        document = client.get("dino-ctl.io/v1alpha1", "DinoExperiment", name, namespace=namespace)
        if document is None:
            raise KubeError("get", f"experiment {name} in {namespace or client.namespace}", 404,
                            "no record ConfigMap and no DinoExperiment of that name")
    experiment = parse_spec(document)
    validate_experiment(experiment)
    return experiment


def set_cancel(client: KubeClient, experiment: DinoExperiment, *, cancel: bool) -> None:
    """Set (or clear) the cancel request on the experiment record; the next pass deletes every unfinished job."""
    record = render_experiment_record(experiment)
    client.apply(
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {**record["metadata"], "annotations": {ANNOTATION_CANCEL: "true" if cancel else "false"}}},
        field_manager=STATE_FIELD_MANAGER,
    )


def wait(
    client: KubeClient,
    experiment: DinoExperiment,
    *,
    poll_seconds: float = 30.0,
    timeout_seconds: float | None = None,
    retry_failed: bool = False,
    on_pass: Callable[[Pass], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ExperimentPhase:
    """Reconcile until the experiment succeeds, fails or is cancelled (or ``timeout_seconds`` pass)."""
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    while True:
        result = reconcile_once(client, experiment, retry_failed=retry_failed)
        retry_failed = False  # a retry applies to the failures seen when it was asked for
        if on_pass is not None:
            on_pass(result)
        done = result.phase in (ExperimentPhase.SUCCEEDED, ExperimentPhase.FAILED, ExperimentPhase.CANCELLED)
        if done and not any(a.kind == ActionKind.DELETE for a in result.actions):
            return result.phase
        if deadline is not None and time.monotonic() >= deadline:
            return result.phase
        sleep(poll_seconds)
