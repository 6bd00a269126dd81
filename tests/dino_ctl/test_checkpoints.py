"""The checkpoint registry read straight from storage (trainer/layout.py), and the ``checkpoints`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dino_ctl.checkpoints import find_checkpoint, promote, published_name, stage_checkpoints
from dino_ctl.cli.main import app
from dino_ctl.errors import SpecError
from tests.dino_ctl.spec_helpers import document, experiment
from trainer import layout

runner = CliRunner()


def _write(directory: Path, iteration: int, *, complete: bool) -> None:
    path = directory / layout.checkpoint_name(iteration)
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"dcp")
    if complete:
        (path / layout.COMPLETE_MARKER).write_text(json.dumps({"iteration": iteration, "world_size": 16}))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    _write(root / "pretrain", 1000, complete=True)
    _write(root / "pretrain", 2000, complete=True)
    _write(root / "pretrain", 3000, complete=False)  # interrupted write
    return root


def test_list_every_stage_of_a_spec(runs: Path) -> None:
    exp = experiment(storage={"checkpoints": f"file://{runs}"}, backend="local")
    found = {s.stage: s for s in stage_checkpoints(exp)}
    assert list(found) == ["pretrain", "highres", "distill"]
    rows = found["pretrain"].rows()
    assert [(r["iteration"], r["complete"], r["published"]) for r in rows] == [
        (1000, True, False), (2000, True, False), (3000, False, False)]
    assert found["highres"].checkpoints == []


def test_promote_publishes_a_complete_checkpoint_and_refuses_an_interrupted_one(runs: Path) -> None:
    [stage] = stage_checkpoints(None, directory=str(runs / "pretrain"))
    assert promote(stage, "1000").iteration == 1000
    assert published_name(str(runs / "pretrain")) == "ckpt-000001000"
    assert layout.published_or_latest(str(runs / "pretrain")).iteration == 1000  # what a later stage starts from
    with pytest.raises(SpecError, match="allowed: a complete checkpoint .with COMPLETE.json.; this one is an "
                                        "interrupted write"):
        promote(stage, "ckpt-000003000")
    with pytest.raises(SpecError, match="allowed: one of the checkpoints in .*: ckpt-000001000, ckpt-000002000, "
                                        "ckpt-000003000"):
        find_checkpoint(stage, "42")
    assert find_checkpoint(stage, None).iteration == 2000  # newest complete


def test_pvc_storage_is_not_readable_from_outside() -> None:
    exp = experiment(storage={"checkpoints": "pvc://claim/runs"})
    with pytest.raises(SpecError, match="a PVC is readable only inside the cluster"):
        stage_checkpoints(exp)


def test_cli_list_show_promote(runs: Path, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(document(backend="local", storage={"checkpoints": f"file://{runs}"})))
    result = runner.invoke(app, ["checkpoints", "list", "--spec", str(spec), "-o", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["checkpoints"]
    assert [(r["stage"], r["iteration"], r["complete"]) for r in rows] == [
        ("pretrain", 1000, True), ("pretrain", 2000, True), ("pretrain", 3000, False)]
    result = runner.invoke(app, ["checkpoints", "list", "--dir", str(runs / "pretrain")])
    assert result.exit_code == 0 and "no (interrupted)" in result.stdout

    result = runner.invoke(app, ["checkpoints", "promote", "3000", "--spec", str(spec), "--stage", "pretrain"])
    assert result.exit_code == 2 and "interrupted write" in result.stderr
    result = runner.invoke(app, ["checkpoints", "promote", "--spec", str(spec), "--stage", "pretrain", "-o", "json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["iteration"] == 2000

    result = runner.invoke(app, ["checkpoints", "show", "--dir", str(runs / "pretrain"), "-o", "json"])
    shown = json.loads(result.stdout)
    assert (shown["iteration"], shown["published"], shown["meta"]["world_size"]) == (2000, True, 16)
    result = runner.invoke(app, ["checkpoints", "show", "--spec", str(spec)])
    assert result.exit_code == 2 and "--stage: invalid value None; allowed: one of pretrain, highres, distill" in (
        result.stderr)


def test_cli_needs_exactly_one_source(runs: Path) -> None:
    result = runner.invoke(app, ["checkpoints", "list"])
    assert result.exit_code == 2 and "exactly one of --spec FILE or --dir DIRECTORY" in result.stderr


def test_checkpoint_commands_do_not_import_torch(runs: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from dino_ctl.cli.main import app; "
            f"r = CliRunner().invoke(app, ['checkpoints', 'list', '--dir', {str(runs / 'pretrain')!r}]); "
            "print(r.exit_code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["0", "False"]
