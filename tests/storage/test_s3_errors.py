"""Wrong credentials, a missing bucket and an unreachable endpoint: one clear error naming the URI, never a traceback,
and nothing half-published (no bucket created, no index.json, no COMPLETE.json)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import s3fs
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from tests.storage.s3_server import S3Server
from tests.trainer import train_harness as h
from trainer.artifacts import export_backbone
from trainer.config import ModelConfig
from trainer.models import build_backbone

FAILURES = {
    # name: (environment change, bucket to use, words the message must hold)
    "wrong-credentials": ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, None, "access denied (SignatureDoesNotMatch)"),
    "missing-bucket": ({}, "no-such-bucket", "bucket 'no-such-bucket' does not exist"),
    "unreachable-endpoint": ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "S3_ENDPOINT_URL": "http://127.0.0.1:9"},
                             None, "cannot reach the storage endpoint http://127.0.0.1:9"),
}


@pytest.fixture(params=sorted(FAILURES))
def failure(request, s3, monkeypatch):
    """(URI prefix that fails, the words its message must hold) with the environment set up to fail."""
    change, bucket, words = FAILURES[request.param]
    for key, value in change.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{bucket or s3.name}/{request.param}", words
    s3fs.S3FileSystem.clear_instance_cache()


def _buckets(server: S3Server) -> list[str]:
    return sorted(path.name for path in (server.workdir / "root").iterdir() if not path.name.startswith("."))


def _assert_one_clear_error(output: str, uri: str, words: str) -> None:
    assert "Traceback" not in output and "╭" not in output, output[-3000:]
    flat = " ".join(output.split())  # rich wraps long lines at the terminal width
    assert flat.count("error:") == 1, output[-3000:]
    message = flat[flat.index("error:"):]
    assert uri in message and words in message, output[-3000:]


def test_checkpoints_list_and_promote(failure, s3) -> None:
    uri, words = failure
    runner = CliRunner()
    listed = runner.invoke(app, ["checkpoints", "list", "--dir", f"{uri}/pretrain"])
    assert listed.exit_code == 1
    _assert_one_clear_error(listed.output, f"{uri}/pretrain", words)
    as_json = runner.invoke(app, ["checkpoints", "list", "--dir", f"{uri}/pretrain", "--output", "json"])
    assert as_json.exit_code == 1 and words in json.loads(as_json.stdout)["error"]


def test_data_prepare_writes_nothing(failure, s3, tmp_path) -> None:
    uri, words = failure
    before = _buckets(s3.server)
    result = CliRunner().invoke(app, ["data", "prepare", "/usr/share/datasets/fashion-mnist", "--format",
                                      "fashion-mnist", "--split", "test", "--limit", "20", "--out", f"{uri}/data"])
    assert result.exit_code == 1
    _assert_one_clear_error(result.output, f"{uri}/data", words)
    assert _buckets(s3.server) == before  # no bucket created by the attempt
    assert not s3.fs.find(s3.name)


def test_export_writes_nothing(failure, s3, tmp_path) -> None:
    uri, words = failure
    config = ModelConfig(arch="vit_pico", patch_size=4, img_size=32)
    export_backbone(build_backbone(config), config, str(tmp_path / "export"))
    before = _buckets(s3.server)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "export"), "--out", f"{uri}/export"])
    assert result.exit_code == 1
    _assert_one_clear_error(result.output, f"{uri}/export", words)
    assert _buckets(s3.server) == before and not s3.fs.find(s3.name)


def test_the_trainer_exits_1_with_one_line(failure, s3, tmp_path) -> None:
    uri, words = failure
    config = h.write_config(tmp_path, optim__iterations=2, checkpoint__dir=f"{uri}/pretrain")
    env = h._env()  # the test's environment, with the failing change
    result = subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(config)], env=env, cwd=h.REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and f"storage: {uri}/pretrain" in lines[0] and words in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not s3.fs.find(s3.name)  # no config.yaml, no checkpoint, no log
