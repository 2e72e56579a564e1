"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): the example-weighted mean of the clients' models."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..client import ClientUpdate, State
from ..errors import ConfigError
from .base import ServerState, weighted_mean_delta


def fedavg(state: ServerState, updates: Iterable[ClientUpdate], *, server_lr: float = 1.0) -> ServerState:
    """Move the global model by `server_lr` times the example-weighted mean client delta.

    With server_lr = 1 this is exactly the weighted mean of the client models. Integer
    buffers always take the full mean delta. A round with no updates leaves the model as it was.
    """
    mean, _ = weighted_mean_delta(updates, state.params)
    if mean is None:
        return ServerState(state.params, state.round + 1, state.extras)
    params = {
        k: v + server_lr * mean[k] if v.is_floating_point() else v + mean[k]
        for k, v in state.params.items()
    }
    return ServerState(params, state.round + 1, state.extras)


@dataclass(frozen=True)
class FedAvg:
    """Weighted FedAvg with an optional server learning rate."""

    server_lr: float = 1.0
    name = "fedavg"

    def __post_init__(self):
        if not self.server_lr > 0:
            raise ConfigError(f"server_lr must be > 0, got {self.server_lr}")

    def init(self, params: State) -> ServerState:
        return ServerState({k: v.detach().clone() for k, v in params.items()})

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        return fedavg(state, updates, server_lr=self.server_lr)
