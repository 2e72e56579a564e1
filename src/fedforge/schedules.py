"""Learning-rate schedules: the clients' learning rate as a function of the round.

A schedule is a small frozen dataclass, called as `schedule(round, rounds, lr)` with the round
(counted from 1), the run's number of rounds and the base learning rate (the run's `lr`); it
returns that round's learning rate. `schedule.round_config` is it as a round configuration
(`simulate(round_config=...)`): the round's ClientConfig with its lr.

On the command line and in TOML a schedule is text, `NAME` or `NAME:KEY=VALUE,...`
(`--lr-schedule cosine:warmup=5,min_lr=0.001`), read by `parse_schedule`. Every value is
checked when the schedule is made, and against the run (its lr and rounds) by `check`.

The formulas are torch.optim.lr_scheduler's, stepped once per round (round r is its epoch r - 1):

- constant: lr.
- step: lr * gamma ** ((r - 1) // step_size), as StepLR.
- exponential: lr * gamma ** (r - 1), as ExponentialLR.
- cosine: rounds 1..warmup rise linearly, lr * r / warmup (LinearLR from lr / warmup to lr);
  the T = rounds - warmup rounds after follow the cosine of SGDR (Loshchilov and Hutter 2017,
  without restarts), as CosineAnnealingLR(T_max=T, eta_min=min_lr): with t = r - warmup - 1,
  min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2. Together that is torch's
  SequentialLR([LinearLR(start_factor=1/warmup, total_iters=warmup-1), CosineAnnealingLR(T, min_lr)],
  milestones=[warmup]); the last round's lr stays above min_lr (t < T), so min_lr may be 0.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ._options import did_you_mean
from .contract import ClientConfig
from .errors import ConfigError

# A round configuration: the round's ClientConfig from the round (counted from 1) and the run's
# base config (its `round` and `rounds` already set), as `simulate(round_config=...)` takes it.
RoundConfig = Callable[[int, ClientConfig], ClientConfig]


class Schedule(ABC):
    """A learning-rate schedule: `schedule(round, rounds, lr)` is round `round`'s lr (of `rounds`)."""

    name: ClassVar[str]
    uses_rounds: ClassVar[bool] = False  # its values depend on the run's number of rounds

    @abstractmethod
    def rate(self, round: int, rounds: int, lr: float) -> float:
        """The formula, for arguments already checked."""

    def __call__(self, round: int, rounds: int, lr: float) -> float:
        if not 1 <= round <= rounds:
            raise ConfigError(f"lr_schedule {self.name}: round {round} is not one of the run's 1 to {rounds}")
        self.check(lr, rounds)
        return self.rate(round, rounds, lr)

    def check(self, lr: float, rounds: int | None = None) -> None:
        """A ConfigError unless the schedule suits a run of base lr `lr` (and of `rounds` rounds, when given)."""
        if rounds is not None and not self.rate(rounds, rounds, lr) > 0:
            raise ConfigError(f"lr_schedule {self.name}: the lr reaches 0 by round {rounds} (gamma is too small)")

    def round_config(self, round: int, config: ClientConfig) -> ClientConfig:
        """The round's ClientConfig: `config` (the run's, its `rounds` set) with the round's lr."""
        return dataclasses.replace(config, lr=self(round, config.rounds, config.lr))


@dataclass(frozen=True)
class Constant(Schedule):
    """The same lr every round."""

    name: ClassVar[str] = "constant"

    def rate(self, round: int, rounds: int, lr: float) -> float:
        return lr


@dataclass(frozen=True)
class Step(Schedule):
    """lr * gamma ** ((round - 1) // step_size): the lr multiplied by gamma every step_size rounds (StepLR)."""

    name: ClassVar[str] = "step"
    step_size: int = 10
    gamma: float = 0.1

    def __post_init__(self):
        _check_int(self, "step_size", low=1)
        _check_gamma(self)

    def rate(self, round: int, rounds: int, lr: float) -> float:
        return lr * self.gamma ** ((round - 1) // self.step_size)


@dataclass(frozen=True)
class Exponential(Schedule):
    """lr * gamma ** (round - 1): the lr multiplied by gamma every round (ExponentialLR)."""

    name: ClassVar[str] = "exponential"
    gamma: float = 0.95

    def __post_init__(self):
        _check_gamma(self)

    def rate(self, round: int, rounds: int, lr: float) -> float:
        return lr * self.gamma ** (round - 1)


@dataclass(frozen=True)
class Cosine(Schedule):
    """`warmup` rounds of linear warm-up to lr, then cosine decay towards min_lr over the
    remaining rounds (SGDR without restarts, Loshchilov and Hutter 2017; see the module's
    docstring for the formula)."""

    name: ClassVar[str] = "cosine"
    uses_rounds: ClassVar[bool] = True
    warmup: int = 0
    min_lr: float = 0.0

    def __post_init__(self):
        _check_int(self, "warmup", low=0)
        if not (type(self.min_lr) in (int, float) and 0 <= self.min_lr < math.inf):
            raise ConfigError(f"lr_schedule cosine: min_lr must be a number >= 0, got {self.min_lr!r}")

    def check(self, lr: float, rounds: int | None = None) -> None:
        if self.min_lr > lr:
            raise ConfigError(f"lr_schedule cosine: min_lr must be in [0, lr={lr}], got {self.min_lr}")
        if rounds is not None and self.warmup >= rounds:
            raise ConfigError(f"lr_schedule cosine: warmup must be < rounds={rounds}, got {self.warmup}")
        super().check(lr, rounds)

    def rate(self, round: int, rounds: int, lr: float) -> float:
        if round <= self.warmup:
            return lr * round / self.warmup
        t, period = round - self.warmup - 1, rounds - self.warmup
        return self.min_lr + (lr - self.min_lr) * (1 + math.cos(math.pi * t / period)) / 2


SCHEDULES: dict[str, type[Schedule]] = {s.name: s for s in (Constant, Step, Exponential, Cosine)}


def parse_schedule(text: str) -> Schedule:
    """The schedule `text` names: `NAME` or `NAME:KEY=VALUE,...` (`step:step_size=10,gamma=0.5`).

    Raises:
        ConfigError: an unknown schedule or key, a value that is not a number, or one out of range.
    """
    if not isinstance(text, str) or len(text) > 200:
        shown = f"{text[:40]!r}... ({len(text)} characters)" if isinstance(text, str) else repr(text)
        raise ConfigError(f"lr_schedule must be NAME or NAME:KEY=VALUE,... (at most 200 characters), got {shown}")
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in SCHEDULES:
        raise ConfigError(
            f"unknown lr_schedule {name!r}{did_you_mean(name, SCHEDULES)} (choose from: {', '.join(SCHEDULES)})"
        )
    cls = SCHEDULES[name]
    hints = typing.get_type_hints(cls)
    types = {f.name: hints[f.name] for f in dataclasses.fields(typing.cast(typing.Any, cls))}
    values: dict[str, int | float] = {}
    for entry in filter(None, (e.strip() for e in rest.split(","))):
        key, sep, value = (part.strip() for part in entry.partition("="))
        if not sep:
            raise ConfigError(f"lr_schedule {name}: {entry!r} is not KEY=VALUE")
        if key not in types:
            takes = f"takes {', '.join(types)}" if types else "takes no options"
            raise ConfigError(f"lr_schedule {name}: unknown key {key!r}{did_you_mean(key, types)} ({takes})")
        if key in values:
            raise ConfigError(f"lr_schedule {name}: {key} is given twice")
        values[key] = _number(name, key, value, types[key])
    return cls(**values)


def _number(schedule: str, key: str, text: str, tp: type) -> int | float:
    """`text` as an int or a finite float (`tp`), or a ConfigError naming the key."""
    try:
        value = int(text) if tp is int else float(text)
    except ValueError:
        kind = "an integer" if tp is int else "a number"
        raise ConfigError(f"lr_schedule {schedule}: {key} must be {kind}, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"lr_schedule {schedule}: {key} must be finite, got {text!r}")
    return value


def _check_int(schedule: Schedule, key: str, *, low: int) -> None:
    value = getattr(schedule, key)
    if type(value) is not int or value < low:
        raise ConfigError(f"lr_schedule {schedule.name}: {key} must be an integer >= {low}, got {value!r}")


def _check_gamma(schedule: Step | Exponential) -> None:
    gamma = schedule.gamma
    if not (type(gamma) in (int, float) and 0 < gamma <= 1):
        raise ConfigError(f"lr_schedule {schedule.name}: gamma must be in (0, 1], got {gamma!r}")


__all__ = ["SCHEDULES", "Constant", "Cosine", "Exponential", "RoundConfig", "Schedule", "Step", "parse_schedule"]
