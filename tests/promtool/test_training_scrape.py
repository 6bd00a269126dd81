"""A real Prometheus server scrapes a running tiny training's /metrics; the values come back through its HTTP API."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.promtool.prom_harness import PROMETHEUS_BINARY, PrometheusServer
from tests.trainer import train_harness as h

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(PROMETHEUS_BINARY).exists(), reason="needs /usr/bin/prometheus (scripts/setup.sh)"),
]


def test_prometheus_reads_back_a_running_trainings_metrics(tmp_path):
    config = h.write_config(tmp_path / "train", optim__iterations=100000, metrics__port=0,
                            checkpoint__interval_iterations=5)
    process = h.start(config)
    ckpt = tmp_path / "train" / "ckpt"
    try:
        port = h.wait_for(
            lambda: next((r["metrics_port"] for r in h.log_records(ckpt) if r["event"] == "start"), None),
            process=process, what="the metrics port")
        labels = {"namespace": "ml", "pod": "quick-pretrain-0", "experiment": "quick", "stage": "pretrain"}
        with PrometheusServer(targets=[f"127.0.0.1:{port}"], workdir=tmp_path / "prom", labels=labels) as prom:
            iterations = prom.wait_for(
                'dino_train_iterations_total{experiment="quick"}', timeout=90,
                predicate=lambda result: bool(result) and float(result[0]["value"][1]) >= 6,
            )
            assert iterations[0]["metric"]["stage"] == "pretrain"
            checkpoint = prom.wait_for("dino_checkpoint_last_iteration", timeout=60,
                                       predicate=lambda r: bool(r) and float(r[0]["value"][1]) >= 5)
            assert float(checkpoint[0]["value"][1]) % 5 == 0
            losses = prom.query('dino_train_loss{component="total"}')
            assert len(losses) == 1 and 0 < float(losses[0]["value"][1]) < 100
            rate = prom.wait_for("rate(dino_train_samples_total[5s])", timeout=30,
                                 predicate=lambda r: bool(r) and float(r[0]["value"][1]) > 0)
            assert float(rate[0]["value"][1]) > 0
    finally:
        process.send_signal(signal.SIGTERM)
        code, out = h.finish(process)
    assert code == 143, out[-3000:]
