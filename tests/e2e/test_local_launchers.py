"""``dino-ctl run`` launches a 2-process stage through torchrun and through TorchX's local_cwd scheduler."""

from __future__ import annotations

import json
import textwrap

import pytest
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from trainer import layout

pytestmark = pytest.mark.slow

SPEC = """
apiVersion: dino-ctl.io/v1alpha1
kind: DinoExperiment
metadata: {name: launchers}
spec:
  image: dino-ctl:test
  backend: local
  storage: {checkpoints: "file://STORAGE"}
  resources: {nodes: {min: 1, max: 1}, gpusPerNode: 0}
  stages:
    - name: pretrain
      recipe: tiny
      overrides: {optim.iterations: 4, optim.warmup_iterations: 1, optim.global_batch_size: 8, metrics.port: -1,
                  metrics.log_interval: 1}
"""


@pytest.mark.parametrize("launcher", ["torchrun", "torchx"])
def test_two_process_stage_through_each_launcher(launcher, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(SPEC).replace("STORAGE", str(tmp_path / "runs")))
    result = CliRunner().invoke(app, ["run", str(spec), "--launcher", launcher, "--nproc", "2", "--no-eval",
                                      "-o", "json"])
    assert result.exit_code == 0, result.output
    (stage,) = json.loads(result.stdout.strip().splitlines()[-1])["stages"]
    assert stage["steps"] == 4 and stage["exit_code"] == 0
    latest = layout.latest_complete(str(tmp_path / "runs" / "pretrain"))
    assert latest.iteration == 4 and latest.meta["world_size"] == 2
