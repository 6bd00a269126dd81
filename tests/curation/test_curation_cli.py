"""``dino-ctl curate``: runs the pipeline, renders Jobs, and reports mistakes with exit code 2 naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from typer.testing import CliRunner

from curation_data import encode, make_image, write_images
from dino_ctl.cli.main import app

REPO = Path(__file__).resolve().parents[2]


def _write_spec(tmp_path: Path, **changes) -> Path:
    rng = np.random.default_rng(0)
    write_images(tmp_path / "pool", {f"{i}.png": encode(make_image(rng)) for i in range(6)})
    spec = {
        "name": "cli",
        "output": str(tmp_path / "out"),
        "sources": [{"name": "pool", "kind": "folder", "path": str(tmp_path / "pool")}],
        "embed": {"model": "thumbnail"},
        "dedup": {"k": 4, "threshold": 0.9},
    }
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_curate_runs_every_step_and_reports(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["curate", str(_write_spec(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "curation steps" in result.output and "write" in result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["samples"] == 6
    again = CliRunner().invoke(app, ["curate", str(tmp_path / "spec.yaml")])
    assert again.exit_code == 0 and again.output.count("reused") >= 5


def test_bad_spec_exits_2_naming_the_field(tmp_path: Path) -> None:
    spec = _write_spec(tmp_path, dedup={"k": -1})
    result = CliRunner().invoke(app, ["curate", str(spec)])
    assert result.exit_code == 2
    assert "dedup.k" in result.output and "-1" in result.output


def test_shard_index_only_with_sharded_steps(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["curate", str(_write_spec(tmp_path)), "--shard-index", "0"])
    assert result.exit_code == 2 and "only embed or write with --shard-index" in result.output


def test_missing_upstream_step_exits_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["curate", str(_write_spec(tmp_path)), "--steps", "dedup"])
    assert result.exit_code == 1 and "needs step 'embed'" in result.output


def test_render_prints_the_jobs() -> None:
    args = ["curate", str(REPO / "examples" / "curation.yaml"), "--render", "--image", "reg/dino-ctl:1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout)]
    assert kinds == ["ConfigMap", "PyTorchJob"]  # one elastic torchrun job runs every step (curation/kube.py)
    no_image = CliRunner().invoke(app, args[:3])
    assert no_image.exit_code == 2 and "--render needs --image" in no_image.output


def test_python_dash_m_curation_uses_job_completion_index(tmp_path: Path) -> None:
    spec = _write_spec(tmp_path, embed={"model": "thumbnail", "num_shards": 2})
    env = {"JOB_COMPLETION_INDEX": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-m", "curation", str(spec), "--steps", "embed"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    shards = sorted(p.name for p in (tmp_path / "out" / "embed" / "pool").glob("*.json"))
    assert shards == ["part-00001-of-00002.json"]  # only this pod's shard


def test_curate_with_two_local_ranks_matches_one(tmp_path: Path) -> None:
    one = _write_spec(tmp_path / "one")
    two = _write_spec(tmp_path / "two")
    assert CliRunner().invoke(app, ["curate", str(one)]).exit_code == 0
    result = subprocess.run([sys.executable, "-m", "dino_ctl.cli.main", "curate", str(two), "--ranks", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: step write done" in result.stderr
    manifests = [json.loads((p / "out" / "manifest.json").read_text()) for p in (tmp_path / "one", tmp_path / "two")]
    assert manifests[0]["samples"] == manifests[1]["samples"] == 6
    assert manifests[0]["steps"]["dedup"]["summary"] == manifests[1]["steps"]["dedup"]["summary"]


def test_ranks_refuse_shard_options(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["curate", str(_write_spec(tmp_path)), "--ranks", "2", "--shard-index", "0"])
    assert result.exit_code == 2 and "--ranks" in result.output
