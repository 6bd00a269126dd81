"""Every scheduled hyper-parameter of DINOv2 as a pure function of the iteration, equal to the reference's.

Nothing here has state: resuming at iteration ``it`` gives the same values as never having stopped, and a stage
that compresses the schedules (high-resolution adaptation) only changes the config. The values are those of the
reference's ``CosineScheduler`` arrays as its ``build_schedulers`` builds them (dinov2/utils/utils.py,
dinov2/train/train.py), iteration for iteration; tests/trainer/test_schedules.py compares every iteration of a short
schedule and of the long recipe with them. With ``it`` the number of completed optimiser steps, ``T`` =
``optim.iterations``, and every schedule at its final value from its end on:

* ``lr``: peak = ``base_lr * sqrt(global_batch_size / 1024)`` (square-root scaling of the DINOv2 reference);
  ``warmup(0 -> peak)`` over ``W = warmup_iterations``, then ``cosine(peak -> min_lr)`` over the ``T - W`` iterations
  ``[W, T)``; ``min_lr`` from ``T`` on.
* ``weight_decay``: ``cosine(weight_decay -> weight_decay_end)`` over ``[0, T)``.
* ``teacher_momentum``: ``cosine(momentum_teacher -> momentum_teacher_end)`` over ``[0, T)``.
* ``teacher_temp``: ``warmup(warmup_teacher_temp -> teacher_temp)`` over ``warmup_teacher_temp_iterations``, then
  ``teacher_temp``.
* ``last_layer_lr``: ``lr(it)``, but 0 while ``it < freeze_last_layer_iterations`` (prototypes frozen at first) and
  ``it < T`` (past the end the reference returns the final value whatever the freeze).

where ``warmup(start -> end)`` over ``n`` iterations is ``np.linspace(start, end, n)``: ``start + (end - start) *
t / (n - 1)`` at step ``t < n``, so it reaches ``end`` at ``t = n - 1`` (one iteration early, as the reference
does; ``n = 1`` gives ``start``); and ``cosine(base -> final)`` at step ``t`` of ``n`` is
``final + 0.5 * (base - final) * (1 + cos(pi * t / n))``: ``base`` at ``t = 0``, just above ``final`` at
``t = n - 1``, and ``final`` itself only from the schedule's end on.
"""

from __future__ import annotations

import math

from trainer.config import TrainConfig

__all__ = ["Schedules", "cosine", "warmup"]

REFERENCE_BATCH_SIZE = 1024
"""The batch size at which ``base_lr`` applies unscaled (DINOv2 reference)."""


def cosine(base: float, final: float, step: float, num_steps: float) -> float:
    """Half-cosine from ``base`` (step 0) towards ``final`` over ``num_steps`` steps; ``final`` from ``num_steps`` on
    (and if num_steps <= 0)."""
    if num_steps <= 0 or step >= num_steps:
        return final
    # the reference's operation order (float64 throughout), so the values are its values
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * max(step, 0.0) / num_steps))


def warmup(start: float, end: float, step: int, num_steps: int) -> float:
    """``np.linspace(start, end, num_steps)[step]`` for ``0 <= step < num_steps``: linear, reaching ``end`` at
    ``num_steps - 1``."""
    if num_steps <= 1:
        return start
    if step == num_steps - 1:
        return end  # np.linspace sets its last value exactly
    return start + step * ((end - start) / (num_steps - 1))


def _check_iteration(it: int) -> None:
    if it < 0:
        raise ValueError(f"schedule iteration: invalid value {it!r}; allowed: >= 0")


class Schedules:
    """Learning rate, weight decay, teacher momentum and temperature for any iteration of one stage.

    Args:
        config: the stage's resolved config; reads ``optim`` and ``loss``.
    """

    def __init__(self, config: TrainConfig) -> None:
        self._optim = config.optim
        self._loss = config.loss
        self.peak_lr = config.optim.base_lr * math.sqrt(config.optim.global_batch_size / REFERENCE_BATCH_SIZE)
        """Learning rate at the end of the warm-up."""

    def lr(self, it: int) -> float:
        """Linear warm-up from 0 reaching :attr:`peak_lr` at ``warmup_iterations - 1``, then cosine to ``min_lr``."""
        _check_iteration(it)
        warmup_iterations, iterations = self._optim.warmup_iterations, self._optim.iterations
        if it >= iterations:
            return self._optim.min_lr
        if it < warmup_iterations:
            return warmup(0.0, self.peak_lr, it, warmup_iterations)
        return cosine(self.peak_lr, self._optim.min_lr, it - warmup_iterations, iterations - warmup_iterations)

    def weight_decay(self, it: int) -> float:
        """Cosine from ``optim.weight_decay`` to ``optim.weight_decay_end`` over the stage."""
        _check_iteration(it)
        return cosine(self._optim.weight_decay, self._optim.weight_decay_end, it, self._optim.iterations)

    def teacher_momentum(self, it: int) -> float:
        """EMA momentum of the teacher: cosine from ``optim.momentum_teacher`` to ``optim.momentum_teacher_end``."""
        _check_iteration(it)
        return cosine(self._optim.momentum_teacher, self._optim.momentum_teacher_end, it, self._optim.iterations)

    def teacher_temp(self, it: int) -> float:
        """Linear from ``loss.warmup_teacher_temp``, reaching ``loss.teacher_temp`` at the warm-up's last iteration."""
        _check_iteration(it)
        warmup_iterations = self._loss.warmup_teacher_temp_iterations
        if it >= warmup_iterations:
            return self._loss.teacher_temp
        return warmup(self._loss.warmup_teacher_temp, self._loss.teacher_temp, it, warmup_iterations)

    def last_layer_lr(self, it: int) -> float:
        """:meth:`lr`, except 0 for ``it < optim.freeze_last_layer_iterations`` (prototype layer frozen) within the
        stage."""
        _check_iteration(it)
        frozen = it < self._optim.freeze_last_layer_iterations and it < self._optim.iterations
        return 0.0 if frozen else self.lr(it)

    def at(self, it: int) -> dict[str, float]:
        """All schedules at ``it``, keyed by method name (for logging)."""
        return {
            "lr": self.lr(it),
            "last_layer_lr": self.last_layer_lr(it),
            "weight_decay": self.weight_decay(it),
            "teacher_momentum": self.teacher_momentum(it),
            "teacher_temp": self.teacher_temp(it),
        }
