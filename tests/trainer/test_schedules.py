"""Schedules hit the documented values at the documented iterations, and equal the reference's at every iteration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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
    assert schedules.lr(5) == pytest.approx(2e-3 * 5 / 9)  # np.linspace(0, peak, 10): the peak at iteration 9
    assert schedules.lr(9) == schedules.peak_lr
    assert schedules.lr(10) == pytest.approx(2e-3)  # the cosine starts at the peak too
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


def test_teacher_temperature_reaches_final_value_at_the_warmups_last_iteration():
    schedules = Schedules(_config())
    assert schedules.teacher_temp(0) == pytest.approx(0.04)
    assert schedules.teacher_temp(15) == pytest.approx(0.04 + 0.03 * 15 / 29)  # np.linspace(0.04, 0.07, 30)
    assert schedules.teacher_temp(28) < 0.07
    assert schedules.teacher_temp(29) == 0.07
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
    assert schedules.lr(12_499) == schedules.lr(12_500) == pytest.approx(4e-3 * math.sqrt(2))
    assert schedules.lr(125_000) == pytest.approx(1e-6)
    assert schedules.teacher_temp(37_499) == 0.07
    assert schedules.last_layer_lr(1_249) == 0.0 and schedules.last_layer_lr(1_250) > 0.0
    assert set(schedules.at(0)) == {"lr", "last_layer_lr", "weight_decay", "teacher_momentum", "teacher_temp"}


def test_last_layer_lr_after_the_end_is_min_lr_even_if_the_freeze_is_longer():
    schedules = Schedules(_config(freeze_last_layer_iterations=200))
    assert schedules.last_layer_lr(99) == 0.0
    assert schedules.last_layer_lr(100) == schedules.lr(100) == 1e-6  # the reference's final value past the end


def test_one_iteration_warmups_stay_at_their_start():
    schedules = Schedules(_config(warmup_iterations=1))
    assert schedules.lr(0) == 0.0 and schedules.lr(1) == pytest.approx(2e-3)


def test_negative_iteration_is_rejected():
    with pytest.raises(ValueError, match="iteration"):
        Schedules(_config()).lr(-1)


# ---- value for value against the reference's own schedulers ----------------------------------------------------------

SCHEDULE_NAMES = ("lr", "weight_decay", "teacher_momentum", "teacher_temp", "last_layer_lr")


def _reference_schedules(config: TrainConfig, epoch_length: int) -> dict[str, np.ndarray]:
    """The reference's build_schedulers(cfg) (dinov2/train/train.py, its CosineScheduler), over ``0..T+1``."""
    from bench.reference_dinov2 import reference_config, reference_training_code

    with reference_training_code(torch.device("cpu")) as code:
        cfg = reference_config(code, config, epoch_length=epoch_length)
        schedulers = dict(zip(SCHEDULE_NAMES, code.train.build_schedulers(cfg)))
    its = range(config.optim.iterations + 2)  # past the end too: each holds its final value
    return {name: np.array([float(s[it]) for it in its]) for name, s in schedulers.items()}


def _ours(config: TrainConfig) -> dict[str, np.ndarray]:
    schedules = Schedules(config)
    its = range(config.optim.iterations + 2)
    return {name: np.array([getattr(schedules, name)(it) for it in its]) for name in SCHEDULE_NAMES}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(("recipe", "overrides", "epoch_length"), [
    # short: 100 iterations, 10 of lr warm-up, 30 of teacher temperature warm-up, 5 frozen
    ("tiny", {"optim.iterations": 100, "optim.warmup_iterations": 10, "optim.freeze_last_layer_iterations": 5,
              "loss.warmup_teacher_temp": 0.04, "loss.teacher_temp": 0.07,
              "loss.warmup_teacher_temp_iterations": 30}, 1),
    ("tiny", {}, 1),  # the tiny recipe itself: no teacher temperature warm-up, 20 of lr warm-up
    # highres: 10k iterations, 1k warm-up, no temperature warm-up
    ("highres518", {"stage.init_from": "unused", "data.dataset": "synthetic"}, 1),
    ("short_vitl16", {"data.dataset": "synthetic"}, 1250),  # 125k iterations in the reference's own "epochs" of 1,250
    ("long_vitl14", {"data.dataset": "synthetic"}, 1250),  # 625k iterations, 100k warm-up, momentum 0.994, wd -> 0.2
])
def test_schedules_equal_the_reference_schedulers_at_every_iteration(recipe, overrides, epoch_length):
    config = resolve_config(recipe, overrides=overrides)
    ours, theirs = _ours(config), _reference_schedules(config, epoch_length)
    for name in SCHEDULE_NAMES:
        # The same float64 formulas in the same order; numpy's vectorised cos may round the last bit differently
        # from math.cos, hence 1e-15 rather than ==.
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-15, atol=0, err_msg=f"{recipe} {name}")
    if config.optim.warmup_iterations > 1:  # the warm-up peaks one iteration before the cosine starts
        w = config.optim.warmup_iterations
        assert ours["lr"][w - 1] == ours["lr"][w] == Schedules(config).peak_lr
