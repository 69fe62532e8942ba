"""Pruning schedules: plain functions from a step to the level kept after it.

A *level* is the fraction kept of whatever the target measures (filters for a density target,
prunable weights for a sparsity target, MACs for a MAC budget), starting from 1.0. Every
schedule has the signature ``schedule(step, steps, final) -> level`` for ``step = 1 .. steps``
and reaches ``final`` exactly at the last step.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

from ..errors import ConfigError, UnknownNameError

Schedule = Callable[[int, int, float], float]


def linear(step: int, steps: int, final: float) -> float:
    """Equal amounts per step: the paper's iterative schedule (e.g. 19 steps of 5% of filters
    to reach 5% density) is ``linear`` with ``steps=19, final=0.05``."""
    return 1.0 - (1.0 - final) * step / steps


def geometric(step: int, steps: int, final: float) -> float:
    """The same fraction of what is left removed at every step."""
    return final ** (step / steps)


def cubic(step: int, steps: int, final: float) -> float:
    """Fast first, slow last (Zhu & Gupta 2017; Sanh et al. 2020): 1 - (1 - final)(1 - (1 - t)^3)."""
    t = step / steps
    return 1.0 - (1.0 - final) * (1.0 - (1.0 - t) ** 3)


def one_shot(step: int, steps: int, final: float) -> float:
    """Everything at the first step."""
    return final


SCHEDULES: dict[str, Schedule] = {
    "linear": linear,
    "iterative": linear,
    "geometric": geometric,
    "cubic": cubic,
    "one-shot": one_shot,
}


def get_schedule(schedule: str | Schedule) -> Schedule:
    if callable(schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise UnknownNameError("schedule", schedule, SCHEDULES)
    return SCHEDULES[schedule]


def steps_for(amount: float, final: float) -> int:
    """Steps of ``amount`` (fraction of the original) needed to go from 1.0 down to ``final``:
    ``steps_for(0.05, 0.05) == 19`` (the paper's 19 steps of 5%)."""
    if not 0 < amount <= 1:
        raise ConfigError(f"amount per step must be in (0, 1], got {amount!r}")
    return max(1, round((1.0 - final) / amount))


def _level(fn: Schedule, schedule, step: int, steps: int, final: float) -> float:
    """``fn(step, steps, final)``, checked to be a number in [0, 1] (a NaN level would compare
    false with every measured level and prune to the floors)."""
    value = fn(step, steps, final)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= 1
    if not ok:
        raise ConfigError(
            f"schedule {schedule!r} must return a level in [0, 1] (the fraction kept), got "
            f"{value!r} at step {step} of {steps}"
        )
    return float(value)


class Levels(Sequence):
    """The level after each of ``steps`` steps, computed when read: a schedule of a billion
    steps costs nothing up front. Checked to be in [0, 1], non-increasing and to end at
    ``final`` (every level at once for up to 10,000 steps, else the first and last ones, and
    each later one when it is read)."""

    EAGER = 10_000

    def __init__(self, schedule: str | Schedule, steps: int, final: float):
        self.fn, self.schedule = get_schedule(schedule), schedule
        self.steps, self.final = steps, final
        for k in range(steps) if steps <= self.EAGER else (0, steps - 2, steps - 1):
            self[k]

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.steps))]
        i = i + self.steps if i < 0 else i
        if not 0 <= i < self.steps:
            raise IndexError(f"step {i} of {self.steps}")
        k = i + 1
        level = _level(self.fn, self.schedule, k, self.steps, self.final)
        before = 1.0 if k == 1 else _level(self.fn, self.schedule, k - 1, self.steps, self.final)
        if level > before + 1e-12 or (k == self.steps and abs(level - self.final) > 1e-9):
            raise ConfigError(
                f"schedule {self.schedule!r} must decrease monotonically to {self.final}"
            )
        return level


def levels(schedule: str | Schedule, steps: int, final: float) -> list[float]:
    """The level after each of ``steps`` steps; checked to be non-increasing and end at final."""
    return list(Levels(schedule, steps, final))


def level_at(
    step: int,
    total_steps: int,
    final: float,
    schedule: str | Schedule = "cubic",
    warmup: int = 0,
    cooldown: int = 0,
) -> float:
    """The level after training step ``step`` (1-based) of ``total_steps``, with the initial and
    final warm-up of Sanh et al. (2020): 1.0 for the first ``warmup`` steps, ``final`` from step
    ``total_steps - cooldown`` on, and ``schedule(step - warmup, N, final)`` in between, where
    ``N = total_steps - warmup - cooldown`` (with ``cubic``, their Eq. for the sparsity
    ``s_f + (s_i - s_f)(1 - t / N)^3`` read as kept fraction)."""
    if not (0 <= warmup and 0 <= cooldown and warmup + cooldown < total_steps):
        raise ConfigError(
            f"need 0 <= warmup, 0 <= cooldown and warmup + cooldown < total_steps, got "
            f"warmup={warmup}, cooldown={cooldown}, total_steps={total_steps}"
        )
    span = total_steps - warmup - cooldown
    if step <= warmup:
        return 1.0
    if step >= warmup + span:
        return float(final)
    return _level(get_schedule(schedule), schedule, step - warmup, span, final)
