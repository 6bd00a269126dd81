"""The generated alert rules pass `promtool check rules` and the unit tests in alerts_test.yaml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dino_ctl.render.monitoring import AlertThresholds, alert_rule_groups

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")
CONTROLLER_UNIT_TESTS = Path(__file__).with_name("controller_alerts_test.yaml")

pytestmark = pytest.mark.skipif(
    shutil.which(PROMTOOL) is None, reason="promtool not found: install the Debian package 'prometheus'"
)


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # promtool prints failures on stderr: merge both streams so assertions see the whole report.
    return subprocess.run([PROMTOOL, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120, check=False)


def _write_rules(directory: Path, groups: list[dict]) -> Path:
    for unit_tests in (UNIT_TESTS, CONTROLLER_UNIT_TESTS):
        shutil.copy(unit_tests, directory / unit_tests.name)
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def test_cluster_wide_rules_check_and_pass_unit_tests(tmp_path: Path) -> None:
    _write_rules(tmp_path, alert_rule_groups())
    check = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout
    assert "SUCCESS: 5 rules found" in check.stdout
    unit = _promtool("test", "rules", UNIT_TESTS.name, CONTROLLER_UNIT_TESTS.name, cwd=tmp_path)
    assert unit.returncode == 0, unit.stdout


def test_experiment_rules_check_and_pass_unit_tests(tmp_path: Path) -> None:
    _write_rules(tmp_path, alert_rule_groups(experiment="demo"))
    check = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout
    assert "SUCCESS: 4 rules found" in check.stdout  # no controller alert per experiment
    unit = _promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert unit.returncode == 0, unit.stdout


def test_rules_scoped_to_another_experiment_do_not_fire(tmp_path: Path) -> None:
    _write_rules(tmp_path, alert_rule_groups(experiment="other"))
    unit = _promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert unit.returncode == 1
    # Every firing expectation fails with nothing fired; the expectations of silence still hold.
    assert "alertname: DinoTrainingStalled, time: 31m" in unit.stdout
    assert "alertname: DinoStageRestartStorm, time: 8m" in unit.stdout
    assert "time: 20m" not in unit.stdout  # the stalled-at-20m check expects no alert, and gets none


def test_a_longer_stall_window_does_not_fire_at_31_minutes(tmp_path: Path) -> None:
    _write_rules(tmp_path, alert_rule_groups(AlertThresholds(stall_minutes=30)))
    unit = _promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert unit.returncode == 1
    assert "alertname: DinoTrainingStalled, time: 31m" in unit.stdout
    assert "for 30m" in unit.stdout  # the summary names the configured window


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("stall_minutes", 0, "AlertThresholds.stall_minutes=0: must be an integer number of minutes >= 1"),
        ("checkpoint_max_age_minutes", 1.5, "AlertThresholds.checkpoint_max_age_minutes=1.5: must be an integer"),
        ("max_restarts", -1, "AlertThresholds.max_restarts=-1: must be an integer >= 0"),
    ],
)
def test_thresholds_reject_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        AlertThresholds(**{field: value})
