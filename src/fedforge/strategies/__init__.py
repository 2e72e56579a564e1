"""How client updates become the next global model."""

from __future__ import annotations

from ..errors import ConfigError
from .adaptive import FedAdagrad, FedAdam, FedYogi, adaptive
from .base import (NO_PLAN, CombinedUpdate, RunInfo, RunningMean, ServerState, Strategy, StrategyBase,
                   combine_updates, weighted_mean_delta)
from .fedavg import FedAvg, FedAvgM, FedProx, fedavg, fedavgm
from .fednova import FedNova, fednova
from .qfedavg import QFedAvg, qfedavg
from .robust import Krum, Median, MultiKrum, TrimmedMean, krum_scores, median, multikrum_select, trimmed_mean
from .scaffold import Scaffold, scaffold

STRATEGIES = {
    cls.name: cls
    for cls in (FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi, FedProx, Scaffold, FedNova, QFedAvg, Median,
                TrimmedMean, Krum, MultiKrum)
}


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
    "NO_PLAN", "STRATEGIES", "CombinedUpdate", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedNova", "FedProx",
    "FedYogi", "Krum", "Median", "MultiKrum", "QFedAvg", "RunInfo", "RunningMean", "Scaffold", "ServerState",
    "Strategy", "StrategyBase", "TrimmedMean", "adaptive", "combine_updates", "fedavg", "fedavgm", "fednova",
    "krum_scores", "make_strategy", "median", "multikrum_select", "qfedavg", "scaffold", "trimmed_mean",
    "weighted_mean_delta",
]
