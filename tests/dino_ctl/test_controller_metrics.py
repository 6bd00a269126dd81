"""The controller's metrics: names from trainer/metric_names.py, scraped by a real Prometheus; entry-point options."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dino_ctl.controller.__main__ import parse_args
from dino_ctl.controller.metrics import PHASES, ControllerMetrics
from dino_ctl.observe import Reason
from tests.promtool.prom_harness import free_port, prometheus_server  # noqa: F401  (pytest fixture)
from trainer.metric_names import CONTROLLER_METRICS


def test_metric_names_and_labels_are_the_contract() -> None:
    metrics = ControllerMetrics()
    metrics.count_restarts("demo", [("pretrain", Reason.PREEMPTION)])
    metrics.set_phase("uid-1", "Running")
    exported = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                exported.setdefault(sample.name, set()).update(sample.labels)
    assert set(exported) == set(CONTROLLER_METRICS)
    for name, (_kind, _help, labels) in CONTROLLER_METRICS.items():
        assert exported[name] == set(labels), name


def test_phase_gauge_counts_experiments() -> None:
    metrics = ControllerMetrics()
    for uid, phase in (("a", "Running"), ("b", "Running"), ("c", "Invalid"), ("a", "Succeeded")):
        metrics.set_phase(uid, phase)
    metrics.set_phase("b", None)
    values = {phase: metrics.registry.get_sample_value("dino_ctl_experiments", {"phase": phase}) for phase in PHASES}
    assert values == {"Pending": 0, "Running": 0, "Succeeded": 1, "Failed": 0, "Cancelled": 0, "Invalid": 1}


def test_prometheus_scrapes_the_controller(prometheus_server) -> None:  # noqa: F811
    metrics = ControllerMetrics()
    port = free_port()
    server = metrics.serve(port, addr="127.0.0.1")
    try:
        metrics.count_restarts("demo", [("pretrain", Reason.PREEMPTION), ("pretrain", Reason.PREEMPTION)])
        metrics.count_error("api")
        metrics.set_phase("uid-1", "Running")
        prom = prometheus_server(targets=[f"127.0.0.1:{port}"], labels={"namespace": "dino-system"})
        restarts = prom.wait_for('dino_ctl_stage_restarts_total{experiment="demo",reason="preemption"}')
        assert float(restarts[0]["value"][1]) == 2
        assert restarts[0]["metric"]["stage"] == "pretrain"
        errors = prom.query("dino_ctl_reconcile_errors_total")
        kinds = {s["metric"]["kind"]: float(s["value"][1]) for s in errors}
        assert kinds == {"api": 1, "invalid_spec": 0, "internal": 0}
        running = prom.query('dino_ctl_experiments{phase="Running"}')
        assert float(running[0]["value"][1]) == 1
    finally:
        server.shutdown()


def test_entry_point_options() -> None:
    args = parse_args(["--namespace", "ml", "--namespace=research", "--interval", "15", "--read-checkpoints"])
    assert (args.namespaces, args.interval, args.read_checkpoints, args.health_port, args.workers) == (
        ["ml", "research"], 15.0, True, 8080, 16)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--namespace is required: the controller is namespaced"),
        (["--namespace", "ml", "--interval", "0.5"], "--interval 0.5: must be at least 1 second"),
        (["--namespace", "ml", "--log-level", "LOUD"], "invalid choice: 'LOUD'"),
        (["--namespace", "ml", "--workers", "0"], "--workers 0: must be at least 1"),
    ],
)
def test_entry_point_rejects_bad_options(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_controller_import_path_is_torch_free() -> None:
    # The controller image has no torch (docker/controller.Dockerfile checks the same at build time).
    code = ("import sys, dino_ctl.controller.__main__, dino_ctl.controller.handlers, dino_ctl.controller.manifests; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'streaming')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
