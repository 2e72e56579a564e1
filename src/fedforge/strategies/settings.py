"""The run's strategy and its hyperparameters, as settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .._options import option
from . import STRATEGIES, Strategy, make_strategy, strategy_options


@dataclass(frozen=True)
class StrategySettings:
    """The strategy and its options (TOML: flat keys, or the table [strategy] with `name`).
    Each strategy takes the options it declares; the others are left at their defaults."""

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
    q: float = option(1.0, "qfedavg: fairness q (0 is FedAvg)")
    trim_beta: float = option(0.1, "trimmed_mean: share trimmed at each end")
    krum_f: int = option(1, "krum/multikrum: number of Byzantine clients tolerated")
    multikrum_m: int = option(0, "multikrum: updates averaged (0: clients per round - krum_f)")

    def __post_init__(self):
        self.strategy_object()  # a known strategy (or the user's, importable) with valid options

    def strategy_object(self) -> Strategy:
        """The strategy, built from the options here that it declares (server_lr, q, trim_beta, ...)."""
        takes = strategy_options(self.strategy)
        options = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(StrategySettings)
            if f.name in takes and f.name != "strategy"
        }
        return make_strategy(self.strategy, **options)
