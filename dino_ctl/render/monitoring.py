"""Monitoring objects for dino-ctl experiments: PodMonitor, PrometheusRule and a Grafana dashboard ConfigMap.

Pure builders (keyword arguments in, plain dicts out, no I/O), used three ways: per experiment by ``dino-ctl render``,
by ``python -m dino_ctl.controller.manifests`` for the committed ``manifests/`` and by the Helm chart's generated
files. Every query references only metrics listed in ``trainer/metric_names.py`` or the dcgm-exporter metrics in
``DCGM_METRICS``; :func:`referenced_metric_names` lets tests (and callers) check that.

Label model. The PodMonitor copies the pod labels ``dino-ctl.io/experiment`` and ``dino-ctl.io/stage`` into the target
labels ``experiment`` and ``stage``, which are also the label names of the controller's own metrics, so one dashboard
variable filters both. Prometheus adds ``namespace`` and ``pod`` to every pod target, the keys on which training
metrics join dcgm-exporter's per-GPU metrics.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer.metric_names import CONTROLLER_METRICS, CURATION_METRICS, TRAINER_METRICS

from dino_ctl.naming import LABEL_EXPERIMENT, LABEL_STAGE, truncate_name

EXPERIMENT_LABEL = LABEL_EXPERIMENT
STAGE_LABEL = LABEL_STAGE
METRICS_PORT_NAME = "metrics"
# The kube-prometheus-stack Grafana sidecar loads every ConfigMap carrying this label.
GRAFANA_DASHBOARD_LABEL = {"grafana_dashboard": "1"}
DCGM_METRICS: tuple[str, ...] = ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE")
DASHBOARD_UID = "dino-ctl-training"
_COMMON_LABELS = {"app.kubernetes.io/name": "dino-ctl", "app.kubernetes.io/managed-by": "dino-ctl"}
_DURATION = re.compile(r"^[0-9]+(ms|s|m|h)$")


@dataclass(frozen=True, kw_only=True)
class AlertThresholds:
    """When the alerts in :func:`alert_rule_groups` fire."""

    stall_minutes: int = 15
    """Training stalled: no increase of ``dino_train_iterations_total`` over this window while the pods are up."""
    stall_for_minutes: int = 5
    """... and the condition has held this long (absorbs one slow checkpoint save or a data-loader hiccup)."""
    checkpoint_max_age_minutes: int = 120
    """Checkpoint stale: the newest complete checkpoint is older than this."""
    restart_window_minutes: int = 60
    """Restart storm: window over which ``dino_ctl_stage_restarts_total`` increases are counted."""
    max_restarts: int = 3
    """Restart storm: more restarts than this within the window (per stage and reason) fires."""

    def __post_init__(self) -> None:
        for name in ("stall_minutes", "stall_for_minutes", "checkpoint_max_age_minutes", "restart_window_minutes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AlertThresholds.{name}={value!r}: must be an integer number of minutes >= 1")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"AlertThresholds.max_restarts={self.max_restarts!r}: must be an integer >= 0")


def _metadata(*, name: str, namespace: str | None, labels: Mapping[str, str] | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": {**_COMMON_LABELS, **(labels or {})}}
    if namespace is not None:
        metadata["namespace"] = namespace
    return metadata


def _pod_selector(experiment: str | None) -> dict[str, Any]:
    # Without an experiment the monitor covers every dino-ctl training pod in the watched namespaces.
    if experiment is None:
        return {"matchExpressions": [{"key": EXPERIMENT_LABEL, "operator": "Exists"}]}
    return {"matchLabels": {EXPERIMENT_LABEL: experiment}}


def _label_to_target(pod_label: str, target: str) -> dict[str, Any]:
    # Prometheus exposes pod label ``dino-ctl.io/x`` as ``__meta_kubernetes_pod_label_dino_ctl_io_x``.
    meta = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", pod_label)
    return {"action": "replace", "sourceLabels": [meta], "targetLabel": target}


def render_pod_monitor(
    *,
    name: str,
    namespace: str | None,
    experiment: str | None = None,
    release_labels: Mapping[str, str] | None = None,
    scrape_interval: str = "30s",
    namespaces: list[str] | None = None,
) -> dict[str, Any]:
    """A ``monitoring.coreos.com/v1`` PodMonitor scraping the ``metrics`` port of dino-ctl training pods.

    Args:
        name: object name.
        namespace: object namespace (``None`` leaves it to the applier, e.g. Helm's release namespace).
        experiment: scrape only this experiment's pods; ``None`` scrapes every pod labelled ``dino-ctl.io/experiment``.
        release_labels: labels a Prometheus selects monitors by (kube-prometheus-stack: ``{"release": "<name>"}``).
        scrape_interval: Prometheus duration such as ``"30s"``.
        namespaces: namespaces to discover pods in; ``None`` means the PodMonitor's own namespace.
    """
    if not _DURATION.match(scrape_interval):
        raise ValueError(f"scrape_interval={scrape_interval!r}: must be a Prometheus duration like '15s' or '1m'")
    endpoint = {
        "port": METRICS_PORT_NAME,
        "path": "/metrics",
        "interval": scrape_interval,
        # The trainer's dino_build_info carries its own ``stage`` label; keep it rather than renaming to exported_stage.
        "honorLabels": True,
        "relabelings": [_label_to_target(EXPERIMENT_LABEL, "experiment"), _label_to_target(STAGE_LABEL, "stage")],
    }
    spec: dict[str, Any] = {"selector": _pod_selector(experiment), "podMetricsEndpoints": [endpoint]}
    if namespaces:
        spec["namespaceSelector"] = {"matchNames": list(namespaces)}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _metadata(name=name, namespace=namespace, labels=release_labels),
        "spec": spec,
    }


def _selector(metric: str, experiment: str | None, *matchers: str) -> str:
    parts = [f'experiment="{experiment}"'] if experiment is not None else []
    parts.extend(matchers)
    return f"{metric}{{{','.join(parts)}}}" if parts else metric


def _training_alerts(thresholds: AlertThresholds, experiment: str | None) -> list[dict[str, Any]]:
    by = "namespace, experiment, stage"
    stall = thresholds.stall_minutes
    stalled = (
        f"sum by ({by}) (increase({_selector('dino_train_iterations_total', experiment)}[{stall}m])) == 0\n"
        # dino_build_info is 1 while a training process answers scrapes: a hung NCCL collective still serves /metrics.
        f"and on ({by}) max by ({by}) ({_selector('dino_build_info', experiment)}) == 1"
    )
    loss = _selector("dino_train_loss", experiment)
    nonfinite = (
        f"sum by ({by}) (increase({_selector('dino_train_nonfinite_loss_total', experiment)}[10m])) > 0\n"
        f"or max by ({by}) (({loss} != {loss}) or (abs({loss}) == +Inf))"
    )
    age_seconds = thresholds.checkpoint_max_age_minutes * 60
    ckpt = _selector("dino_checkpoint_last_success_timestamp_seconds", experiment)
    # A zero timestamp means "no checkpoint yet in this run", which the stalled alert covers instead.
    stale = f"max by ({by}) (time() - ({ckpt} > 0)) > {age_seconds}"
    return [
        _alert(
            "DinoTrainingStalled",
            stalled,
            for_minutes=thresholds.stall_for_minutes,
            severity="critical",
            summary="Training of {{ $labels.experiment }}/{{ $labels.stage }} made no progress for " + f"{stall}m",
            description="dino_train_iterations_total did not increase while the pods answer scrapes: look for a "
            "hung collective (NCCL), a stuck data loader or a deadlocked checkpoint save. GPUs are burning idle.",
        ),
        _alert(
            "DinoLossNotFinite",
            nonfinite,
            for_minutes=0,
            severity="critical",
            summary="Non-finite loss in {{ $labels.experiment }}/{{ $labels.stage }}",
            description="The trainer reported a NaN/inf loss. Lower the learning rate or check the data; the run "
            "resumes from the last complete checkpoint.",
        ),
        _alert(
            "DinoCheckpointStale",
            stale,
            for_minutes=5,
            severity="warning",
            summary="Newest checkpoint of {{ $labels.experiment }}/{{ $labels.stage }} is "
            "{{ $value | humanizeDuration }} old",
            description=f"No complete checkpoint for more than {thresholds.checkpoint_max_age_minutes}m: a preemption "
            "now loses that much work. Check the checkpoint storage and the trainer logs.",
        ),
    ]


def _controller_alerts(thresholds: AlertThresholds, experiment: str | None) -> list[dict[str, Any]]:
    window = thresholds.restart_window_minutes
    restarts = _selector("dino_ctl_stage_restarts_total", experiment)
    storm = f"sum by (experiment, stage, reason) (increase({restarts}[{window}m])) > {thresholds.max_restarts}"
    alerts = [
        _alert(
            "DinoStageRestartStorm",
            storm,
            for_minutes=0,
            severity="warning",
            summary="{{ $labels.experiment }}/{{ $labels.stage }} restarted {{ $value | humanize }} times "
            + f"in {window}m (reason {{{{ $labels.reason }}}})",
            description="Reason 'preemption' or 'eviction' points at capacity (queue priority, spot reclaim, node "
            "loss); 'failure' at the job itself. See `kubectl describe dinoexperiment` events.",
        )
    ]
    if experiment is not None:  # the controller's health is not one experiment's: only in the cluster-wide rules
        return alerts
    return [
        *alerts,
        _alert(
            "DinoControllerReconcileErrors",
            "sum by (kind) (increase(dino_ctl_reconcile_errors_total[15m])) > 0",
            for_minutes=15,
            severity="warning",
            summary="dino-ctl controller reconcile errors ({{ $labels.kind }})",
            description="The controller failed to reconcile for 15 minutes; read its logs.",
        ),
    ]


def _alert(
    name: str, expr: str, *, for_minutes: int, severity: str, summary: str, description: str
) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_minutes:
        rule["for"] = f"{for_minutes}m"
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def alert_rule_groups(
    thresholds: AlertThresholds | None = None, *, experiment: str | None = None
) -> list[dict[str, Any]]:
    """Prometheus rule groups (the ``groups`` of a rule file and of a PrometheusRule spec).

    Args:
        thresholds: when the alerts fire; defaults to :class:`AlertThresholds`'s defaults.
        experiment: restrict every alert to this experiment's series (and leave out the controller's own
            reconcile-error alert); ``None`` covers all experiments. Where an experiment's rules and the cluster-wide
            ones both fire, the alerts carry identical labels and Alertmanager merges them into one.
    """
    thresholds = thresholds or AlertThresholds()
    return [
        {"name": "dino-ctl.training", "rules": _training_alerts(thresholds, experiment)},
        {"name": "dino-ctl.controller", "rules": _controller_alerts(thresholds, experiment)},
    ]


def render_prometheus_rule(
    *,
    name: str,
    namespace: str | None,
    thresholds: AlertThresholds | None = None,
    experiment: str | None = None,
    release_labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A ``monitoring.coreos.com/v1`` PrometheusRule carrying :func:`alert_rule_groups`."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _metadata(name=name, namespace=namespace, labels=release_labels),
        "spec": {"groups": alert_rule_groups(thresholds, experiment=experiment)},
    }


# Dashboard filters: every training query is restricted by the dashboard variables.
_F = 'namespace="$namespace",experiment=~"$experiment",stage=~"$stage"'
# Controller metrics come from the controller pod (another namespace, possibly): filter by experiment and stage only.
_CTL_F = 'experiment=~"$experiment",stage=~"$stage"'
_RATE = "[$__rate_interval]"


def _dcgm_per_pod(metric: str) -> str:
    """A dcgm-exporter metric averaged per pod and joined onto the experiment's training pods.

    dcgm-exporter attributes each GPU to ``namespace``/``pod``; scraped without ``honorLabels`` those arrive as
    ``exported_namespace``/``exported_pod``, so both spellings are folded into ``namespace``/``pod`` first.
    """
    folded = f'label_replace(label_replace({metric}, "namespace", "$1", "exported_namespace", "(.+)"), '
    folded += '"pod", "$1", "exported_pod", "(.+)")'
    return (
        f"avg by (namespace, pod) ({folded})\n"
        f"* on (namespace, pod) group_left (experiment, stage)\n"
        f"max by (namespace, pod, experiment, stage) (dino_build_info{{{_F}}})"
    )


@dataclass(frozen=True)
class _Panel:
    title: str
    unit: str
    targets: tuple[tuple[str, str], ...]
    """(PromQL, legend) pairs."""
    description: str = ""


def _quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le, stage) (rate({histogram}_bucket{{{_F}}}{_RATE})))"


_ROWS: tuple[tuple[str, tuple[_Panel, ...]], ...] = (
    ("Losses and schedules", (
        _Panel("Loss by component", "none", (
            (f"max by (stage, component) (dino_train_loss{{{_F}}})", "{{stage}} {{component}}"),)),
        _Panel("Learning rate and weight decay", "none", (
            (f"max by (stage) (dino_train_learning_rate{{{_F}}})", "{{stage}} lr"),
            (f"max by (stage) (dino_train_weight_decay{{{_F}}})", "{{stage}} wd"))),
        _Panel("Teacher temperature and momentum", "none", (
            (f"max by (stage) (dino_train_teacher_temperature{{{_F}}})", "{{stage}} temperature"),
            (f"max by (stage) (dino_train_teacher_momentum{{{_F}}})", "{{stage}} momentum"))),
        _Panel("Gradient norm (before clipping)", "none", (
            (f"max by (stage, module) (dino_train_grad_norm{{{_F}}})", "{{stage}} {{module}}"),)),
        _Panel("Non-finite losses and bad samples (1h)", "short", (
            (f"sum by (stage) (increase(dino_train_nonfinite_loss_total{{{_F}}}[1h]))", "{{stage}} non-finite"),
            (f"sum by (stage) (increase(dino_data_bad_samples_total{{{_F}}}[1h]))", "{{stage}} bad samples"))),
        _Panel("Iteration", "short", (
            (f"max by (stage) (dino_train_iteration{{{_F}}})", "{{stage}}"),)),
    )),
    ("Throughput", (
        _Panel("Images per second (global)", "short", (
            (f"max by (stage) (dino_train_images_per_second{{{_F}}})", "{{stage}}"),)),
        _Panel("Model FLOPs utilisation", "percentunit", (
            (f"avg by (stage) (dino_train_mfu_ratio{{{_F}}})", "{{stage}}"),)),
        _Panel("Iteration time", "s", (
            (_quantile(0.5, "dino_train_iteration_duration_seconds"), "{{stage}} p50"),
            (_quantile(0.95, "dino_train_iteration_duration_seconds"), "{{stage}} p95"))),
        _Panel("Share of step time waiting for data", "percentunit", (
            (f"sum by (stage) (rate(dino_data_wait_seconds_sum{{{_F}}}{_RATE}))\n/ sum by (stage) "
             f"(rate(dino_train_iteration_duration_seconds_sum{{{_F}}}{_RATE}))", "{{stage}}"),),
            "Above a few percent the input pipeline (decode, augment, object store) starves the GPUs."),
        _Panel("Data wait p95", "s", ((_quantile(0.95, "dino_data_wait_seconds"), "{{stage}} p95"),)),
        _Panel("Peak CUDA memory allocated", "bytes", (
            (f"max by (stage, pod) (dino_gpu_memory_allocated_bytes{{{_F}}})", "{{pod}}"),)),
    )),
    ("Checkpoints and restarts", (
        _Panel("Checkpoint age", "s", (
            (f"time() - max by (stage) (dino_checkpoint_last_success_timestamp_seconds{{{_F}}} > 0)", "{{stage}}"),),
            "Work lost if the run were preempted now."),
        _Panel("Last checkpoint iteration", "short", (
            (f"max by (stage) (dino_checkpoint_last_iteration{{{_F}}})", "{{stage}}"),)),
        _Panel("Checkpoint save time", "s", (
            (f"max by (stage) (dino_checkpoint_save_duration_seconds{{{_F}}})", "{{stage}}"),)),
        _Panel("Stage restarts by reason (1h)", "short", (
            (f"sum by (stage, reason) (increase(dino_ctl_stage_restarts_total{{{_CTL_F}}}[1h]))",
             "{{stage}} {{reason}}"),),
            "Counted by the dino-ctl controller; preemptions do not use the failure budget."),
    )),
    # Curation stages (curation.launch --metrics-port): the PodMonitor scrapes the port named ``metrics``, served by
    # each pod's local rank 0. The k-means metrics name their fit ``fit`` (not ``stage``, the target label the
    # PodMonitor sets from the pod's stage).
    ("Curation", (
        _Panel("Images embedded per second", "short", (
            (f"sum by (stage, source) (rate(dino_curation_images_embedded_total{{{_F}}}{_RATE}))",
             "{{stage}} {{source}}"),),
            "Counted by the rank that serves each pod's metrics port (local rank 0): multiply by the ranks per pod."),
        _Panel("k-means inertia", "none", (
            (f"max by (stage, fit) (dino_curation_kmeans_inertia{{{_F}}})",
             "{{stage}} {{fit}}"),)),
        _Panel("k-means iteration", "short", (
            (f"max by (stage, fit) (dino_curation_kmeans_iteration{{{_F}}})",
             "{{stage}} {{fit}}"),)),
        _Panel("Duplicates found", "short", (
            (f"max by (stage, kind) (dino_curation_duplicates_found_total{{{_F}}})", "{{stage}} {{kind}}"),)),
        _Panel("Steps completed", "short", (
            (f"max by (stage, step) (dino_curation_step_completed{{{_F}}})", "{{stage}} {{step}}"),)),
        _Panel("Step duration", "s", (
            (f"max by (stage, step) (dino_curation_step_duration_seconds{{{_F}}})", "{{stage}} {{step}}"),)),
    )),
    ("GPUs (dcgm-exporter, joined on namespace and pod)", (
        _Panel("GPU utilisation", "percent", ((_dcgm_per_pod("DCGM_FI_DEV_GPU_UTIL"), "{{pod}}"),)),
        _Panel("GPU memory used", "decmbytes", ((_dcgm_per_pod("DCGM_FI_DEV_FB_USED"), "{{pod}}"),)),
        _Panel("Tensor core activity", "percentunit", (
            (_dcgm_per_pod("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"), "{{pod}}"),),
            "Low while GPU utilisation is high usually means memory-bound kernels or small per-GPU batches."),
    )),
)


def _grafana_panel(panel: _Panel, *, panel_id: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def _dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    y = 0
    for row_title, row_panels in _ROWS:
        panels.append({"id": len(panels) + 1, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        for i, panel in enumerate(row_panels):
            panels.append(_grafana_panel(panel, panel_id=len(panels) + 1, x=(i % 3) * 8, y=y + (i // 3) * 8))
        y += 8 * ((len(row_panels) + 2) // 3)
    return panels


def _query_variable(name: str, label: str, query: str, *, multi: bool) -> dict[str, Any]:
    variable: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": f"var-{name}"},
        "definition": query,
        "refresh": 2,  # on time-range change: new experiments appear without reloading
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
    }
    if multi:
        variable["allValue"] = ".*"
    return variable


def _dashboard_templating() -> list[dict[str, Any]]:
    return [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
        _query_variable("namespace", "Namespace", "label_values(dino_build_info, namespace)", multi=False),
        _query_variable("experiment", "Experiment",
                        'label_values(dino_build_info{namespace="$namespace"}, experiment)', multi=True),
        _query_variable("stage", "Stage",
                        'label_values(dino_build_info{namespace="$namespace",experiment=~"$experiment"}, stage)',
                        multi=True),
    ]


def dashboard(*, title: str = "dino-ctl: DINOv2 training", uid: str = DASHBOARD_UID) -> dict[str, Any]:
    """The Grafana dashboard model (JSON-serialisable) for dino-ctl training runs."""
    return {
        "uid": uid,
        "title": title,
        "tags": ["dino-ctl", "training", "gpu"],
        "timezone": "browser",
        "schemaVersion": 39,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": _dashboard_templating()},
        "panels": _dashboard_panels(),
    }


def render_dashboard_configmap(
    *, name: str, namespace: str | None, labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A ConfigMap holding :func:`dashboard` as ``dino-ctl-training.json``, labelled for the Grafana sidecar."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(name=name, namespace=namespace, labels={**GRAFANA_DASHBOARD_LABEL, **(labels or {})}),
        "data": {f"{DASHBOARD_UID}.json": json.dumps(dashboard(), indent=2, sort_keys=True)},
    }


def render_experiment_monitoring(
    *,
    experiment: str,
    namespace: str,
    release_labels: Mapping[str, str] | None = None,
    thresholds: AlertThresholds | None = None,
    scrape_interval: str = "30s",
) -> list[dict[str, Any]]:
    """The PodMonitor and PrometheusRule of one experiment (what ``dino-ctl render`` adds when monitoring is on)."""
    name = truncate_name(f"{experiment}-dino", 63)  # long names keep a prefix and gain a hash, never collide
    return [
        render_pod_monitor(
            name=name,
            namespace=namespace,
            experiment=experiment,
            release_labels=release_labels,
            scrape_interval=scrape_interval,
        ),
        render_prometheus_rule(
            name=name, namespace=namespace, thresholds=thresholds, experiment=experiment, release_labels=release_labels
        ),
    ]


def dashboard_queries(model: Mapping[str, Any]) -> list[str]:
    """Every PromQL query of a dashboard model: panel targets and query-variable definitions."""
    queries = [target["expr"] for panel in model["panels"] for target in panel.get("targets", [])]
    for variable in model["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            # label_values(<selector>, <label>) is Grafana syntax; its first argument is PromQL.
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query["query"] if isinstance(query, dict) else query)
            if match:
                queries.append(match.group(1))
    return queries


_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right", "inf",
     "nan", "atan2"}
)


def referenced_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, labels, keywords or numbers).

    A small lexer, not a parser: strings, label matchers, ranges and grouping label lists are removed first, then
    every remaining identifier that is not called like a function is a metric name. Good enough to check generated
    queries against ``trainer/metric_names.py``; syntax itself is checked by ``promtool``.
    """
    names = set(re.findall(r'__name__\s*=\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"', expr))
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*+(?!\s*\()", text):
        if match.group(0).lower() not in _PROMQL_KEYWORDS:
            names.add(match.group(0))
    return names


def known_metric_names() -> frozenset[str]:
    """Every series name a query may select: trainer, curation and controller metrics and dcgm-exporter's.

    A histogram has no series under its own name, only ``_bucket``, ``_sum`` and ``_count``.
    """
    names = set(DCGM_METRICS)
    for name, (kind, _help, _labels) in {**TRAINER_METRICS, **CONTROLLER_METRICS, **CURATION_METRICS}.items():
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return frozenset(names)
