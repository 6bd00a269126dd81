"""Training telemetry: Prometheus /metrics, JSON-lines records and a console line, fed by one call per step.

:class:`TrainMetrics` creates exactly the metrics of :data:`trainer.metric_names.TRAINER_METRICS` in its own
``CollectorRegistry`` (no process-wide default-registry collectors, so several instances coexist in tests) and serves
them on each node's local rank 0. Every ``log_interval`` steps :meth:`TrainMetrics.observe_step` returns a log record
(a flat dict) that the loop writes with :class:`JsonlLogger` and prints with :func:`format_console`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import fsspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from trainer.config import MetricsConfig
from trainer.metric_names import TRAINER_METRICS

__all__ = ["JsonlLogger", "TrainMetrics", "format_console"]

logger = logging.getLogger(__name__)

# Iterations take ~0.1 s (tiny CPU model) to ~minutes (ViT-g, large batch); data waits should sit near zero.
_BUCKETS = {
    "dino_train_iteration_duration_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
    "dino_data_wait_seconds": (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
}
_TYPES = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


def _package_version() -> str:
    try:
        return importlib.metadata.version("dino-ctl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class TrainMetrics:
    """The trainer's Prometheus metrics plus the per-interval throughput window.

    ``enabled=False`` (every rank but each node's local rank 0) keeps the records and the throughput window but
    creates no metrics and serves nothing. Images per second are global images over the wall time between two
    log records (data waits, checkpoints and logging included: what the cluster really delivers).
    """

    def __init__(self, config: MetricsConfig, *, enabled: bool) -> None:
        self.config = config
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics: dict[str, Any] = {}
        if enabled:
            for name, (kind, help_text, labels) in TRAINER_METRICS.items():
                extra = {"buckets": _BUCKETS[name]} if kind == "histogram" else {}
                self.metrics[name] = _TYPES[kind](name, help_text, labels, registry=self.registry, **extra)
        self.port: int | None = None
        """Port the /metrics endpoint is bound to once :meth:`start_server` ran (resolves port 0)."""
        self._server: Any = None
        self._window_start: float | None = None  # set by the first step (setup time is not throughput)
        self._window_images = 0
        self._window_data_wait = 0.0
        self._window_steps = 0

    def start_server(self, addr: str = "0.0.0.0") -> int | None:
        """Serve /metrics on ``config.port`` (0: a free port); returns the bound port, None when disabled."""
        if not self.enabled or self.config.port < 0:
            return None
        if self._server is not None:
            return self.port
        try:
            self._server, _thread = start_http_server(self.config.port, addr=addr, registry=self.registry)
        except OSError as error:
            raise OSError(
                f"metrics.port: cannot serve /metrics on {addr}:{self.config.port} ({error.strerror}); allowed: a free "
                "port, 0 (any free port) or -1 (off)"
            ) from error
        self.port = self._server.server_port
        logger.info("serving Prometheus metrics on %s:%d/metrics", addr, self.port)
        return self.port

    def set_build_info(self, *, stage: str, recipe: str) -> None:
        """``dino_build_info{version, torch, stage, recipe} 1``."""
        if not self.enabled:
            return
        torch_module = sys.modules.get("torch")
        torch_version = getattr(torch_module, "__version__", "unknown")
        self.metrics["dino_build_info"].labels(_package_version(), torch_version, stage, recipe).set(1)

    def observe_step(
        self,
        iteration: int,
        *,
        losses: Mapping[str, float],
        lr: float,
        wd: float,
        momentum: float,
        teacher_temp: float,
        grad_norms: Mapping[str, float],
        step_seconds: float,
        data_wait_seconds: float,
        images: int,
        bad_samples: int,
        mfu: float | None = None,
        gpu_mem: float | None = None,
    ) -> dict[str, Any] | None:
        """Record one finished optimiser step (``iteration`` = steps done so far, absolute).

        ``images`` is the global batch of the step, ``bad_samples`` the replaced images of the step. Returns the
        log record every ``config.log_interval`` iterations, else None.
        """
        if self._window_start is None:
            self._window_start = time.monotonic() - step_seconds - data_wait_seconds
        self._window_images += images
        self._window_data_wait += data_wait_seconds
        self._window_steps += 1
        if self.enabled:
            self._update(iteration, losses, lr, wd, momentum, teacher_temp, grad_norms)
            self._update_step(step_seconds, data_wait_seconds, images, bad_samples, mfu, gpu_mem)
        if iteration % max(1, self.config.log_interval):
            return None
        now = time.monotonic()
        elapsed = max(now - self._window_start, 1e-9)
        images_per_second = self._window_images / elapsed
        record: dict[str, Any] = {
            "iteration": iteration,
            "time": time.time(),
            **{f"loss/{name}": float(value) for name, value in losses.items()},
            "lr": lr,
            "wd": wd,
            "momentum": momentum,
            "teacher_temp": teacher_temp,
            **{f"grad_norm/{name}": float(value) for name, value in grad_norms.items()},
            "step_seconds": step_seconds,
            "data_wait_seconds": self._window_data_wait / self._window_steps,
            "images_per_second": images_per_second,
            "bad_samples": bad_samples,
        }
        if mfu is not None:
            record["mfu"] = mfu
        if gpu_mem is not None:
            record["gpu_mem_bytes"] = gpu_mem
        if self.enabled:
            self.metrics["dino_train_images_per_second"].set(images_per_second)
        self._window_start, self._window_images, self._window_data_wait, self._window_steps = now, 0, 0.0, 0
        return record

    def _update(self, iteration: int, losses: Mapping[str, float], lr: float, wd: float, momentum: float,
                teacher_temp: float, grad_norms: Mapping[str, float]) -> None:
        m = self.metrics
        m["dino_train_iterations_total"].inc()
        m["dino_train_iteration"].set(iteration)
        for component, value in losses.items():
            m["dino_train_loss"].labels(component).set(value)
        m["dino_train_learning_rate"].set(lr)
        m["dino_train_weight_decay"].set(wd)
        m["dino_train_teacher_momentum"].set(momentum)
        m["dino_train_teacher_temperature"].set(teacher_temp)
        for module, value in grad_norms.items():
            m["dino_train_grad_norm"].labels(module).set(value)

    def _update_step(self, step_seconds: float, data_wait_seconds: float, images: int, bad_samples: int,
                     mfu: float | None, gpu_mem: float | None) -> None:
        m = self.metrics
        m["dino_train_samples_total"].inc(images)
        m["dino_train_iteration_duration_seconds"].observe(step_seconds)
        m["dino_data_wait_seconds"].observe(data_wait_seconds)
        if bad_samples:
            m["dino_data_bad_samples_total"].inc(bad_samples)
        if mfu is not None:
            m["dino_train_mfu_ratio"].set(mfu)
        if gpu_mem is not None:
            m["dino_gpu_memory_allocated_bytes"].set(gpu_mem)

    def observe_checkpoint(self, iteration: int, duration_s: float) -> None:
        """A checkpoint of ``iteration`` was published after ``duration_s`` seconds."""
        if not self.enabled:
            return
        self.metrics["dino_checkpoint_last_iteration"].set(iteration)
        self.metrics["dino_checkpoint_last_success_timestamp_seconds"].set(time.time())
        self.metrics["dino_checkpoint_save_duration_seconds"].set(duration_s)

    def observe_nonfinite(self) -> None:
        """A step was stopped by a NaN/inf loss."""
        if self.enabled:
            self.metrics["dino_train_nonfinite_loss_total"].inc()

    def close(self) -> None:
        """Stop the HTTP server (the registry stays readable)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


class JsonlLogger:
    """Appends one JSON object per line to ``path`` (a local path, or an fsspec URI), flushed per record.

    Object stores cannot append: for a URI the records go to a local spool file that is uploaded whole at most
    every ``upload_interval_s`` seconds and on :meth:`close`.
    """

    def __init__(self, path: str, *, upload_interval_s: float = 60.0) -> None:
        self.path = path
        fs, root = fsspec.core.url_to_fs(path)
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
        self._remote = None if "file" in protocols or "local" in protocols else (fs, root)
        local = root if self._remote is None else os.path.join(
            os.environ.get("TMPDIR", "/tmp"), f"dino-ctl-{os.getpid()}-{os.path.basename(root)}"
        )
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        self._local = local
        self._handle = open(local, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._upload_interval_s = upload_interval_s
        self._last_upload = time.monotonic()

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (non-finite floats, also nested ones, are written as null: JSON has no NaN)."""
        self._handle.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")
        self._handle.flush()
        if self._remote is not None and time.monotonic() - self._last_upload >= self._upload_interval_s:
            self._upload()

    def _upload(self) -> None:
        fs, root = self._remote
        fs.put_file(self._local, root)
        self._last_upload = time.monotonic()

    def close(self) -> None:
        if self._handle.closed:
            return
        self._handle.close()
        if self._remote is not None:
            self._upload()


def format_console(record: Mapping[str, Any]) -> str:
    """One human-readable line of a log record, e.g.
    ``it 120 | loss 9.21 (dino 4.6 ibot 4.7 koleo -0.09) | lr 1.2e-03 | 812.4 img/s | data 3.1 ms``."""
    losses = {key.split("/", 1)[1]: value for key, value in record.items() if key.startswith("loss/")}
    total = losses.pop("total", None)
    parts = [f"it {record['iteration']}"]
    detail = " ".join(f"{name} {value:.4g}" for name, value in losses.items())
    if total is not None:
        parts.append(f"loss {total:.4g}" + (f" ({detail})" if detail else ""))
    elif detail:
        parts.append(f"loss {detail}")
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{record['images_per_second']:.1f} img/s")
    parts.append(f"data {1e3 * record['data_wait_seconds']:.1f} ms")
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    return " | ".join(parts)
