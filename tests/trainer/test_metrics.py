"""TrainMetrics over real HTTP: every metric of TRAINER_METRICS is exposed with the observed values."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainer.config import MetricsConfig
from trainer.metric_names import TRAINER_METRICS
from trainer.metrics import JsonlLogger, TrainMetrics, format_console

STEP = {
    "losses": {"total": 9.5, "dino": 4.5, "ibot": 5.1, "koleo": -0.1},
    "lr": 1e-3,
    "wd": 0.04,
    "momentum": 0.992,
    "teacher_temp": 0.05,
    "grad_norms": {"backbone": 1.25, "dino_head": 0.5},
    "step_seconds": 0.2,
    "data_wait_seconds": 0.004,
    "images": 32,
    "bad_samples": 1,
}


def _scrape(port: int) -> dict[str, float]:
    """{sample name + sorted labels: value} from a real scrape of /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    samples["__families__"] = {family.name for family in text_string_to_metric_families(text)}
    return samples


@pytest.fixture
def metrics():
    instance = TrainMetrics(MetricsConfig(port=0, log_interval=2), enabled=True)
    yield instance
    instance.close()


def test_scrape_exposes_every_metric_with_observed_values(metrics: TrainMetrics) -> None:
    port = metrics.start_server(addr="127.0.0.1")
    assert port == metrics.port and port > 0
    metrics.set_build_info(stage="pretrain", recipe="tiny")
    for iteration in (101, 102):
        metrics.observe_step(iteration, **STEP, mfu=0.4, gpu_mem=2.0e9)
    metrics.observe_checkpoint(100, 3.5)
    metrics.observe_nonfinite()

    samples = _scrape(port)
    # Counters are exposed as <name>_total; the parser names their family without the suffix.
    families = {name.removesuffix("_total") for name in TRAINER_METRICS}
    assert families <= samples["__families__"]
    assert samples["dino_train_iterations_total{}"] == 2
    assert samples["dino_train_iteration{}"] == 102
    assert samples["dino_train_samples_total{}"] == 64
    assert samples["dino_data_bad_samples_total{}"] == 2
    assert samples["dino_train_loss{component=koleo}"] == -0.1
    assert samples["dino_train_grad_norm{module=backbone}"] == 1.25
    assert samples["dino_train_learning_rate{}"] == 1e-3
    assert samples["dino_train_teacher_temperature{}"] == 0.05
    assert samples["dino_train_iteration_duration_seconds_count{}"] == 2
    assert samples["dino_train_iteration_duration_seconds_bucket{le=0.25}"] == 2
    assert samples["dino_train_iteration_duration_seconds_bucket{le=0.1}"] == 0
    assert samples["dino_data_wait_seconds_sum{}"] == pytest.approx(0.008)
    assert samples["dino_train_mfu_ratio{}"] == 0.4
    assert samples["dino_checkpoint_last_iteration{}"] == 100
    assert samples["dino_checkpoint_save_duration_seconds{}"] == 3.5
    assert abs(samples["dino_checkpoint_last_success_timestamp_seconds{}"] - time.time()) < 60
    assert samples["dino_train_nonfinite_loss_total{}"] == 1
    assert samples["dino_train_images_per_second{}"] > 0
    build = [key for key in samples if key.startswith("dino_build_info{")]
    assert len(build) == 1 and "recipe=tiny" in build[0] and "stage=pretrain" in build[0]


def test_records_every_log_interval_with_throughput_over_the_window(metrics: TrainMetrics) -> None:
    assert metrics.observe_step(1, **STEP) is None
    time.sleep(0.05)
    record = metrics.observe_step(2, **STEP)
    assert record is not None and record["iteration"] == 2
    assert record["loss/dino"] == 4.5 and record["grad_norm/backbone"] == 1.25
    # 64 images over (first step's 0.204 s) + the 0.05 s sleep and overhead: a bit under 64 / 0.254.
    assert 64 / 0.5 < record["images_per_second"] <= 64 / 0.254
    assert record["data_wait_seconds"] == pytest.approx(0.004)
    assert metrics.observe_step(3, **STEP) is None


def test_disabled_metrics_serve_nothing_but_still_return_records() -> None:
    metrics = TrainMetrics(MetricsConfig(port=0, log_interval=1), enabled=False)
    assert metrics.start_server() is None and metrics.port is None
    assert metrics.observe_step(1, **STEP)["iteration"] == 1
    metrics.observe_checkpoint(1, 1.0)
    assert list(metrics.registry.collect()) == []


def test_jsonl_logger_appends_flushed_lines(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "train_log.jsonl"
    log = JsonlLogger(str(path))
    log.write({"iteration": 10, "loss/total": 1.5})
    assert json.loads(path.read_text()) == {"iteration": 10, "loss/total": 1.5}  # flushed before close
    nan, inf = float("nan"), float("inf")
    log.write({"iteration": 20, "loss/total": nan, "losses": {"dino": inf, "ibot": [1.0, nan]}})
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[1] == {"iteration": 20, "loss/total": None, "losses": {"dino": None, "ibot": [1.0, None]}}


def test_jsonl_logger_uploads_to_an_object_store_on_close() -> None:
    import fsspec

    log = JsonlLogger("memory://run/train_log.jsonl", upload_interval_s=3600)
    log.write({"iteration": 1})
    log.close()
    with fsspec.open("memory://run/train_log.jsonl", "r") as handle:
        assert json.loads(handle.read()) == {"iteration": 1}


def test_format_console_line() -> None:
    record = {"iteration": 120, "loss/total": 9.21, "loss/dino": 4.6, "lr": 1.2e-3,
              "images_per_second": 812.44, "data_wait_seconds": 0.0031, "mfu": 0.41}
    expected = "it 120 | loss 9.21 (dino 4.6) | lr 1.20e-03 | 812.4 img/s | data 3.1 ms | mfu 41.0%"
    assert format_console(record) == expected


def test_a_busy_port_is_reported_with_the_field(metrics: TrainMetrics) -> None:
    port = metrics.start_server(addr="127.0.0.1")
    clash = TrainMetrics(MetricsConfig(port=port), enabled=True)
    with pytest.raises(OSError, match=rf"metrics.port: cannot serve /metrics on 127.0.0.1:{port}"):
        clash.start_server(addr="127.0.0.1")
