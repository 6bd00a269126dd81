"""bench/quickstart_ceiling.py on a small prepared Fashion-MNIST: one JSON object, every pipeline trained and scored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.data.prepare import FASHION_MNIST_DIR, prepare_dataset
from trainer.evaluate import knn_top1, labelled_batches, pixel_features

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).exists(),
                                reason="needs the Debian package dataset-fashion-mnist (scripts/setup.sh)")


def test_ceiling_bench_trains_each_pipeline_and_scores_it_next_to_raw_pixels(tmp_path):
    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    prepare_dataset(FASHION_MNIST_DIR, str(train_dir), format="fashion-mnist", split="train", limit=600)
    prepare_dataset(FASHION_MNIST_DIR, str(test_dir), format="fashion-mnist", split="test", limit=200)
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec["spec"]["data"]["streams"][0]["local"] = str(train_dir)
    spec["spec"]["evaluation"].update(train=str(train_dir), test=str(test_dir))
    spec_path = tmp_path / "quickstart.yaml"
    spec_path.write_text(yaml.safe_dump(spec))

    proc = subprocess.run(
        [sys.executable, "bench/quickstart_ceiling.py", "--spec", str(spec_path), "--iterations", "100",
         "--batch-size", "16", "--limit-train", "400", "--limit-test", "200"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["num_train"], result["num_test"]) == (400, 200)
    pixels_fit = pixel_features(labelled_batches(str(train_dir), image_size=28, limit=400))
    pixels_test = pixel_features(labelled_batches(str(test_dir), image_size=28, limit=200))
    assert result["raw_pixels"] == knn_top1(pixels_fit.cls, pixels_fit.labels, pixels_test.cls, pixels_test.labels)
    for pipeline in ("clean", "flip", "multicrop"):
        scores = result[pipeline]
        assert 0.0 <= scores["knn_top1"] <= 1.0
        # 1,600 labelled images leave chance (0.1) far behind; the crops' train/test shift costs the head the most
        assert scores["head_top1"] > (0.2 if pipeline == "multicrop" else 0.4), (pipeline, scores)
    # same initial weights and sample order, different inputs: the pipelines really differ
    assert result["clean"]["final_loss"] != result["multicrop"]["final_loss"]


def test_ceiling_bench_rejects_an_unknown_pipeline():
    proc = subprocess.run([sys.executable, "bench/quickstart_ceiling.py", "--pipelines", "clean,mixup"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--pipelines: invalid value ['mixup']; allowed: clean, flip, multicrop" in proc.stderr
