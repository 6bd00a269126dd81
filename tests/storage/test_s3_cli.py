"""The CLI on s3:// URIs, as a user with a bucket would run it: data prepare, a training stage writing to S3,
checkpoints list/show/promote, export to S3 and eval knn with the model and both datasets on S3."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from tests.trainer import train_harness as h
from trainer import layout

pytestmark = pytest.mark.slow

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _ok(result) -> dict:
    assert result.exit_code == 0, result.output[-3000:]
    text = result.stdout.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # progress or log lines before the one JSON line
        return json.loads(text.splitlines()[-1])


def test_prepare_train_list_promote_export_and_eval_on_s3(s3, tmp_path) -> None:
    runner = CliRunner()
    data = {}
    for split, limit in (("train", 300), ("test", 100)):
        data[split] = s3.uri("datasets", f"fmnist-{split}")
        summary = _ok(runner.invoke(app, ["data", "prepare", FASHION_MNIST, "--format", "fashion-mnist", "--split",
                                          split, "--limit", str(limit), "--shard-size", "64kb", "--out", data[split],
                                          "--output", "json"]))
        assert summary["samples"] == limit and summary["out"] == data[split]
        shards = s3.fs.ls(data[split].split("://", 1)[1], detail=False)
        assert len(shards) >= 2 and any(path.endswith("/index.json") for path in shards)

    stage_dir = s3.uri("runs", "quick", "pretrain")
    config = h.write_config(tmp_path, optim__iterations=4, checkpoint__interval_iterations=2,
                            checkpoint__dir=stage_dir, metrics__log_file=str(tmp_path / "train_log.jsonl"))
    trained = h.run(config, nproc=1)
    assert trained.returncode == 0, trained.stderr[-3000:]

    listed = _ok(runner.invoke(app, ["checkpoints", "list", "--dir", stage_dir, "--output", "json"]))
    assert [(row["iteration"], row["complete"], row["published"]) for row in listed["checkpoints"]] == [
        (2, True, False), (4, True, False)]
    promoted = _ok(runner.invoke(app, ["checkpoints", "promote", "2", "--dir", stage_dir, "--output", "json"]))
    assert promoted["published"] == f"{stage_dir}/ckpt-000000002"
    assert layout.published_or_latest(stage_dir).iteration == 2
    shown = _ok(runner.invoke(app, ["checkpoints", "show", "--dir", stage_dir, "--output", "json"]))
    assert shown["iteration"] == 4 and shown["meta"]["reason"] == "final" and not shown["published"]

    export_dir = s3.uri("exports", "quick")
    exported = _ok(runner.invoke(app, ["export", f"{stage_dir}/ckpt-000000002", "--network", "teacher", "--out",
                                       export_dir, "--output", "json"]))
    assert exported["arch"] == "vit_pico"
    files = sorted(path.rsplit("/", 1)[-1] for path in s3.fs.ls(export_dir.split("://", 1)[1], detail=False))
    assert files == ["backbone.pth", "backbone.safetensors", "model.json"]  # no .partial left behind

    report = _ok(runner.invoke(app, ["eval", "knn", export_dir, "--train", data["train"], "--test", data["test"],
                                     "--output", "json"]))
    assert report["num_train"] == 300 and report["num_test"] == 100
    assert set(report["top1"]) == {"trained", "random_init", "raw_pixels"}
    assert all(0.0 <= value <= 1.0 for value in report["top1"].values())
    assert report["top1"]["raw_pixels"] > 0.3  # ten classes: the data arrived intact from S3

    from_checkpoint = _ok(runner.invoke(app, ["eval", "knn", stage_dir, "--network", "teacher", "--train",
                                              data["train"], "--test", data["test"], "--limit-train", "100",
                                              "--limit-test", "50", "--no-baseline", "--output", "json"]))
    assert from_checkpoint["num_train"] == 100 and set(from_checkpoint["top1"]) == {"trained"}


def test_prepare_refuses_to_overwrite_a_published_dataset_unless_asked(s3) -> None:
    runner = CliRunner()
    out = s3.uri("datasets", "again")
    command = ["data", "prepare", FASHION_MNIST, "--format", "fashion-mnist", "--split", "test", "--out", out,
               "--output", "json"]
    assert _ok(runner.invoke(app, [*command, "--limit", "20"]))["samples"] == 20
    refused = runner.invoke(app, [*command, "--limit", "30"])
    assert refused.exit_code == 2 and "already holds an MDS dataset" in json.loads(refused.stdout)["error"]
    assert _ok(runner.invoke(app, [*command, "--limit", "30", "--overwrite"]))["samples"] == 30
    index = json.loads(s3.fs.cat_file(f"{s3.name}/datasets/again/index.json"))
    assert sum(shard["samples"] for shard in index["shards"]) == 30
    deletes = [path for _, method, path in s3.server.requests() if method == "DELETE"]
    assert deletes[-1].endswith("/datasets/again/index.json")  # unpublished before the new shards went up
