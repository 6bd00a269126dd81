"""MDS shards streamed from the S3 server by the training loader (remote + local cache): the same batches as the same
shards on local disk, and an exact resume mid-epoch and across the epoch end from a fresh cache (every shard
downloaded again), with and without DataLoader workers; a missing dataset is one clear error naming the URI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.data.helpers import tiny_config, write_mds
from trainer.config import ConfigError
from trainer.data.loader import TrainLoader, build_train_loader
from trainer.storage import StorageError

SEED = 3


@pytest.fixture(autouse=True)
def _one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"RANK": 0, "WORLD_SIZE": 1, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1}.items():
        monkeypatch.setenv(name, str(value))


def _loader(streams: list[dict], **overrides) -> TrainLoader:
    return build_train_loader(tiny_config(streams=streams, **overrides), rank=0, world_size=1, local_rank=0,
                              local_world_size=1, seed=SEED, clean_stale_shm=False)


def _take(loader: TrainLoader, count: int) -> list[tuple[list[str], str]]:
    """(sample ids, fingerprint of the crops and masks) of the next ``count`` batches."""
    iterator = iter(loader)
    try:
        batches = [next(iterator) for _ in range(count)]
    finally:
        iterator.close()
    found = []
    for batch in batches:
        hasher = hashlib.sha1()
        for key in ("global_crops", "local_crops", "masks"):
            hasher.update(batch[key].contiguous().numpy().tobytes())
        found.append((batch["sample_ids"], hasher.hexdigest()))
    return found


@pytest.fixture
def shards(s3, tmp_path: Path) -> tuple[str, str]:
    """(local MDS directory, the same shards uploaded to s3://bucket/datasets/tiny)."""
    local = write_mds(tmp_path / "mds", [f"s{i:04d}" for i in range(52)])
    s3.fs.put(str(local), f"{s3.name}/datasets/tiny", recursive=True)
    assert len(s3.fs.ls(f"{s3.name}/datasets/tiny")) > 3  # index.json and several shards
    return str(local), s3.uri("datasets", "tiny")


def test_streaming_from_s3_equals_local_disk_and_resumes_exactly(shards, tmp_path: Path) -> None:
    local, uri = shards
    expected = _take(_loader([{"remote": local}]), 9)  # 6 batches of 8 per 52-sample epoch, then epoch 1
    cache = tmp_path / "cache"
    assert _take(_loader([{"remote": uri, "local": str(cache / "full")}]), 9) == expected
    assert (cache / "full" / "index.json").is_file() and any(p.suffix == ".mds" for p in (cache / "full").iterdir())
    for split in (3, 7):  # mid-epoch, and after the epoch end
        head_loader = _loader([{"remote": uri, "local": str(cache / f"head-{split}")}])
        head = _take(head_loader, split)
        state = json.loads(json.dumps(head_loader.state_dict()))  # what the checkpoint's per-rank JSON holds
        tail_loader = _loader([{"remote": uri, "local": str(cache / f"tail-{split}")}], **{"data.num_workers": 2})
        tail_loader.load_state_dict(state)
        assert head + _take(tail_loader, 9 - split) == expected, f"resume after {split} batches from s3"


def test_the_default_cache_is_per_uri_under_data_cache_dir(shards, tmp_path: Path) -> None:
    _, uri = shards
    loader = _loader([{"remote": uri}], **{"data.cache_dir": str(tmp_path / "cache")})
    assert len(_take(loader, 1)[0][0]) == 8
    (cached,) = (tmp_path / "cache").iterdir()
    assert (cached / "index.json").is_file()


def test_a_missing_dataset_or_bucket_on_s3_is_one_clear_error(s3, tmp_path: Path) -> None:
    uri = s3.uri("datasets", "nothing-here")
    with pytest.raises(ConfigError, match=r"data.streams\[0\].remote: invalid value 's3://.*/datasets/nothing-here'"):
        _loader([{"remote": uri, "local": str(tmp_path / "cache")}])
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"):
        _loader([{"remote": "s3://no-such-bucket/x", "local": str(tmp_path / "cache")}])
