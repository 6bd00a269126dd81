"""bench/quickstart_knn.py and bench/quickstart_ceiling.py on a small prepared Fashion-MNIST: one JSON object each,
every run trained and scored (values sane, not timed)."""

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


@pytest.fixture(scope="module")
def small_quickstart(tmp_path_factory) -> tuple[Path, Path, Path]:
    """examples/quickstart.yaml reading 600 prepared training and 200 test images: (spec, train dir, test dir)."""
    root = tmp_path_factory.mktemp("quickstart")
    train_dir, test_dir = root / "train", root / "test"
    prepare_dataset(FASHION_MNIST_DIR, str(train_dir), format="fashion-mnist", split="train", limit=600)
    prepare_dataset(FASHION_MNIST_DIR, str(test_dir), format="fashion-mnist", split="test", limit=200)
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec["spec"]["data"]["streams"][0]["local"] = str(train_dir)
    spec["spec"]["evaluation"].update(train=str(train_dir), test=str(test_dir))
    spec_path = root / "quickstart.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    return spec_path, train_dir, test_dir


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _raw_pixels_top1(train_dir: Path, test_dir: Path, limit_train: int, limit_test: int) -> float:
    fit = pixel_features(labelled_batches(str(train_dir), image_size=28, limit=limit_train))
    held_out = pixel_features(labelled_batches(str(test_dir), image_size=28, limit=limit_test))
    return knn_top1(fit.cls, fit.labels, held_out.cls, held_out.labels)


def test_knn_bench_scores_the_run_its_checkpoints_and_the_baselines(small_quickstart):
    spec, train_dir, test_dir = small_quickstart
    result = _run("bench/quickstart_knn.py", "--spec", str(spec), "--iterations", "6", "--every", "2",
                  "--limit-train", "400", "--limit-test", "200")
    assert (result["num_train"], result["num_test"]) == (400, 200)
    assert result["raw_pixels"] == _raw_pixels_top1(train_dir, test_dir, 400, 200)
    assert [point["iteration"] for point in result["curve"]] == [2, 4, 6]
    assert result["curve"][-1]["trained"] == result["trained"]  # the last point is the run's own result
    for value in (result["trained"], result["random_init"], *(p["trained"] for p in result["curve"])):
        assert 0.1 < value <= 1.0  # above chance for 10 classes


def test_ceiling_bench_trains_each_pipeline_and_scores_it_next_to_raw_pixels(small_quickstart):
    spec, train_dir, test_dir = small_quickstart
    result = _run("bench/quickstart_ceiling.py", "--spec", str(spec), "--iterations", "100",
                  "--batch-size", "16", "--limit-train", "400", "--limit-test", "200")
    assert (result["num_train"], result["num_test"]) == (400, 200)
    assert result["raw_pixels"] == _raw_pixels_top1(train_dir, test_dir, 400, 200)
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


def test_ceiling_bench_overrides_change_the_multicrop_augmentation(small_quickstart):
    spec = small_quickstart[0]
    common = ["--spec", str(spec), "--iterations", "30", "--batch-size", "8", "--limit-train", "100",
              "--limit-test", "50", "--pipelines", "multicrop"]
    plain = ["data.crops.global_scale=[1.0,1.0]", "data.crops.aspect_ratio=[1.0,1.0]", "data.crops.flip_probability=0",
             "data.crops.jitter_probability=0", "data.crops.grayscale_probability=0",
             "data.crops.blur_probabilities=disabled", "data.crops.solarize_probability=0"]
    recipe = _run("bench/quickstart_ceiling.py", *common)
    off = _run("bench/quickstart_ceiling.py", *common, *(a for o in plain for a in ("--override", o)))
    assert recipe["overrides"] == [] and off["overrides"] == plain
    assert off["multicrop"]["final_loss"] != recipe["multicrop"]["final_loss"]

    proc = subprocess.run([sys.executable, "bench/quickstart_ceiling.py", "--spec", str(spec),
                           "--override", "data.crops.flip_probability=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "data.crops.flip_probability" in proc.stderr and "0..1" in proc.stderr
