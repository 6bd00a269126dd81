"""``dino-ctl data prepare`` end to end through the Typer app."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from dino_ctl.cli.main import app
from tests.data.helpers import jpeg_bytes


def _folder(root: Path) -> Path:
    for name in ("a/1.jpg", "a/2.jpg", "b/3.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(jpeg_bytes(len(name)))
    return root


def test_prepare_folder_with_limit(tmp_path: Path) -> None:
    source = _folder(tmp_path / "images")
    result = CliRunner().invoke(app, ["data", "prepare", str(source), "--out", str(tmp_path / "out"), "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 samples to" in result.output
    assert (tmp_path / "out" / "index.json").is_file()


def test_prepare_json_output(tmp_path: Path) -> None:
    source = _folder(tmp_path / "images")
    args = ["data", "prepare", str(source), "--out", str(tmp_path / "out"), "-o", "json", "--shard-size", "4kb"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = {"out": str(tmp_path / "out"), "samples": 3, "skipped": 0, "classes": ["a", "b"], "format": "folder"}
    assert report == expected


def test_prepare_user_mistakes_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["data", "prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert missing.exit_code == 2 and "is not a directory" in missing.output
    bad_format = runner.invoke(app, ["data", "prepare", str(tmp_path), "--out", "x", "--format", "tar"])
    assert bad_format.exit_code == 2 and "--format" in bad_format.output
    bad_size = runner.invoke(app, ["data", "prepare", str(tmp_path), "--out", "x", "--shard-size", "lots"])
    assert bad_size.exit_code == 2 and "invalid value 'lots'" in bad_size.output
