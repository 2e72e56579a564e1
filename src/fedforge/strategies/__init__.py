"""How client updates become the next global model."""

from __future__ import annotations

from ..errors import ConfigError
from ..reductions import PartialSum, RunningMean, combine_updates, weighted_mean_delta
from .adaptive import FedAdagrad, FedAdam, FedYogi, adaptive
from .base import NO_PLAN, LinearStrategy, RunInfo, ServerState, Strategy, StrategyBase
from .fedavg import FedAvg, FedAvgM, FedProx, fedavg, fedavgm
from .fednova import FedNova, fednova
from .qfedavg import QFedAvg, qfedavg
from .robust import Krum, Median, MultiKrum, TrimmedMean, krum_scores, median, multikrum_select, trimmed_mean
from .scaffold import Scaffold, scaffold
from .state import Controls, Moments, Momentum, StrategyState

STRATEGIES = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedAvgM,
        FedAdagrad,
        FedAdam,
        FedYogi,
        FedProx,
        Scaffold,
        FedNova,
        QFedAvg,
        Median,
        TrimmedMean,
        Krum,
        MultiKrum,
    )
}

# The strategies whose aggregate needs only the updates' weighted mean (`LinearStrategy`).
LINEAR_STRATEGIES = tuple(name for name, cls in STRATEGIES.items() if isinstance(cls(), LinearStrategy))


def check_linear(strategy: Strategy | str, what: str) -> None:
    """A one-line ConfigError unless `strategy` (or the built-in strategy of that name) is a
    `LinearStrategy`: `what` (e.g. "differential privacy") serves only such strategies. The
    reason given is the strategy's own (`StrategyBase.needs_each_update`)."""
    found: Strategy | None
    if isinstance(strategy, str):
        name, cls = strategy, STRATEGIES.get(strategy)  # None: no such built-in
        found = cls() if cls is not None else None
    else:
        name, found = strategy.name, strategy
    if isinstance(found, LinearStrategy):
        return
    reason = (
        found.needs_each_update
        if isinstance(found, StrategyBase)
        else "it does not reduce the updates to one weighted mean (a LinearStrategy, with apply_mean)"
    )
    raise ConfigError(f"{what} cannot serve strategy {name!r}: {reason} (use one of {', '.join(LINEAR_STRATEGIES)})")


def make_strategy(name: str, /, **options) -> Strategy:
    """The strategy called `name`, built from the hyperparameters it accepts (others are ignored).
    Facts of the run (N, the clients' learning rate) are not options: `init` takes them (RunInfo).

    An option given as None takes the strategy's own default (e.g. server_lr).
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r} (choose from: {', '.join(STRATEGIES)})")
    cls = STRATEGIES[name]
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in options.items() if k in fields and v is not None})


__all__ = [
    "LINEAR_STRATEGIES",
    "NO_PLAN",
    "STRATEGIES",
    "Controls",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedNova",
    "FedProx",
    "FedYogi",
    "Krum",
    "LinearStrategy",
    "Median",
    "Moments",
    "Momentum",
    "MultiKrum",
    "PartialSum",
    "QFedAvg",
    "RunInfo",
    "RunningMean",
    "Scaffold",
    "ServerState",
    "Strategy",
    "StrategyBase",
    "StrategyState",
    "TrimmedMean",
    "adaptive",
    "check_linear",
    "combine_updates",
    "fedavg",
    "fedavgm",
    "fednova",
    "krum_scores",
    "make_strategy",
    "median",
    "multikrum_select",
    "qfedavg",
    "scaffold",
    "trimmed_mean",
    "weighted_mean_delta",
]
