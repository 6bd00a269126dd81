"""Prometheus metrics of a curation rank: exactly :data:`trainer.metric_names.CURATION_METRICS`.

Each rank owns a :class:`CurationMetrics` with its own ``CollectorRegistry`` (several coexist in tests) and serves it
on ``--metrics-port`` (+ ``LOCAL_RANK``, so every rank of a node has its own port). Disabled, every call is a no-op:
library use and tests pay nothing. Counters are per rank (images this rank embedded); the k-means gauges are the
same on every rank (sums and counts are all-reduced before the inertia is known).
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from trainer.metric_names import CURATION_METRICS

__all__ = ["CurationMetrics"]

logger = logging.getLogger(__name__)


class CurationMetrics:
    """The curation metrics of one rank; ``enabled=False`` makes every method a no-op."""

    def __init__(self, *, enabled: bool = False, rank: int = 0) -> None:
        self.enabled = enabled
        self.rank = rank
        self.port: int | None = None
        self._server: Any = None
        self.metrics: dict[str, Any] = {}
        self.registry: Any = None
        if enabled:
            types = {"counter": Counter, "gauge": Gauge}
            self.registry = CollectorRegistry(auto_describe=True)
            for name, (kind, help_text, labels) in CURATION_METRICS.items():
                self.metrics[name] = types[kind](name, help_text, labels, registry=self.registry)

    def start_server(self, port: int, addr: str = "0.0.0.0") -> int | None:
        """Serve /metrics on ``port`` (0: a free one); returns the bound port."""
        if not self.enabled:
            return None
        self._server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = self._server.server_port
        logger.info("rank %d serves curation metrics on port %d", self.rank, self.port)
        return self.port

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _get(self, name: str, **labels: str) -> Any:
        metric = self.metrics[name]
        return metric.labels(**labels) if labels else metric

    def images_embedded(self, source: str, num: int) -> None:
        if self.enabled:
            self._get("dino_curation_images_embedded_total", source=source).inc(num)

    def shard(self, step: str, outcome: str) -> None:
        """``outcome``: ``computed`` or ``reused`` (committed by an earlier run)."""
        if self.enabled:
            self._get("dino_curation_shards_total", step=step, outcome=outcome).inc()

    def kmeans_iteration(self, fit: str, iteration: int, inertia: float) -> None:
        if self.enabled:
            self._get("dino_curation_kmeans_iteration", fit=fit).set(iteration)
            self._get("dino_curation_kmeans_inertia", fit=fit).set(inertia)

    def duplicates_found(self, kind: str, num: int) -> None:
        """``kind``: ``copy`` (self-dedup) or ``eval`` (near an evaluation image)."""
        if self.enabled:
            self._get("dino_curation_duplicates_found_total", kind=kind).inc(num)

    def step_done(self, step: str, seconds: float) -> None:
        if self.enabled:
            self._get("dino_curation_step_duration_seconds", step=step).set(seconds)
            self._get("dino_curation_step_completed", step=step).set(1)

    def value(self, name: str, **labels: str) -> float:
        """A metric's current value (tests and the bench); 0 when disabled or never set."""
        if not self.enabled:
            return 0.0
        found = self.registry.get_sample_value(name, labels or None)
        return float(found) if found is not None else 0.0
