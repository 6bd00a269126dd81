"""A real Prometheus scrapes a real prometheus_client exporter carrying every trainer metric; values read back."""

from __future__ import annotations

import shutil
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dino_ctl.render.monitoring import known_metric_names
from tests.promtool.prom_harness import (  # noqa: F401  (prometheus_server is a fixture)
    PROMETHEUS_BINARY,
    PrometheusError,
    PrometheusServer,
    free_port,
    prometheus_server,
)
from trainer.metric_names import CURATION_METRICS, TRAINER_METRICS

POD_LABELS = {"namespace": "ml", "pod": "demo-pretrain-worker-0", "experiment": "demo", "stage": "pretrain"}


def _label_values(label_names: tuple[str, ...]) -> dict[str, str]:
    return {name: f"{name}-a" for name in label_names}


@pytest.fixture
def trainer_exporter() -> Iterator[tuple[str, dict[str, object]]]:
    """Every metric of TRAINER_METRICS and CURATION_METRICS (the workloads' metrics) on its own registry and HTTP server; yields (address, metric objects)."""
    registry = CollectorRegistry()
    classes = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    metrics: dict[str, object] = {}
    for name, (kind, help_text, labels) in {**TRAINER_METRICS, **CURATION_METRICS}.items():
        metric = classes[kind](name, help_text, labels, registry=registry)
        metrics[name] = metric.labels(**_label_values(labels)) if labels else metric
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}", metrics
    finally:
        server.shutdown()
        thread.join(timeout=5)


def _value(samples: list[dict]) -> float:
    assert len(samples) == 1, samples
    return float(samples[0]["value"][1])


def test_every_trainer_metric_round_trips_through_prometheus(prometheus_server, trainer_exporter) -> None:
    address, metrics = trainer_exporter
    metrics["dino_train_iterations_total"].inc(1234)
    metrics["dino_train_loss"].set(7.25)
    metrics["dino_build_info"].set(1)
    metrics["dino_data_wait_seconds"].observe(0.02)
    metrics["dino_data_wait_seconds"].observe(0.5)
    checkpoint_time = time.time() - 600
    metrics["dino_checkpoint_last_success_timestamp_seconds"].set(checkpoint_time)

    prom = prometheus_server(targets=[address], labels=POD_LABELS)
    assert _value(prom.wait_for('dino_train_iterations_total{experiment="demo"}')) == 1234
    assert _value(prom.query('dino_train_loss{component="component-a",stage="pretrain"}')) == 7.25
    assert _value(prom.query('dino_data_wait_seconds_count{pod="demo-pretrain-worker-0"}')) == 2
    assert _value(prom.query('dino_data_wait_seconds_bucket{le="0.025"}')) == 1
    # The dashboard's checkpoint-age query on real data: ten minutes, give or take the scrape delay.
    age = _value(prom.query("time() - max by (stage) (dino_checkpoint_last_success_timestamp_seconds > 0)"))
    assert 599 <= age <= 660

    exported = {s["metric"]["__name__"] for s in prom.query('{__name__=~"dino_.+",job="test"}')}
    trainer_names = {n for n in known_metric_names() if n.startswith("dino_") and not n.startswith("dino_ctl_")}
    assert trainer_names <= exported, f"not scraped: {sorted(trainer_names - exported)}"
    # the curation k-means label is not renamed by the pod's target labels (it is ``fit``, not ``stage``)
    assert prom.query('dino_curation_kmeans_inertia{fit="fit-a",stage="pretrain"}')


def test_harness_reports_a_query_error_and_a_missing_series(prometheus_server, trainer_exporter) -> None:
    address, _ = trainer_exporter
    prom = prometheus_server(targets=[address])
    with pytest.raises(PrometheusError, match="bad_data"):
        prom.query("sum by (")
    assert _value(prom.wait_for('up{job="test"}')) == 1
    with pytest.raises(PrometheusError, match=f"not satisfied after 1s.*http://{address}/metrics up"):
        prom.wait_for("dino_metric_that_does_not_exist", timeout=1)


def test_harness_stops_the_server_and_explains_a_failed_start(tmp_path) -> None:
    if shutil.which(PROMETHEUS_BINARY) is None:
        pytest.skip(f"prometheus binary not found at {PROMETHEUS_BINARY}")
    bad_rules = tmp_path / "bad-rules.yaml"
    bad_rules.write_text("groups: [{name: broken, rules: [{alert: Broken, expr: 'sum by ('}]}]\n")
    broken = PrometheusServer(targets=[], workdir=tmp_path / "bad", rule_files=[bad_rules])
    with pytest.raises(PrometheusError, match="(?s)exited with 1:.*unclosed left parenthesis"):
        broken.start(timeout=30)

    with PrometheusServer(targets=[], workdir=tmp_path / "good") as prom:
        assert _value(prom.query("vector(3)")) == 3
        url = prom.url
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/-/ready", timeout=2)
