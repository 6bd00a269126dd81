"""Every scheduled hyper-parameter of DINOv2 as a pure function of the iteration.

Nothing here has state: resuming at iteration ``it`` gives the same values as never having stopped, and a stage
that compresses the schedules (high-resolution adaptation) only changes the config. Formulas, with ``it`` the
number of completed optimiser steps and every schedule holding its final value after its end:

* ``lr``: peak = ``base_lr * sqrt(global_batch_size / 1024)`` (square-root scaling of the DINOv2 reference);
  ``peak * it / W`` for ``it < W = warmup_iterations``, then ``cosine(peak -> min_lr)`` over ``[W, iterations]``.
* ``weight_decay``: ``cosine(weight_decay -> weight_decay_end)`` over ``[0, iterations]``.
* ``teacher_momentum``: ``cosine(momentum_teacher -> momentum_teacher_end)`` over ``[0, iterations]``.
* ``teacher_temp``: linear ``warmup_teacher_temp -> teacher_temp`` over ``[0, warmup_teacher_temp_iterations]``,
  then ``teacher_temp``.
* ``last_layer_lr``: ``lr(it)``, but 0 while ``it < freeze_last_layer_iterations`` (prototypes frozen at first).

where ``cosine(base -> final)`` at step ``t`` of ``T`` is ``final + 0.5 * (base - final) * (1 + cos(pi * t / T))``,
so it starts at ``base`` and reaches ``final`` exactly at ``t = T``.
"""

from __future__ import annotations

import math

from trainer.config import TrainConfig

__all__ = ["Schedules", "cosine"]

REFERENCE_BATCH_SIZE = 1024
"""The batch size at which ``base_lr`` applies unscaled (DINOv2 reference)."""


def cosine(base: float, final: float, step: float, num_steps: float) -> float:
    """Half-cosine from ``base`` (step 0) to ``final`` (step ``num_steps`` and after); ``final`` if num_steps <= 0."""
    if num_steps <= 0 or step >= num_steps:
        return final
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * max(step, 0.0) / num_steps))


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
        """Linear warm-up from 0 to :attr:`peak_lr`, then cosine to ``optim.min_lr`` at ``optim.iterations``."""
        _check_iteration(it)
        warmup = self._optim.warmup_iterations
        if it < warmup:
            return self.peak_lr * it / warmup
        return cosine(self.peak_lr, self._optim.min_lr, it - warmup, self._optim.iterations - warmup)

    def weight_decay(self, it: int) -> float:
        """Cosine from ``optim.weight_decay`` to ``optim.weight_decay_end`` over the stage."""
        _check_iteration(it)
        return cosine(self._optim.weight_decay, self._optim.weight_decay_end, it, self._optim.iterations)

    def teacher_momentum(self, it: int) -> float:
        """EMA momentum of the teacher: cosine from ``optim.momentum_teacher`` to ``optim.momentum_teacher_end``."""
        _check_iteration(it)
        return cosine(self._optim.momentum_teacher, self._optim.momentum_teacher_end, it, self._optim.iterations)

    def teacher_temp(self, it: int) -> float:
        """Linear from ``loss.warmup_teacher_temp`` to ``loss.teacher_temp`` over the warm-up, then constant."""
        _check_iteration(it)
        warmup = self._loss.warmup_teacher_temp_iterations
        if it >= warmup:
            return self._loss.teacher_temp
        start, end = self._loss.warmup_teacher_temp, self._loss.teacher_temp
        return start + (end - start) * it / warmup

    def last_layer_lr(self, it: int) -> float:
        """:meth:`lr`, except 0 for ``it < optim.freeze_last_layer_iterations`` (prototype layer frozen)."""
        _check_iteration(it)
        return 0.0 if it < self._optim.freeze_last_layer_iterations else self.lr(it)

    def at(self, it: int) -> dict[str, float]:
        """All schedules at ``it``, keyed by method name (for logging)."""
        return {
            "lr": self.lr(it),
            "last_layer_lr": self.last_layer_lr(it),
            "weight_decay": self.weight_decay(it),
            "teacher_momentum": self.teacher_momentum(it),
            "teacher_temp": self.teacher_temp(it),
        }
