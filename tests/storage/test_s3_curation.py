"""A curation run (``dino-ctl curate``) publishing its MDS dataset to S3 (``write.remote``): the same samples as the
local dataset, read back by mosaicml-streaming from the bucket, ``index.json`` uploaded last; a missing bucket fails
before the first step, naming the URI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from typer.testing import CliRunner

from dino_ctl.cli.main import app
from tests.curation.curation_data import encode, make_image, write_images


def _write_spec(tmp_path: Path, remote: str) -> Path:
    rng = np.random.default_rng(0)
    write_images(tmp_path / "pool", {f"a/{i:03d}.png": encode(make_image(rng)) for i in range(12)})
    spec = {
        "name": "s3-test",
        "output": str(tmp_path / "work"),
        "seed": 1,
        "sources": [{"name": "pool", "kind": "folder", "path": str(tmp_path / "pool")}],
        "embed": {"model": "thumbnail", "batch_size": 8},
        "dedup": {"k": 4, "threshold": 0.99, "eval_threshold": 0.99},
        "write": {"num_shards": 2, "size_limit": 4096, "remote": remote},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _ids(remote: str | None, local: Path) -> list[str]:
    from streaming import StreamingDataset

    dataset = StreamingDataset(remote=remote, local=str(local), shuffle=False, batch_size=1)
    return [dataset.get_item(index)["id"] for index in range(dataset.num_samples)]


def test_curation_publishes_its_dataset_to_s3_index_last(s3, tmp_path: Path) -> None:
    remote = s3.uri("datasets", "curated")
    result = CliRunner().invoke(app, ["curate", str(_write_spec(tmp_path, remote))])
    assert result.exit_code == 0, result.output[-3000:]
    prefix = f"{s3.name}/datasets/curated"
    names = sorted(path[len(prefix) + 1:] for path in s3.fs.find(prefix))
    assert "index.json" in names and "manifest.json" in names
    assert {name.split("/")[0] for name in names} == {"index.json", "manifest.json", "part-00000", "part-00001"}
    assert not [name for name in names if name.endswith("DONE.json")]
    puts = [path for _, method, path in s3.server.requests() if method == "PUT" and "/datasets/curated/" in path]
    assert puts[-1].endswith("/datasets/curated/index.json")  # published last

    local_ids = _ids(None, tmp_path / "work" / "dataset")
    assert len(local_ids) == 12
    assert _ids(remote, tmp_path / "cache") == local_ids  # streamed back from the bucket


def test_a_missing_bucket_fails_before_the_first_step(s3, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["curate", str(_write_spec(tmp_path, "s3://no-such-bucket/curated"))])
    assert result.exit_code == 1
    flat = " ".join(result.output.split())
    assert "s3://no-such-bucket/curated: bucket 'no-such-bucket' does not exist" in flat, result.output
    assert not (tmp_path / "work").exists()  # nothing embedded
