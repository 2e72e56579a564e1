"""How client updates become the next global model."""

from __future__ import annotations

from ..errors import ConfigError
from .base import RunningMean, ServerState, Strategy, weighted_mean_delta
from .fedavg import FedAvg, fedavg

STRATEGIES = {"fedavg": FedAvg}


def make_strategy(name: str, **options) -> Strategy:
    """The strategy called `name`, built with the options it accepts."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r} (choose from: {', '.join(STRATEGIES)})")
    cls = STRATEGIES[name]
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in options.items() if k in fields})


__all__ = ["STRATEGIES", "FedAvg", "RunningMean", "ServerState", "Strategy", "fedavg", "make_strategy", "weighted_mean_delta"]
