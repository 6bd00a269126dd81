"""``dino-ctl eval``, ``export`` and ``import`` on artefacts this project makes (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from trainer.artifacts import export_backbone, load_backbone
from trainer.config import ModelConfig
from trainer.models import build_backbone
from trainer.models.checkpoint_io import export_backbone_state_dict, read_checkpoint

FMNIST = Path("/usr/share/datasets/fashion-mnist")
runner = CliRunner()
MODEL = ModelConfig(arch="vit_pico", patch_size=4, img_size=32, drop_path_rate=0.0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("export")
    export_backbone(build_backbone(MODEL), MODEL, str(directory))
    return directory


@pytest.mark.skipif(not FMNIST.exists(), reason="needs dataset-fashion-mnist (scripts/setup.sh)")
def test_eval_knn_reports_trained_random_and_pixels_as_json(exported, tmp_path):
    from trainer.data.prepare import prepare_fashion_mnist

    prepare_fashion_mnist(str(tmp_path / "train"), split="train", limit=120)
    prepare_fashion_mnist(str(tmp_path / "test"), split="test", limit=40)
    result = runner.invoke(app, ["eval", "knn", str(exported), "--train", str(tmp_path / "train"),
                                 "--test", str(tmp_path / "test"), "-o", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["num_train"] == 120 and report["num_test"] == 40 and report["image_size"] == 32
    assert set(report["top1"]) == {"trained", "random_init", "raw_pixels"}
    assert report["top1"]["raw_pixels"] > 0.3  # labels line up with images (chance is 0.1)


def test_eval_rejects_an_unknown_network_with_exit_code_2(exported):
    result = runner.invoke(app, ["eval", "knn", str(exported), "--train", "x", "--test", "y", "--network", "bogus"])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # rich wraps the error box to the terminal width
    assert "invalid value 'bogus'" in text and "final, teacher, student" in text


def test_export_round_trips_bit_exactly_and_loads_strictly(exported, tmp_path):
    result = runner.invoke(app, ["export", str(exported), "--out", str(tmp_path / "again"), "-o", "json"])
    assert result.exit_code == 0, result.output
    assert "build_backbone" in json.loads(result.stdout)["loader"]
    original, again = read_checkpoint(exported / "backbone.pth"), read_checkpoint(tmp_path / "again" / "backbone.pth")
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    fresh = build_backbone(MODEL)
    fresh.load_state_dict(read_checkpoint(tmp_path / "again" / "backbone.safetensors"), strict=True)


def test_import_of_a_released_layout_checkpoint(tmp_path):
    # a "released" ViT-S/14 file as the reference code writes it: flat blocks, 37x37 pos-embed grid (518 px)
    torch.manual_seed(1)
    release = build_backbone("vit_small", patch_size=14, img_size=518, drop_path_rate=0.0)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(export_backbone_state_dict(release), path)
    result = runner.invoke(app, ["import", str(path), "--arch", "vit_small", "--out", str(tmp_path / "imported")])
    assert result.exit_code == 0, result.output
    imported, config = load_backbone(str(tmp_path / "imported"))
    assert config.img_size == 518 and config.patch_size == 14
    for name, value in release.state_dict().items():
        assert torch.equal(imported.state_dict()[name], value), name


def test_import_refuses_a_mismatched_architecture(tmp_path):
    torch.save(export_backbone_state_dict(build_backbone(MODEL)), tmp_path / "small.pth")
    result = runner.invoke(app, ["import", str(tmp_path / "small.pth"), "--arch", "vit_small", "--out",
                                 str(tmp_path / "out")])
    assert result.exit_code == 2 and "error" in result.output
