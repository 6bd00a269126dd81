"""Carry out the controller's actions through :mod:`dino_ctl.kube` (the only module that calls the Kubernetes API).

The actions are executed by :func:`dino_ctl.reconcile.execute`, the CLI's executor, so ``dino-ctl submit --wait`` and
the controller create exactly the same objects. The controller adds one thing: every object it applies in the
experiment's namespace is owned by the DinoExperiment (``ownerReferences`` with ``controller: true``), so deleting the
resource garbage-collects its jobs and ConfigMaps, and ``kubectl get pytorchjob -o yaml`` shows who made it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from dino_ctl import reconcile as client_side
from dino_ctl.checkpoints import stage_checkpoints
from dino_ctl.errors import KubeError
from dino_ctl.kube import STATE_KINDS, KubeClient
from dino_ctl.naming import LABEL_EXPERIMENT
from dino_ctl.observe import JOB_KINDS, Observed, observe
from dino_ctl.plan import Action
from dino_ctl.render.monitoring import render_experiment_monitoring
from dino_ctl.spec import DinoExperiment

__all__ = ["CheckpointReader", "Executor", "owner_reference", "read_latest_checkpoints"]

logger = logging.getLogger(__name__)

CheckpointReader = Callable[[DinoExperiment], Mapping[str, int | None]]
"""Reads the newest complete checkpoint iteration of every stage from storage (None: none yet)."""


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    """The controlling owner reference to a DinoExperiment.

    ``blockOwnerDeletion`` needs ``update`` on ``dinoexperiments/finalizers`` (the chart's Role grants it).
    """
    meta = body["metadata"]
    return {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def read_latest_checkpoints(experiment: DinoExperiment) -> dict[str, int | None]:
    """The newest complete checkpoint of each stage, read with fsspec from ``spec.storage.checkpoints``."""
    latest: dict[str, int | None] = {}
    for stage in stage_checkpoints(experiment):
        complete = [info.iteration for info in stage.checkpoints if info.complete]
        latest[stage.stage] = max(complete) if complete else None
    return latest


class _OwningClient:
    """A :class:`KubeClient` stand-in whose ``apply`` makes the experiment the owner of what it applies."""

    def __init__(self, client: KubeClient, owner: Mapping[str, Any], namespace: str) -> None:
        self._client, self._owner, self._namespace = client, dict(owner), namespace

    def apply(self, obj: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        meta = obj["metadata"]
        if meta.get("namespace", self._namespace) == self._namespace:  # owners must share the namespace
            obj = {**obj, "metadata": {**meta, "ownerReferences": [self._owner]}}
        return self._client.apply(obj, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class Executor:
    """Reads an experiment's state and applies actions for the controller.

    Args:
        client: the Kubernetes client (in a pod: the controller's service account).
        checkpoint_reader: reads checkpoints from storage for ``latestCheckpoint`` and the init/teacher gate; None
            leaves storage alone (the default: the controller then needs no storage credentials).
    """

    def __init__(self, client: KubeClient, *, checkpoint_reader: CheckpointReader | None = None) -> None:
        self.client = client
        self.checkpoint_reader = checkpoint_reader

    def current(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """The resource as stored now (``body`` may be older); None when it is gone or was replaced (another uid)."""
        meta = body["metadata"]
        live = self.client.get(body["apiVersion"], body["kind"], meta["name"], namespace=meta["namespace"])
        if live is None or live["metadata"].get("uid") != meta["uid"]:
            return None
        return live

    def write_status(self, body: Mapping[str, Any], patch: Mapping[str, Any]) -> None:
        """Merge ``patch`` into the resource's status subresource; an empty patch writes nothing."""
        if patch:
            meta = body["metadata"]
            self.client.patch_status(body["apiVersion"], body["kind"], meta["name"], patch,
                                     namespace=meta["namespace"])

    def observe(self, experiment: DinoExperiment, body: Mapping[str, Any]) -> Observed:
        """The experiment's objects plus the resource itself (it carries the cancel annotation), reduced."""
        objects = self.client.experiment_objects(experiment.name, namespace=experiment.namespace)
        checkpoints = None
        if self.checkpoint_reader is not None:
            try:
                checkpoints = self.checkpoint_reader(experiment)
            except Exception as exc:  # storage trouble must not stop the jobs being reconciled
                logger.warning("%s: cannot read checkpoints (%s); continuing without them", experiment.name, exc)
        return observe([*objects, dict(body)], experiment=experiment.name, checkpoints=checkpoints)

    def execute(self, experiment: DinoExperiment, actions: Sequence[Action], observed: Observed,
                body: Mapping[str, Any]) -> None:
        """Apply ``actions`` with the CLI's executor; everything applied is owned by ``body``."""
        owning = _OwningClient(self.client, owner_reference(body), experiment.namespace)
        client_side.execute(owning, experiment, list(actions), observed)  # type: ignore[arg-type]

    def apply_monitoring(self, experiment: DinoExperiment, body: Mapping[str, Any]) -> list[str]:
        """Apply the experiment's PodMonitor and PrometheusRule when ``spec.monitoring.podMonitor``.

        Returns warnings for the user (e.g. the Prometheus Operator CRDs are not installed) instead of failing:
        training does not depend on being scraped.
        """
        monitoring = experiment.spec.monitoring
        if not monitoring.pod_monitor:
            return []
        owning = _OwningClient(self.client, owner_reference(body), experiment.namespace)
        warnings = []
        for obj in render_experiment_monitoring(
            experiment=experiment.name,
            namespace=experiment.namespace,
            release_labels={"release": monitoring.release} if monitoring.release else None,
            scrape_interval=monitoring.scrape_interval,
        ):
            try:
                owning.apply(obj)
            except KubeError as exc:
                if exc.status != 404:
                    raise
                warnings.append(f"{obj['kind']} not applied: {obj['apiVersion']} is not served by this cluster "
                                "(install the Prometheus Operator CRDs to scrape the trainer)")
        return warnings

    def delete_children(self, experiment: DinoExperiment) -> list[str]:
        """Delete the experiment's jobs (``Foreground``: after their pods); return the jobs still present.

        Used by the finalizer: the resource disappears only once no pod of it can still write a checkpoint.
        """
        remaining = []
        for api_version, kind in _job_kinds():
            for job in self.client.list(api_version, kind, namespace=experiment.namespace,
                                        selector=f"{LABEL_EXPERIMENT}={experiment.name}"):
                name = job["metadata"]["name"]
                remaining.append(f"{kind}/{name}")
                if not job["metadata"].get("deletionTimestamp"):
                    self.client.delete(api_version, kind, name, namespace=experiment.namespace)
        return remaining


def _job_kinds() -> Iterable[tuple[str, str]]:
    return [(api_version, kind) for api_version, kind in STATE_KINDS if kind in JOB_KINDS]
