"""The training loader on real MDS shards and real StreamingDatasets: exact resume (1 rank, 2 ranks, 2 -> 1),
worker-count independence, epoch roll-over, bad data, deferred colour, errors."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.data.helpers import jpeg_bytes, tiny_config, write_mds
from tests.dist_utils import run_distributed
from trainer.config import ConfigError
from trainer.data.loader import TrainLoader, build_train_loader
from trainer.data.workers import keep_freed_memory

SEED = 3


def _ids(count: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(count)]


def _loader(config, *, rank: int = 0, world_size: int = 1) -> TrainLoader:
    return build_train_loader(
        config, rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size, seed=SEED,
        clean_stale_shm=False,
    )


def _digest(batch: dict[str, Any]) -> str:
    """Fingerprint of everything random in a batch (crops and masks)."""
    hasher = hashlib.sha1()
    for key in ("global_crops", "local_crops", "masks"):
        hasher.update(batch[key].contiguous().numpy().tobytes())
    return hasher.hexdigest()


def _sample_digests(batch: dict[str, Any]) -> dict[str, str]:
    """Sample id -> fingerprint of its first global crop (crop-major: crop 0 of image b is row b)."""
    crops = batch["global_crops"]
    ids = batch["sample_ids"]
    return {i: hashlib.sha1(crops[b].contiguous().numpy().tobytes()).hexdigest() for b, i in enumerate(ids)}


def _sample_masks(loader: TrainLoader, count: int) -> dict[tuple[str, int], bytes]:
    """(sample id, global view) -> its iBOT mask, over the next ``count`` batches."""
    iterator: Iterator = iter(loader)
    found = {}
    try:
        for _ in range(count):
            batch = next(iterator)
            ids, masks = batch["sample_ids"], batch["masks"]
            for view in range(2):
                for index, sample_id in enumerate(ids):
                    found[sample_id, view] = masks[view * len(ids) + index].numpy().tobytes()
    finally:
        iterator.close()
    return found


def _take(loader: TrainLoader, count: int) -> list[tuple[list[str], str, int, dict[str, str]]]:
    """(sample ids, batch fingerprint, bad samples, per-sample fingerprints) of the next ``count`` batches."""
    iterator: Iterator = iter(loader)
    try:
        batches = [next(iterator) for _ in range(count)]
    finally:
        iterator.close()  # shuts the DataLoader pass (and its workers) down
    return [(b["sample_ids"], _digest(b), b["num_bad_samples"], _sample_digests(b)) for b in batches]


def _resumed(config, total: int, split: int, **world) -> tuple[list, dict]:
    head_loader = _loader(config, **world)
    head = _take(head_loader, split)
    state = json.loads(json.dumps(head_loader.state_dict()))  # what a checkpoint stores
    tail_loader = _loader(config, **world)
    tail_loader.load_state_dict(state)
    return head + _take(tail_loader, total - split), state


@pytest.fixture
def mds(tmp_path: Path) -> str:
    return str(write_mds(tmp_path / "mds", _ids(52)))


def test_synthetic_resume_is_exact() -> None:
    config = tiny_config()
    full = _take(_loader(config), 6)
    resumed, state = _resumed(config, 6, 4)
    assert resumed == full
    assert state["samples_seen"] == 32 and state["dataset"] == "synthetic"


@pytest.mark.parametrize("world_size", [2, 3])
def test_synthetic_batches_are_the_same_at_any_world_size(world_size: int) -> None:
    config = tiny_config()  # global batch 8: shares 4/4 at two ranks, 3/3/2 at three
    single = _take(_loader(config), 3)
    ranks = [_take(_loader(config, rank=rank, world_size=world_size), 3) for rank in range(world_size)]
    shares = [[len(ids) for ids, *_ in batches] for batches in ranks]
    assert shares == [[s] * 3 for s in ([4, 4] if world_size == 2 else [3, 3, 2])]
    for step, (ids, *_, digests) in enumerate(single):
        assert [i for batches in ranks for i in batches[step][0]] == ids  # contiguous shares, in rank order
        split = {k: v for batches in ranks for k, v in batches[step][3].items()}
        assert split == digests  # the same crops
    split_masks = {}
    for rank in range(world_size):
        split_masks.update(_sample_masks(_loader(config, rank=rank, world_size=world_size), 3))
    assert _sample_masks(_loader(config), 3) == split_masks


def test_mds_resume_mid_epoch_and_across_the_epoch_end(mds: str, world_env) -> None:
    config = tiny_config(streams=[{"remote": mds}])
    full = _take(_loader(config), 9)  # 52 samples: 6 full batches of 8 per epoch, then epoch 1
    epoch0 = [i for ids, *_ in full[:6] for i in ids]
    assert len(set(epoch0)) == 48 and set(epoch0) <= set(_ids(52))
    assert epoch0 != sorted(epoch0)  # shuffled
    for split in (3, 6, 7):
        resumed, state = _resumed(config, 9, split)
        assert resumed == full, f"resume after {split} batches"
    assert state["epoch"] == 1 and state["sample_in_epoch"] == 8 and state["samples_seen"] == 56


def test_a_second_iteration_of_the_same_loader_continues(mds: str, world_env) -> None:
    config = tiny_config(streams=[{"remote": mds}])
    full = _take(_loader(config), 5)
    loader = _loader(config)
    assert _take(loader, 2) + _take(loader, 3) == full


def test_mds_batches_do_not_depend_on_the_number_of_workers(mds: str, world_env) -> None:
    without = _take(_loader(tiny_config(streams=[{"remote": mds}])), 5)
    config = tiny_config(streams=[{"remote": mds}], **{"data.num_workers": 2})
    with_workers = _take(_loader(config), 5)
    assert with_workers == without  # same ids and the same crops: positions survive the worker split
    resumed, _ = _resumed(config, 5, 2)
    assert resumed == without


def _ranks(rank: int, world_size: int, root: str, total: int, split: int) -> dict[str, Any]:
    config = tiny_config(streams=[{"remote": root}])
    full = _take(_loader(config, rank=rank, world_size=world_size), total)
    resumed, state = _resumed(config, total, split, rank=rank, world_size=world_size)
    masks = _sample_masks(_loader(config, rank=rank, world_size=world_size), total)
    return {"full": full, "resumed": resumed, "state": state, "masks": masks}


@pytest.mark.parametrize("world_size", [2, 3])
def test_mds_ranks_resume_and_continue_on_one_rank(mds: str, world_env, world_size: int) -> None:
    total, split = 5, 2
    ranks = run_distributed(_ranks, world_size=world_size, args=(mds, total, split), timeout_s=600)
    for result in ranks:
        assert result["resumed"] == result["full"]
    assert all(r["state"] == ranks[0]["state"] for r in ranks)  # the position is global
    per_rank = [[ids for ids, *_ in r["full"]] for r in ranks]
    assert [len(ids) for ids in per_rank[-1]] == [4 if world_size == 2 else 2] * total
    global_order = [[x for rank in per_rank for x in rank[step]] for step in range(total)]
    assert all(len(set(ids)) == 8 for ids in global_order)
    # Resize W -> 1 (same global batch): the single rank continues the same global sequence, same crops and masks.
    single = _loader(tiny_config(streams=[{"remote": mds}]))
    single.load_state_dict(ranks[0]["state"])
    continued = _take(single, total - split)
    assert [ids for ids, *_ in continued] == global_order[split:]
    split_crops = {k: v for r in ranks for *_, digests in r["full"] for k, v in digests.items()}
    assert {k: v for *_, digests in continued for k, v in digests.items()}.items() <= split_crops.items()
    uninterrupted_single = _take(_loader(tiny_config(streams=[{"remote": mds}])), total)
    assert [ids for ids, *_ in uninterrupted_single] == global_order
    assert [digest for _, digest, *_ in uninterrupted_single[split:]] == [digest for _, digest, *_ in continued]
    single_masks = _sample_masks(_loader(tiny_config(streams=[{"remote": mds}])), total)
    assert single_masks == {k: v for r in ranks for k, v in r["masks"].items()}
    assert sum(any(m) for m in map(bytearray, single_masks.values())) > 0  # some crops are masked


def test_stream_mixing_by_proportion_repeat_and_choose(tmp_path: Path, world_env) -> None:
    a = str(write_mds(tmp_path / "a", _ids(60, "a")))
    b = str(write_mds(tmp_path / "b", _ids(30, "b")))

    def fraction_of_b(streams: list[dict], batches: int) -> tuple[float, list[str]]:
        ids = [i for batch, *_ in _take(_loader(tiny_config(streams=streams)), batches) for i in batch]
        return sum(i.startswith("b") for i in ids) / len(ids), ids

    share, _ = fraction_of_b([{"remote": a, "proportion": 0.75}, {"remote": b, "proportion": 0.25}], 11)
    assert share == pytest.approx(0.25, abs=0.05)  # 88 of the 90-sample epoch
    share, ids = fraction_of_b([{"remote": a}, {"remote": b, "repeat": 2}], 15)
    assert share == pytest.approx(0.5, abs=0.04)  # 120-sample epoch, b twice
    assert max(ids.count(i) for i in ids if i.startswith("b")) == 2
    share, _ = fraction_of_b([{"remote": a}, {"remote": b, "choose": 12}], 9)
    assert share == pytest.approx(12 / 72, abs=0.03)


def test_remote_stream_is_cached_locally(tmp_path: Path, world_env) -> None:
    remote = str(write_mds(tmp_path / "remote", _ids(20)))
    cache = tmp_path / "cache"
    config = tiny_config(streams=[{"remote": remote, "local": str(cache)}])
    batches = _take(_loader(config), 2)
    assert len(batches) == 2 and (cache / "index.json").is_file()
    assert any(p.name.endswith(".mds") for p in cache.iterdir())


def test_bad_samples_are_counted_over_an_epoch(tmp_path: Path, world_env) -> None:
    ids = _ids(24)
    # truncated JPEG, a PNG signature with garbage, a JPEG start marker and nothing else
    bad = {ids[3]: jpeg_bytes(3, 64)[:150], ids[17]: b"\x89PNG\r\n\x1a\n broken", ids[20]: b"\xff\xd8\xff"}
    root = str(write_mds(tmp_path / "bad", ids, images=bad))
    batches = _take(_loader(tiny_config(streams=[{"remote": root}])), 3)  # the whole 24-sample epoch
    assert sum(count for _, _, count, _ in batches) == 3


def test_gpu_augment_on_the_cpu_gives_the_same_batches(mds: str, world_env) -> None:
    plain = _loader(tiny_config(streams=[{"remote": mds}]))
    deferred = _loader(tiny_config(streams=[{"remote": mds}], **{"data.crops.gpu_augment": True}))
    assert deferred.device == torch.device("cpu")
    for a, b in zip(iter(plain), iter(deferred)):
        assert a["sample_ids"] == b["sample_ids"] and "colour" not in b
        torch.testing.assert_close(b["global_crops"], a["global_crops"], atol=1e-5, rtol=0)
        torch.testing.assert_close(b["local_crops"], a["local_crops"], atol=1e-5, rtol=0)
        break


def test_environment_that_contradicts_the_rank_is_an_error(mds: str, world_env) -> None:
    world_env(rank=1, world_size=2, local_rank=1, local_world_size=2)
    with pytest.raises(ValueError, match="environment RANK='1' disagrees with rank=0"):
        _loader(tiny_config(streams=[{"remote": mds}]), rank=0, world_size=2)


def test_a_world_larger_than_the_global_batch_is_refused(mds: str, world_env) -> None:
    _loader(tiny_config(), rank=2, world_size=3)  # 8 images over 3 ranks: 3/3/2
    with pytest.raises(ConfigError, match=r"optim\.global_batch_size: invalid value 8; allowed: at least the world"):
        _loader(tiny_config(), rank=0, world_size=9)


def test_missing_mds_directory_is_a_config_error(tmp_path: Path, world_env) -> None:
    config = tiny_config(streams=[{"remote": str(tmp_path / "nothing")}])
    with pytest.raises(ConfigError, match=r"data.streams\[0\].remote: invalid value .*allowed: a directory holding"):
        _loader(config)


def test_state_of_another_dataset_kind_is_rejected(mds: str, world_env) -> None:
    synthetic_state = _loader(tiny_config()).state_dict()
    with pytest.raises(ValueError, match="loader state: dataset 'synthetic' cannot resume a 'mds' loader"):
        _loader(tiny_config(streams=[{"remote": mds}])).load_state_dict(synthetic_state)


def test_an_epoch_smaller_than_a_batch_is_an_error(tmp_path: Path, world_env) -> None:
    root = str(write_mds(tmp_path / "small", _ids(5)))
    with pytest.raises(RuntimeError, match="an epoch of 5 samples yields no full batch of 8 over all ranks"):
        _take(_loader(tiny_config(streams=[{"remote": root}])), 1)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only")
def test_workers_keep_freed_memory_on_glibc() -> None:
    assert keep_freed_memory() is True
