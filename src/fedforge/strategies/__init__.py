"""How client updates become the next global model."""

from __future__ import annotations

import dataclasses

from .._imports import is_reference, load_object
from .._options import did_you_mean
from ..errors import ConfigError
from ..reductions import PartialSum, RunningMean, combine_updates, weighted_mean_delta
from .adaptive import FedAdagrad, FedAdam, FedYogi, adaptive
from .base import NO_PLAN, LinearStrategy, RunInfo, ServerState, Strategy, StrategyBase, client_algorithm
from .fedavg import FedAvg, FedAvgM, FedProx, fedavg, fedavgm
from .feddyn import FedDyn, feddyn
from .fednova import FedNova, fednova
from .qfedavg import QFedAvg, qfedavg
from .robust import Krum, Median, MultiKrum, TrimmedMean, krum_scores, median, multikrum_select, trimmed_mean
from .scaffold import Scaffold, scaffold
from .state import Controls, Dynamic, Moments, Momentum, StrategyState

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
        FedDyn,
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
    """The strategy called `name`, built from `options`, hyperparameters it declares; one it
    does not is a ConfigError naming the close one (`mu` -> `proximal_mu`). `name` is a built-in's,
    or `package.module:object` names the user's own: a strategy class (built from `options`), a
    strategy, or a function of no arguments returning one.
    Facts of the run (N, the clients' learning rate) are not options: `init` takes them (RunInfo).

    An option given as None takes the strategy's own default (e.g. server_lr).
    """
    found = _strategy_source(name)
    takes = _declared(found)
    for key in options:
        if key not in takes:
            raise ConfigError(f"strategy {name!r} has no option {key!r}{did_you_mean(key, takes)}")
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(found, type):
        try:
            found = found(**given)
        except TypeError as e:
            raise ConfigError(f"strategy {name!r}: {e}") from None
    elif callable(found) and not _is_strategy(found):  # the user's factory
        try:
            found = found()
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"strategy {name!r} failed: {type(e).__name__}: {e}") from None
    if not _is_strategy(found):
        raise ConfigError(f"strategy {name!r} is a {type(found).__name__}, not a strategy (init, plan, aggregate)")
    return found


def strategy_options(name: str) -> frozenset[str]:
    """The options strategy `name` (a built-in's, or package.module:object) declares."""
    return _declared(_strategy_source(name))


def _strategy_source(name: str):
    """The built-in strategy class called `name`, or what `package.module:object` names."""
    if is_reference(name):
        return load_object(name, "strategy")
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r} (choose from: {', '.join(STRATEGIES)}, or package.module:object)")
    return STRATEGIES[name]


def _declared(found) -> frozenset[str]:
    """The dataclass fields of a strategy class (none for an instance or a factory)."""
    if isinstance(found, type) and dataclasses.is_dataclass(found):
        return frozenset(f.name for f in dataclasses.fields(found))
    return frozenset()


def _is_strategy(found) -> bool:
    return not isinstance(found, type) and all(callable(getattr(found, m, None)) for m in ("init", "plan", "aggregate"))


__all__ = [
    "LINEAR_STRATEGIES",
    "NO_PLAN",
    "STRATEGIES",
    "Controls",
    "Dynamic",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedDyn",
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
    "client_algorithm",
    "combine_updates",
    "fedavg",
    "fedavgm",
    "feddyn",
    "fednova",
    "krum_scores",
    "make_strategy",
    "median",
    "multikrum_select",
    "qfedavg",
    "scaffold",
    "strategy_options",
    "trimmed_mean",
    "weighted_mean_delta",
]
