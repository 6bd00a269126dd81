"""kopf handlers for ``DinoExperiment`` (thin) and the :class:`Controller` they call.

One reconcile runs on create, on a change of spec, labels or annotations, when the operator resumes, and every
``interval`` seconds (jobs change state without touching the resource). Each run, holding the resource's lock:
re-read the resource, parse and validate it, observe its objects, run the pure
:func:`dino_ctl.controller.core.reconcile`, execute the actions and write the status subresource (what changed only);
then, outside the lock, post the events.
Everything the next run needs lives in the cluster (stage ConfigMaps, jobs, the resource's status), so a restarted
controller continues where the previous one stopped and never creates anything twice.

Deletion: kopf keeps a finalizer on the resource; the delete handler deletes the jobs (foreground, so pods get their
SIGTERM checkpoint) and retries until none is left, then kopf removes the finalizer and ownerReferences
garbage-collect the rest.
"""

from __future__ import annotations

import copy
import datetime
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from dino_ctl.errors import KubeError, SpecErrors
from dino_ctl.schema import PLURAL
from dino_ctl.spec import API_VERSION, DinoExperiment, parse_spec
from dino_ctl.validation import validate_experiment

from dino_ctl.controller.core import WARNING, Event, reconcile
from dino_ctl.controller.executor import Executor
from dino_ctl.controller.metrics import ControllerMetrics
from dino_ctl.controller.status import INVALID_PHASE, invalid_status

__all__ = ["FINALIZER", "Controller", "Handlers", "Outcome", "apply_outcome", "build_registry", "make_handlers",
           "operator_settings", "status_patch"]

logger = logging.getLogger(__name__)

GROUP, VERSION = API_VERSION.split("/")
FINALIZER = "dino-ctl.io/cleanup"
STORAGE_PREFIX = "dino-ctl.io"
Poster = Callable[[Mapping[str, Any], Event], None]


def _utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _plain(value: Any) -> Any:
    """A deep plain-dict copy of a kopf body (its views are mappings, not dicts)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return copy.copy(value)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What one reconcile did: the status it wrote, the events to post and, on failure, the error."""

    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    error: str | None = None
    permanent: bool = False
    """Retrying cannot help (invalid spec, RBAC, missing CRD) until something changes."""


class Controller:
    """Reconciles DinoExperiments; the kopf handlers only translate its :class:`Outcome`.

    Args:
        executor: reads the cluster and applies actions (through :mod:`dino_ctl.kube`).
        metrics: the controller's Prometheus metrics.
        clock: RFC 3339 "now" for condition transition times.
    """

    def __init__(self, executor: Executor, metrics: ControllerMetrics, *, clock: Callable[[], str] = _utcnow) -> None:
        self.executor = executor
        self.metrics = metrics
        self.clock = clock
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, uid: str) -> threading.Lock:
        # The timer and the change handlers may fire together for one resource: serialise its passes.
        with self._locks_guard:
            return self._locks.setdefault(uid, threading.Lock())

    def _invalid(self, body: Mapping[str, Any], exc: SpecErrors) -> Outcome:
        previous = body.get("status") or {}
        status = invalid_status([str(e) for e in exc.errors], previous=previous, now=self.clock(),
                                generation=body["metadata"].get("generation"))
        self.metrics.set_phase(body["metadata"]["uid"], INVALID_PHASE)
        if all(previous.get(key) == status.get(key) for key in ("phase", "message", "observedGeneration")):
            # Already reported for this generation (by this process or an earlier one): a periodic pass or a
            # restart changes nothing, so it neither reports, nor counts, nor fails again. Only a new spec helps.
            return Outcome(status=dict(previous))
        self.metrics.count_error("invalid_spec")
        event = Event(type=WARNING, reason="InvalidSpec", message=status["message"])
        return Outcome(status=status, events=[event], error=status["message"], permanent=True)

    def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        """One full pass over the resource ``body`` (as kopf delivered it); the new status is written before return.

        The timer and the change handlers may fire together for one resource, each with the body it was given; the
        pass therefore re-reads the resource under a per-resource lock and writes its status (only what changed)
        before releasing it, so the next pass starts from what this one wrote and never reports an event twice.
        """
        meta = body["metadata"]
        with self._lock(meta["uid"]):
            try:
                current = self.executor.current(_plain(body))
            except KubeError as exc:
                return self._api_error(f"{meta.get('namespace')}/{meta['name']}", exc, body.get("status") or {})
            if current is None:
                return Outcome(status={})  # deleted meanwhile: nothing to reconcile, nothing to write
            outcome = self._pass(current)
            try:
                self.executor.write_status(current, status_patch(current.get("status") or {}, outcome.status))
            except KubeError as exc:  # nothing of this pass was recorded: the next pass reports it again
                return self._api_error(f"{meta.get('namespace')}/{meta['name']}", exc, current.get("status") or {})
            return outcome

    def _pass(self, body: dict[str, Any]) -> Outcome:
        try:
            experiment = parse_spec(body)
            validate_experiment(experiment)
        except SpecErrors as exc:
            return self._invalid(body, exc)
        return self._reconcile(experiment, body)

    def _api_error(self, name: str, exc: KubeError, previous: Mapping[str, Any]) -> Outcome:
        self.metrics.count_error("api")
        logger.warning("%s: %s", name, exc)
        event = Event(type=WARNING, reason="ReconcileError", message=str(exc))
        return Outcome(status=dict(previous), events=[event], error=str(exc), permanent=exc.permanent)

    def _reconcile(self, experiment: DinoExperiment, body: dict[str, Any]) -> Outcome:
        previous = body.get("status") or {}
        try:
            observed = self.executor.observe(experiment, body)
            result = reconcile(experiment, observed, previous, now=self.clock(),
                               generation=body["metadata"].get("generation"))
            self.executor.execute(experiment, result.actions, observed, body)
            events = list(result.events)
            if previous.get("observedGeneration") != body["metadata"].get("generation"):
                # First pass over this spec: (re)apply its monitoring objects, which no later pass changes.
                events += [Event(type=WARNING, reason="MonitoringNotApplied", message=w)
                           for w in self.executor.apply_monitoring(experiment, body)]
        except KubeError as exc:
            return self._api_error(f"{experiment.namespace}/{experiment.name}", exc, previous)
        except Exception:  # a bug: counted, then kopf logs it, posts an event and retries with backoff
            self.metrics.count_error("internal")
            raise
        self.metrics.count_restarts(experiment.name, result.restarts)
        self.metrics.set_phase(body["metadata"]["uid"], result.status["phase"])
        return Outcome(status=result.status, events=events)

    def finalize(self, body: Mapping[str, Any]) -> list[str]:
        """Delete the resource's jobs; return those still present (the caller retries until none is left)."""
        body = _plain(body)
        try:
            experiment = parse_spec(body)
        except SpecErrors:
            return []  # nothing was ever submitted for a spec that never parsed
        remaining = self.executor.delete_children(experiment)
        if not remaining:
            self.metrics.set_phase(body["metadata"]["uid"], None)
            with self._locks_guard:
                self._locks.pop(body["metadata"]["uid"], None)
        return remaining


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning status ``old`` into ``new`` (keys that disappeared are removed); {} if equal."""
    patch: dict[str, Any] = {key: None for key in old if key not in new and key != "kopf"}  # kopf's bookkeeping
    patch.update({key: value for key, value in new.items() if old.get(key) != value})
    return patch


def apply_outcome(outcome: Outcome, *, body: Mapping[str, Any], post: Poster, retry_delay: float) -> None:
    """Report ``outcome`` through kopf (its status is already written): post the events, raise its error."""
    for event in outcome.events:
        post(body, event)
    if outcome.error is not None:
        if outcome.permanent:
            raise kopf.PermanentError(outcome.error)
        raise kopf.TemporaryError(outcome.error, delay=retry_delay)


def _kopf_post(body: Mapping[str, Any], event: Event) -> None:
    kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])


def operator_settings() -> kopf.OperatorSettings:
    """Operator settings: our finalizer and annotation names, no cluster-wide scanning (namespaced RBAC)."""
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STORAGE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=STORAGE_PREFIX)
    settings.scanning.disabled = True  # watching CRDs and namespaces would need cluster-wide list/watch
    settings.posting.level = logging.INFO
    return settings


@dataclass(frozen=True)
class Handlers:
    """The plain functions kopf calls, bound to one :class:`Controller` (tests call them directly)."""

    on_change: Callable[..., None]
    on_delete: Callable[..., None]


def make_handlers(controller: Controller, *, interval: float, post: Poster = _kopf_post) -> Handlers:
    """Handler functions for ``controller``: reconcile on change/timer, clean up on delete."""

    def on_change(body: kopf.Body, **_: Any) -> None:
        apply_outcome(controller.reconcile(body), body=body, post=post, retry_delay=interval)

    def on_delete(body: kopf.Body, **_: Any) -> None:
        remaining = controller.finalize(body)
        if remaining:
            raise kopf.TemporaryError(f"waiting for {', '.join(remaining)} to be deleted", delay=min(interval, 10))

    return Handlers(on_change=on_change, on_delete=on_delete)


def build_registry(controller: Controller, *, interval: float, post: Poster = _kopf_post) -> kopf.OperatorRegistry:
    """A kopf registry with the DinoExperiment handlers bound to ``controller``."""
    handlers = make_handlers(controller, interval=interval, post=post)
    registry = kopf.OperatorRegistry()
    # A plain OperatorRegistry has no login handler (only kopf's default registry gets its fallbacks): without this
    # the operator starts, finds no credentials and exits. The kubernetes client's own loading: the pod's service
    # account in a cluster, else the current kubeconfig context.
    kopf.on.login(registry=registry, id="login", errors=kopf.ErrorsMode.IGNORED)(kopf.login_via_client)
    resource = (GROUP, VERSION, PLURAL)
    kopf.on.resume(*resource, registry=registry, id="reconcile")(handlers.on_change)
    kopf.on.create(*resource, registry=registry, id="reconcile")(handlers.on_change)
    # Spec, labels or annotations (e.g. the cancel request); kopf leaves status changes out of its diff.
    kopf.on.update(*resource, registry=registry, id="reconcile")(handlers.on_change)
    kopf.timer(*resource, registry=registry, id="periodic", interval=interval, initial_delay=interval)(
        handlers.on_change
    )
    kopf.on.delete(*resource, registry=registry, id="cleanup")(handlers.on_delete)
    return registry
