"""The world-size rules of ``trainer.config`` as the trainer applies them (the CLI side: test_validate_world_sizes)."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, micro_batches, per_rank_batch, resolve_config, validate_config


def test_validate_config_checks_the_world_size_it_is_given() -> None:
    config = resolve_config("tiny", overrides={"parallel.fsdp": "off"})
    validate_config(config, world_size=1)
    with pytest.raises(ConfigError, match=r"^parallel\.fsdp: invalid value 'off' with world size 2; allowed") as info:
        validate_config(config, world_size=2)
    assert (info.value.path, info.value.context) == ("parallel.fsdp", "with world size 2")


@pytest.mark.parametrize(("batch", "world", "cap", "split"), [
    (32, 1, None, (1, 32)), (32, 4, None, (1, 8)), (32, 4, 2, (4, 2)), (32, 4, 4, (2, 4)), (48, 4, 5, (3, 4)), (48, 4, 7, (2, 6)),
])
def test_micro_batches_are_the_fewest_equal_ones_under_the_cap(batch: int, world: int, cap: int | None,
                                                               split: tuple[int, int]) -> None:
    config = resolve_config("tiny", overrides={"optim.global_batch_size": batch, "optim.max_micro_batch_size": cap})
    assert per_rank_batch(config, world) == batch // world
    assert micro_batches(config, world) == split
    validate_config(config, world_size=world)


def test_uneven_micro_batches_and_batch_shares_are_refused() -> None:
    config = resolve_config("tiny", overrides={"optim.global_batch_size": 40, "optim.max_micro_batch_size": 16})
    with pytest.raises(ConfigError, match=r"max_micro_batch_size: invalid value 16 with world size 1 \(40 per rank"):
        micro_batches(config, 1)  # a cap of 16 needs 3 micro-batches, and 40 / 3 is not whole
    assert micro_batches(config, 2) == (2, 10)
    with pytest.raises(ConfigError, match=r"optim\.global_batch_size: invalid value 40; allowed: a multiple"):
        per_rank_batch(config, 3)


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("checkpoint.keep_last", -1, ">= 0 (0 keeps all)"),
    ("checkpoint.interval_iterations", 0, "an integer >= 1"),
    ("heads.num_layers", 0, "an integer >= 1"),
])
def test_runtime_settings_are_checked_before_the_runtime_starts(key: str, value: int, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("tiny", overrides={key: value})
    assert (info.value.path, info.value.value, info.value.allowed) == (key, value, allowed)
