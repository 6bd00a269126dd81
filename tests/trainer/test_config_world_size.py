"""The world-size rules of ``trainer.config`` as the trainer applies them (the CLI side: test_validate_world_sizes)."""

from __future__ import annotations

import pytest

from trainer.config import (
    ConfigError,
    batch_share,
    micro_batches,
    per_rank_batch,
    resolve_config,
    validate_config,
    validate_world_size,
)


def test_validate_config_checks_the_world_size_it_is_given() -> None:
    config = resolve_config("tiny", overrides={"parallel.fsdp": "off"})
    validate_config(config, world_size=1)
    with pytest.raises(ConfigError, match=r"^parallel\.fsdp: invalid value 'off' with world size 2; allowed") as info:
        validate_config(config, world_size=2)
    assert (info.value.path, info.value.context) == ("parallel.fsdp", "with world size 2")


@pytest.mark.parametrize(("batch", "world", "cap", "split"), [
    (32, 1, None, (1, 32)), (32, 4, None, (1, 8)), (32, 4, 2, (4, 2)), (32, 4, 4, (2, 4)), (48, 4, 5, (3, 4)),
    (48, 4, 7, (2, 6)), (40, 1, 16, (3, 13)), (40, 3, None, (1, 13)), (8, 3, 2, (2, 1)), (3072, 120, None, (1, 25)),
])
def test_micro_batches_are_the_fewest_under_the_cap_and_the_same_count_on_every_rank(
    batch: int, world: int, cap: int | None, split: tuple[int, int]
) -> None:
    config = resolve_config("tiny", overrides={"optim.global_batch_size": batch, "optim.max_micro_batch_size": cap,
                                                "loss.koleo_loss_weight": 0})
    assert micro_batches(config, world) == split
    validate_config(config, world_size=world)


@pytest.mark.parametrize(("batch", "world"), [(8, 1), (8, 2), (8, 3), (8, 8), (3072, 112), (3072, 120), (3072, 128)])
def test_every_world_size_up_to_the_batch_gets_contiguous_shares_that_differ_by_at_most_one(batch: int, world: int):
    config = resolve_config("tiny", overrides={"optim.global_batch_size": batch})
    shares = [batch_share(config, world, rank) for rank in range(world)]
    assert [i for share in shares for i in share] == list(range(batch))  # every image once, in order
    assert {len(share) for share in shares} <= {batch // world, -(-batch // world)}
    assert [len(s) for s in shares] == sorted((len(s) for s in shares), reverse=True)  # larger shares first
    assert per_rank_batch(config, world, world - 1) == batch // world


def test_world_size_rules_refuse_what_cannot_run_and_say_why() -> None:
    config = resolve_config("tiny", overrides={"optim.global_batch_size": 8})
    refused = r"^optim\.global_batch_size: invalid value 8; allowed: at least the world size \(9\)"
    with pytest.raises(ConfigError, match=refused):
        validate_world_size(config, 9)
    # KoLeo needs a neighbour: 8 over 5 ranks gives shares 2/2/2/1/1
    with pytest.raises(ConfigError, match=r"at least 2 images on every rank with KoLeo enabled \(world size 5 gives 1"):
        validate_world_size(config, 5)
    without_koleo = resolve_config("tiny", overrides={"optim.global_batch_size": 8, "loss.koleo_loss_weight": 0})
    validate_world_size(without_koleo, 5)
    # every rank runs the same number of micro-batches: 5 over 3 (2/2/1) with a cap of 1 would leave the last rank
    # one image for two micro-batches
    capped = resolve_config("tiny", overrides={"optim.global_batch_size": 5, "optim.max_micro_batch_size": 1,
                                                "loss.koleo_loss_weight": 0})
    with pytest.raises(ConfigError, match=r"max_micro_batch_size: invalid value 1 with world size 3; allowed: at least"):
        micro_batches(capped, 3)
    # KoLeo on micro-batches: 12 over 2 ranks capped at 2 gives 3 micro-batches of 2 (fine), capped at 1 six of 1
    koleo = resolve_config("tiny", overrides={"optim.global_batch_size": 12, "optim.max_micro_batch_size": 1})
    with pytest.raises(ConfigError, match=r"^optim\.max_micro_batch_size: invalid value 1; allowed: a cap that leaves"):
        validate_world_size(koleo, 2)


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("checkpoint.keep_last", -1, ">= 0 (0 keeps all)"),
    ("checkpoint.interval_iterations", 0, "an integer >= 1"),
    ("heads.num_layers", 0, "an integer >= 1"),
])
def test_runtime_settings_are_checked_before_the_runtime_starts(key: str, value: int, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("tiny", overrides={key: value})
    assert (info.value.path, info.value.value, info.value.allowed) == (key, value, allowed)
