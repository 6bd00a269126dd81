"""The controller's Prometheus metrics, exactly as listed in ``trainer/metric_names.py`` ``CONTROLLER_METRICS``."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from trainer.metric_names import CONTROLLER_METRICS

from dino_ctl.controller.status import INVALID_PHASE
from dino_ctl.observe import Reason
from dino_ctl.plan import ExperimentPhase

__all__ = ["ERROR_KINDS", "PHASES", "ControllerMetrics"]

PHASES: tuple[str, ...] = (*(phase.value for phase in ExperimentPhase), INVALID_PHASE)
ERROR_KINDS = ("api", "invalid_spec", "internal")
"""``kind`` label of reconcile errors: the API refused or failed, the spec is invalid, a bug."""


def _spec(name: str) -> tuple[str, str, list[str]]:
    kind, help_text, labels = CONTROLLER_METRICS[name]
    return name, help_text, list(labels)


class ControllerMetrics:
    """Counters and the per-phase gauge on their own registry (served by :meth:`serve`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        name, help_text, labels = _spec("dino_ctl_stage_restarts_total")
        # prometheus_client appends _total to counters itself.
        self.stage_restarts = Counter(name.removesuffix("_total"), help_text, labels, registry=self.registry)
        name, help_text, labels = _spec("dino_ctl_reconcile_errors_total")
        self.reconcile_errors = Counter(name.removesuffix("_total"), help_text, labels, registry=self.registry)
        name, help_text, labels = _spec("dino_ctl_experiments")
        self.experiments = Gauge(name, help_text, labels, registry=self.registry)
        for kind in ERROR_KINDS:  # zero series exist from the start, so increase() sees the first error
            self.reconcile_errors.labels(kind=kind)
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()
        self._publish()

    def count_restarts(self, experiment: str, restarts: Iterable[tuple[str, Reason]]) -> None:
        """Count stage restarts newly recorded by a pass (``Reconciliation.restarts``)."""
        for stage, reason in restarts:
            self.stage_restarts.labels(experiment=experiment, stage=stage, reason=reason.value).inc()

    def count_error(self, kind: str) -> None:
        """Count one failed reconcile; ``kind`` is one of :data:`ERROR_KINDS`."""
        assert kind in ERROR_KINDS, kind
        self.reconcile_errors.labels(kind=kind).inc()

    def set_phase(self, uid: str, phase: str | None) -> None:
        """Record the phase of experiment ``uid`` (None: it is gone) and republish the per-phase counts."""
        with self._lock:
            if phase is None:
                self._phases.pop(uid, None)
            else:
                self._phases[uid] = phase
            self._publish()

    def _publish(self) -> None:
        for phase in PHASES:
            self.experiments.labels(phase=phase).set(sum(p == phase for p in self._phases.values()))

    def serve(self, port: int, *, addr: str = "0.0.0.0") -> Any:
        """Serve ``/metrics`` on ``port`` from a background thread; returns the server (``.shutdown()`` stops it)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
