"""pretrain -> highres -> distill through ``dino-ctl run``: each stage starts from the previous stage's output."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from trainer import layout
from trainer.artifacts import load_backbone

pytestmark = pytest.mark.slow

SPEC = """
apiVersion: dino-ctl.io/v1alpha1
kind: DinoExperiment
metadata: {name: chain}
spec:
  image: dino-ctl:test
  backend: local
  storage: {checkpoints: "file://STORAGE"}
  resources: {nodes: {min: 1, max: 1}, gpusPerNode: 0}
  monitoring: {port: 9466}
  stages:
    - name: pretrain
      recipe: tiny
      overrides: {optim.iterations: 6, optim.warmup_iterations: 2, optim.global_batch_size: 8, checkpoint.interval_iterations: 3,
                  metrics.port: -1, metrics.log_interval: 1}
    - name: highres
      recipe: tiny
      init: {from: pretrain}
      overrides: {stage.kind: highres, model.img_size: 48, data.crops.global_size: 48, data.crops.local_size: 24,
                  optim.iterations: 4, optim.warmup_iterations: 2, optim.global_batch_size: 8, metrics.port: -1,
                  metrics.log_interval: 1}
    - name: distill
      recipe: tiny
      teacher: {from: highres}
      overrides: {stage.kind: distill, model.depth: 2, optim.iterations: 4, optim.warmup_iterations: 2,
                  optim.global_batch_size: 8,
                  metrics.port: -1, metrics.log_interval: 1}
"""


def test_pretrain_highres_distill_chain(tmp_path):
    spec = tmp_path / "chain.yaml"
    spec.write_text(textwrap.dedent(SPEC).replace("STORAGE", str(tmp_path / "runs")))
    result = CliRunner().invoke(app, ["run", str(spec), "--no-eval", "--output", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [s["name"] for s in summary["stages"]] == ["pretrain", "highres", "distill"]
    assert [s["steps"] for s in summary["stages"]] == [6, 4, 4]
    runs = tmp_path / "runs"

    # highres began from pretrain's weights, its position embedding interpolated from the 8x8 to the 12x12 grid
    pretrain, _ = load_backbone(str(runs / "pretrain"), network="teacher")
    highres_config = (runs / "highres" / layout.CONFIG_FILE).read_text()
    assert "init_from: " + str(runs / "pretrain") in highres_config
    highres, highres_model = load_backbone(str(runs / "highres"))
    assert highres.pos_embed.shape[1] == 1 + 12 * 12 and pretrain.pos_embed.shape[1] == 1 + 8 * 8
    # 4 steps at a warm-up lr keep highres's teacher next to pretrain's: far closer than an independent init is
    from trainer.models import build_backbone

    fresh = build_backbone(highres_model)
    name = "blocks.0.attn.qkv.weight"
    drift = (highres.state_dict()[name] - pretrain.state_dict()[name]).abs().mean()
    independent = (fresh.state_dict()[name] - pretrain.state_dict()[name]).abs().mean()
    assert drift < 0.05 * independent

    # distill: the frozen teacher is highres's final teacher; the final model is the 2-block student EMA
    distilled, distilled_model = load_backbone(str(runs / "distill"))
    assert len(distilled.blocks) == 2 and highres_model.depth in (None, 4)
    teacher, _ = load_backbone(str(runs / "distill"), network="teacher")
    for name, value in highres.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), f"distill teacher {name} is not highres's weight"
    assert (runs / "distill" / "export" / "backbone.safetensors").exists()
    assert (runs / "distill" / "report.png").stat().st_size > 1000
