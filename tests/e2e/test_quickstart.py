"""A shortened examples/quickstart.yaml end to end through ``dino-ctl run --output json``.

Same spec, same recipe and overrides; only the budget is cut (iterations, dataset and eval sizes) and every path
moved to a temporary directory. Checks the prepared data, the checkpoints and export, the live /metrics endpoint,
the plot and the evaluation report.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.dist_utils import find_free_port
from tests.trainer import train_harness as h
from trainer import layout

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(),
                       reason="needs the Debian package dataset-fashion-mnist (scripts/setup.sh)"),
]
QUICKSTART = h.REPO / "examples" / "quickstart.yaml"


def _shortened(tmp_path: Path, port: int) -> Path:
    spec = yaml.safe_load(QUICKSTART.read_text())
    body = spec["spec"]
    body["storage"]["checkpoints"] = f"file://{tmp_path}/runs"
    stream = body["data"]["streams"][0]
    stream["local"] = str(tmp_path / "data" / "train")
    stream["prepare"]["limit"] = 600
    body["monitoring"]["port"] = port
    evaluation = body["evaluation"]
    evaluation.update(train=stream["local"], test=str(tmp_path / "data" / "test"), limitTrain=400, limitTest=200)
    evaluation["prepareTest"]["limit"] = 200
    overrides = body["stages"][0]["overrides"]
    overrides.update({"optim.iterations": 30, "optim.warmup_iterations": 5, "checkpoint.interval_iterations": 10,
                      "metrics.log_interval": 5})
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_shortened_quickstart_trains_serves_metrics_evaluates_and_plots(tmp_path):
    port = find_free_port()
    spec = _shortened(tmp_path, port)
    process = subprocess.Popen(
        [sys.executable, "-m", "dino_ctl", "run", str(spec), "--output", "json"], cwd=h.REPO, env=h._env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stage_dir = tmp_path / "runs" / "pretrain"
    h.wait_for(lambda: any(r["event"] == "step" for r in h.log_records(stage_dir)), process=process,
               timeout=300, what="the first logged step")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["dino_train_iterations"].samples[0].value >= 5
    assert families["dino_build_info"].samples[0].labels["recipe"] == "tiny"

    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-4000:]
    summary = json.loads(out.strip().splitlines()[-1])

    assert (tmp_path / "data" / "train" / "index.json").exists() and (tmp_path / "data" / "test" / "index.json").exists()
    (stage,) = summary["stages"]
    assert stage["name"] == "pretrain" and stage["steps"] == 30 and stage["exit_code"] == 0
    assert 0 < stage["final_losses"]["total"] < 50 and stage["images_per_second"] > 0
    assert [c.iteration for c in layout.list_checkpoints(str(stage_dir)) if c.complete][-1] == 30
    assert (stage_dir / "export" / "backbone.safetensors").exists()

    knn = summary["knn"]
    assert knn["num_train"] == 400 and knn["num_test"] == 200 and knn["protocol"] == "knn"
    assert set(knn["top1"]) == {"trained", "random_init", "raw_pixels"}
    assert all(0.0 <= value <= 1.0 for value in knn["top1"].values())
    assert knn["top1"]["raw_pixels"] > 0.4  # 10 classes: the eval data and labels line up (chance is 0.1)

    plot = Path(summary["plot"])
    assert plot.parent == stage_dir and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
