"""The run's strategy and its hyperparameters, as settings."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import tomli_w

from .._options import option
from ..errors import ConfigError
from . import STRATEGIES, Strategy, make_strategy, strategy_options


@dataclass(frozen=True)
class StrategySettings:
    """The strategy and its options (TOML: flat keys, or the table [strategy] with `name`).
    Each strategy takes the options it declares; the others are left at their defaults. A
    strategy of one's own gets the options it declares from `strategy_option` (TOML: its keys
    in [strategy]; flags: --strategy-option KEY=VALUE)."""

    strategy: str = option(
        "fedavg",
        "server strategy: a built-in, or package.module:object, a strategy of your own (a class, "
        "built with the options below that it declares, an instance, or a function returning one)",
        STRATEGIES,
        open_choices=True,
    )
    server_lr: float | None = option(
        None, "server learning rate (default: the strategy's: 1.0, or 0.01 for fedadagrad, fedadam and fedyogi)"
    )
    server_momentum: float = option(0.9, "fedavgm: server momentum")
    beta1: float = option(0.9, "fedadagrad/fedadam/fedyogi: first-moment decay")
    beta2: float = option(0.99, "fedadam/fedyogi: second-moment decay")
    tau: float = option(1e-3, "fedadagrad/fedadam/fedyogi: adaptivity")
    proximal_mu: float = option(0.01, "fedprox: proximal term mu")
    feddyn_alpha: float = option(0.01, "feddyn: the dynamic regularizer's alpha")
    q: float = option(1.0, "qfedavg: fairness q (0 is FedAvg)")
    trim_beta: float = option(0.1, "trimmed_mean: share trimmed at each end")
    krum_f: int = option(1, "krum/multikrum: number of Byzantine clients tolerated")
    multikrum_m: int = option(0, "multikrum: updates averaged (0: clients per round - krum_f)")
    strategy_option: tuple[str, ...] = option(
        (),
        "an option of a strategy of your own, KEY=VALUE (VALUE in TOML: 0.25, true, 'text'; repeatable; "
        "in a config file: KEY = VALUE in [strategy])",
        metavar="KEY=VALUE",
    )

    def __post_init__(self):
        self.strategy_object()  # a known strategy (or the user's, importable) with valid options

    def strategy_object(self) -> Strategy:
        """The strategy, built from the options here that it declares (server_lr, q, trim_beta, ...)."""
        takes = strategy_options(self.strategy)
        options = {name: getattr(self, name) for name in OPTIONS if name in takes}
        for key, value in own_options(self.strategy_option).items():
            if key in OPTIONS or key == "strategy":
                raise ConfigError(f"strategy_option {key}: give it as its own setting, {key} = ...")
            options[key] = value
        return make_strategy(self.strategy, **options)


# The options of the built-in strategies that are settings of their own (server_lr, proximal_mu, ...).
OPTIONS = tuple(f.name for f in dataclasses.fields(StrategySettings) if f.name not in ("strategy", "strategy_option"))


def own_options(entries: Iterable[str]) -> dict[str, Any]:
    """The KEY=VALUE entries of strategy_option as a dict, each VALUE read as TOML (0.25, true,
    'text'); one that is not TOML is the text itself."""
    options: dict[str, Any] = {}
    for entry in entries:
        key, sep, text = entry.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"strategy_option must be KEY=VALUE, got {entry!r}")
        try:
            options[key] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            options[key] = text.strip()
    return options


def option_entry(key: str, value: Any) -> str:
    """`key = value` of a config file's [strategy] as a strategy_option entry, KEY=VALUE."""
    return f"{key}={tomli_w.dumps({'v': value}).partition('=')[2].strip()}"


def check_given(keys: Iterable[str], strategy: str) -> None:
    """A ConfigError for a built-in strategy's option given (in a file or a flag) for a strategy
    that does not take it: `proximal_mu` for fedavg would be dropped without a word."""
    takes = strategy_options(strategy)
    for key in keys:
        if key in OPTIONS and key not in takes:
            owners = [name for name in STRATEGIES if key in strategy_options(name)]
            raise ConfigError(f"{key} is an option of {', '.join(owners)}, not of {strategy}")
