"""Schedules hit the documented values at the documented iterations."""

from __future__ import annotations

import math

import pytest

from trainer.config import TrainConfig, resolve_config
from trainer.schedules import Schedules


def _config(**optim) -> TrainConfig:
    values = {
        "global_batch_size": 4096,  # sqrt(4096 / 1024) = 2: peak lr = 2 x base_lr
        "base_lr": 1e-3,
        "min_lr": 1e-6,
        "iterations": 100,
        "warmup_iterations": 10,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "momentum_teacher": 0.992,
        "momentum_teacher_end": 1.0,
        "freeze_last_layer_iterations": 5,
    }
    values.update(optim)
    overrides = {f"optim.{key}": value for key, value in values.items()}
    # the recipe.md teacher temperature schedule, stated here rather than inherited from the tiny recipe
    overrides.update({"loss.warmup_teacher_temp": 0.04, "loss.teacher_temp": 0.07,
                      "loss.warmup_teacher_temp_iterations": 30})
    return resolve_config("tiny", overrides=overrides)


def test_lr_warms_up_linearly_from_zero_then_cosine_to_min_lr():
    schedules = Schedules(_config())
    assert schedules.peak_lr == pytest.approx(2e-3)
    assert schedules.lr(0) == 0.0
    assert schedules.lr(5) == pytest.approx(1e-3)
    assert schedules.lr(10) == pytest.approx(2e-3)
    assert schedules.lr(55) == pytest.approx((2e-3 + 1e-6) / 2)  # half-way through the cosine
    expected = 1e-6 + 0.5 * (2e-3 - 1e-6) * (1 + math.cos(math.pi * 30 / 90))
    assert schedules.lr(40) == pytest.approx(expected)
    assert schedules.lr(100) == pytest.approx(1e-6)
    assert schedules.lr(10_000) == pytest.approx(1e-6)  # held after the end


def test_lr_without_warmup_starts_at_peak():
    schedules = Schedules(_config(warmup_iterations=0))
    assert schedules.lr(0) == pytest.approx(2e-3)
    assert schedules.lr(100) == pytest.approx(1e-6)


def test_weight_decay_and_teacher_momentum_follow_cosines():
    schedules = Schedules(_config())
    assert schedules.weight_decay(0) == pytest.approx(0.04)
    assert schedules.weight_decay(50) == pytest.approx(0.22)
    assert schedules.weight_decay(100) == pytest.approx(0.4)
    assert schedules.weight_decay(150) == pytest.approx(0.4)
    assert schedules.teacher_momentum(0) == pytest.approx(0.992)
    assert schedules.teacher_momentum(50) == pytest.approx(0.996)
    assert schedules.teacher_momentum(100) == 1.0


def test_teacher_temperature_reaches_final_value_exactly_at_warmup_end():
    schedules = Schedules(_config())
    assert schedules.teacher_temp(0) == pytest.approx(0.04)
    assert schedules.teacher_temp(15) == pytest.approx(0.055)
    assert schedules.teacher_temp(29) < 0.07
    assert schedules.teacher_temp(30) == 0.07
    assert schedules.teacher_temp(99) == 0.07


def test_last_layer_lr_is_zero_until_the_freeze_ends():
    schedules = Schedules(_config())
    assert [schedules.last_layer_lr(it) for it in range(5)] == [0.0] * 5
    assert schedules.last_layer_lr(5) == schedules.lr(5) > 0
    assert schedules.last_layer_lr(60) == schedules.lr(60)


def test_short_recipe_defaults():
    schedules = Schedules(TrainConfig())
    # base 4e-3 at batch 2048: 4e-3 * sqrt(2); 12.5k warm-up; teacher temp 0.04 -> 0.07 over 37.5k.
    assert schedules.lr(12_500) == pytest.approx(4e-3 * math.sqrt(2))
    assert schedules.lr(125_000) == pytest.approx(1e-6)
    assert schedules.teacher_temp(37_500) == 0.07
    assert schedules.last_layer_lr(1_249) == 0.0 and schedules.last_layer_lr(1_250) > 0.0
    assert set(schedules.at(0)) == {"lr", "last_layer_lr", "weight_decay", "teacher_momentum", "teacher_temp"}


def test_negative_iteration_is_rejected():
    with pytest.raises(ValueError, match="iteration"):
        Schedules(_config()).lr(-1)
