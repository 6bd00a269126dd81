"""Monitoring objects: PodMonitor and PrometheusRule shapes (validated against the upstream CRDs) and the dashboard."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dino_ctl.controller.validate import SCHEMAS_ENV, ObjectValidator, find_k8s_schemas
from dino_ctl.render import monitoring
from dino_ctl.render.monitoring import (
    DCGM_METRICS,
    AlertThresholds,
    alert_rule_groups,
    dashboard,
    dashboard_queries,
    known_metric_names,
    referenced_metric_names,
    render_dashboard_configmap,
    render_experiment_monitoring,
    render_pod_monitor,
    render_prometheus_rule,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def validator() -> ObjectValidator:
    folder = find_k8s_schemas(REPO_ROOT)
    if folder is None:
        pytest.skip(f"upstream CRD schemas not found: set {SCHEMAS_ENV} or provide ../shared/k8s-schemas")
    return ObjectValidator(crd_folder=folder)


def test_pod_monitor_for_one_experiment(validator: ObjectValidator) -> None:
    monitor = render_pod_monitor(
        name="demo-dino", namespace="ml", experiment="demo", release_labels={"release": "kube-prometheus-stack"},
        scrape_interval="15s",
    )
    validator.validate(monitor)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"] == {"matchLabels": {"dino-ctl.io/experiment": "demo"}}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", "15s")
    assert [(r["sourceLabels"], r["targetLabel"]) for r in endpoint["relabelings"]] == [
        (["__meta_kubernetes_pod_label_dino_ctl_io_experiment"], "experiment"),
        (["__meta_kubernetes_pod_label_dino_ctl_io_stage"], "stage"),
    ]
    assert "namespaceSelector" not in monitor["spec"]  # its own namespace


def test_pod_monitor_for_all_experiments_in_listed_namespaces(validator: ObjectValidator) -> None:
    monitor = render_pod_monitor(name="dino-ctl-training", namespace=None, namespaces=["ml", "research"])
    validator.validate({**monitor, "metadata": {**monitor["metadata"], "namespace": "x"}})
    assert monitor["spec"]["selector"] == {
        "matchExpressions": [{"key": "dino-ctl.io/experiment", "operator": "Exists"}]
    }
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml", "research"]}
    assert "namespace" not in monitor["metadata"]


def test_pod_monitor_rejects_a_bad_interval() -> None:
    with pytest.raises(ValueError, match=r"scrape_interval='30 seconds': must be a Prometheus duration like '15s'"):
        render_pod_monitor(name="x", namespace="ml", scrape_interval="30 seconds")


def test_prometheus_rule_scoped_to_an_experiment(validator: ObjectValidator) -> None:
    thresholds = AlertThresholds(stall_minutes=20, checkpoint_max_age_minutes=30, max_restarts=5)
    rule = render_prometheus_rule(
        name="demo-dino", namespace="ml", thresholds=thresholds, experiment="demo", release_labels={"release": "kps"}
    )
    validator.validate(rule)
    assert rule["spec"]["groups"] == alert_rule_groups(thresholds, experiment="demo")
    rules = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(rules) == {"DinoTrainingStalled", "DinoLossNotFinite", "DinoCheckpointStale", "DinoStageRestartStorm"}
    stalled = rules["DinoTrainingStalled"]["expr"]
    assert '(increase(dino_train_iterations_total{experiment="demo"}[20m])) == 0' in stalled
    assert rules["DinoCheckpointStale"]["expr"].endswith("> 1800")
    assert rules["DinoStageRestartStorm"]["expr"].endswith("> 5")
    for name, alert in rules.items():
        assert referenced_metric_names(alert["expr"]) <= known_metric_names(), name
        assert 'experiment="demo"' in alert["expr"], name
    cluster_wide = [r["alert"] for group in alert_rule_groups() for r in group["rules"]]
    assert cluster_wide == [*rules, "DinoControllerReconcileErrors"]
    assert all("experiment=" not in r["expr"] for group in alert_rule_groups() for r in group["rules"])


def test_experiment_monitoring_objects(validator: ObjectValidator) -> None:
    objects = render_experiment_monitoring(experiment="demo", namespace="ml", release_labels={"release": "kps"})
    assert [o["kind"] for o in objects] == ["PodMonitor", "PrometheusRule"]
    assert validator.validate_all(objects) == 2
    assert {o["metadata"]["name"] for o in objects} == {"demo-dino"}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a_bucket{x="y", z=~"w"}[5m]))', {"a_bucket"}),
        ("time() - max by (stage) (b > 0) offset 5m", {"b"}),
        ('label_replace(c, "pod", "$1", "exported_pod", "(.+)") * on (pod) group_left (experiment) d', {"c", "d"}),
        ("e != e or abs(f) == +Inf and g unless h", {"e", "f", "g", "h"}),
        ("histogram_quantile(0.95, sum(rate(i[1h:5m]))) > 1e3", {"i"}),
        ('{__name__="j", pod="p"} + k', {"j", "k"}),
    ],
)
def test_referenced_metric_names(expr: str, names: set[str]) -> None:
    assert referenced_metric_names(expr) == names


def _queries() -> list[str]:
    return dashboard_queries(dashboard())


def test_dashboard_queries_use_only_known_metrics() -> None:
    used = set().union(*(referenced_metric_names(q) for q in _queries()))
    unknown = used - known_metric_names()
    assert not unknown, f"dashboard queries select metrics missing from trainer/metric_names.py or DCGM: {unknown}"
    # The panels users asked for are all there.
    for metric in ("dino_train_loss", "dino_train_learning_rate", "dino_train_teacher_temperature",
                   "dino_train_teacher_momentum", "dino_train_images_per_second", "dino_train_mfu_ratio",
                   "dino_data_wait_seconds_sum", "dino_checkpoint_last_success_timestamp_seconds",
                   "dino_ctl_stage_restarts_total", *DCGM_METRICS, "dino_curation_images_embedded_total",
                   "dino_curation_kmeans_inertia", "dino_curation_duplicates_found_total"):
        assert metric in used, metric


def test_dcgm_panels_join_on_namespace_and_pod() -> None:
    dcgm_queries = [q for q in _queries() if referenced_metric_names(q) & set(DCGM_METRICS)]
    assert len(dcgm_queries) == 3
    for query in dcgm_queries:
        assert "* on (namespace, pod) group_left (experiment, stage)" in query
        assert '"exported_pod"' in query and '"exported_namespace"' in query


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not found: install Debian's 'prometheus'")
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # Grafana substitutes its variables before Prometheus sees a query; promtool parses every query as a rule.
    substitutions = {"$__rate_interval": "1m", "$namespace": "ml", "$experiment": "demo", "$stage": ".*"}
    rules = []
    for i, query in enumerate(_queries()):
        for variable, value in substitutions.items():
            query = query.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": query})
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run(["promtool", "check", "rules", "dashboard.yaml"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout


def test_dashboard_layout() -> None:
    model = dashboard()
    panels = model["panels"]
    assert [p["id"] for p in panels] == list(range(1, len(panels) + 1))
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        for y in range(pos["y"], pos["y"] + pos["h"]):
            for x in range(pos["x"], pos["x"] + pos["w"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                cells.add((x, y))
        if panel["type"] == "timeseries":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert [t["refId"] for t in panel["targets"]] == [chr(ord("A") + i) for i in range(len(panel["targets"]))]
    variables = [v["name"] for v in model["templating"]["list"]]
    assert variables == ["datasource", "namespace", "experiment", "stage"]


def test_dashboard_configmap(validator: ObjectValidator) -> None:
    configmap = render_dashboard_configmap(name="dino-ctl-dashboard", namespace="monitoring", labels={"team": "ml"})
    validator.validate(configmap)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["labels"]["team"] == "ml"
    (key,) = configmap["data"]
    assert key == f"{monitoring.DASHBOARD_UID}.json"
    assert json.loads(configmap["data"][key]) == dashboard()
