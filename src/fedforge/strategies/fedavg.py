"""FedAvg and its close relatives: FedAvg with server momentum, and FedProx."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..algorithms import ClientAlgorithm, Proximal
from ..client import State
from ..errors import ConfigError
from ..reductions import Update
from .base import RunInfo, ServerState, StrategyBase, check_server_lr
from .server_optimizers import initial_momentum, mean_then_step, plain, step_from_mean
from .server_optimizers import momentum as server_momentum


def fedavg(state: ServerState, updates: Iterable[Update], *, server_lr: float = 1.0) -> ServerState:
    """FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data"): move the global model by `server_lr` times the example-weighted mean
    client delta.

    With server_lr = 1 this is exactly the weighted mean of the client models. Integer
    buffers always take the full mean delta. A round with no updates leaves the model as it was.
    """
    return mean_then_step(state, updates, plain, server_lr)


def fedavgm(
    state: ServerState, updates: Iterable[Update], *, server_lr: float = 1.0, momentum: float = 0.9
) -> ServerState:
    """FedAvg with server momentum (Hsu et al. 2019, "Measuring the Effects of Non-Identical
    Data Distribution for Federated Visual Classification"):
    v <- momentum * v + mean delta;  w <- w + server_lr * v.
    """
    return mean_then_step(state, updates, server_momentum(momentum), server_lr)


@dataclass(frozen=True)
class FedAvg(StrategyBase):
    """Weighted FedAvg with an optional server learning rate."""

    server_lr: float = 1.0
    name = "fedavg"

    def __post_init__(self):
        check_server_lr(self.server_lr)

    def aggregate(self, state: ServerState, updates: Iterable[Update]) -> ServerState:
        return fedavg(state, updates, server_lr=self.server_lr)

    def apply_mean(self, state: ServerState, mean: State) -> ServerState:
        """The server step from a mean delta aggregated elsewhere (the privacy stage)."""
        return step_from_mean(state, mean, plain, self.server_lr)


@dataclass(frozen=True)
class FedAvgM(StrategyBase):
    """FedAvg with server momentum; momentum 0 and server_lr 1 is FedAvg."""

    server_lr: float = 1.0
    server_momentum: float = 0.9
    name = "fedavgm"

    def __post_init__(self):
        check_server_lr(self.server_lr)
        if not 0 <= self.server_momentum < 1:
            raise ConfigError(f"server_momentum must be in [0, 1), got {self.server_momentum}")

    def init(self, params: State, run: RunInfo) -> ServerState:
        return replace(super().init(params, run), strategy_state=initial_momentum(params))

    def aggregate(self, state: ServerState, updates: Iterable[Update]) -> ServerState:
        return fedavgm(state, updates, server_lr=self.server_lr, momentum=self.server_momentum)

    def apply_mean(self, state: ServerState, mean: State) -> ServerState:
        return step_from_mean(state, mean, server_momentum(self.server_momentum), self.server_lr)


@dataclass(frozen=True)
class FedProx(StrategyBase):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): clients
    minimise loss + mu/2 ||w - w_global||^2; the server averages as FedAvg. mu = 0 is FedAvg."""

    proximal_mu: float = 0.01
    server_lr: float = 1.0
    name = "fedprox"

    def __post_init__(self):
        check_server_lr(self.server_lr)
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal_mu must be >= 0, got {self.proximal_mu}")

    def client_algorithm(self) -> ClientAlgorithm:
        return Proximal(self.proximal_mu)

    def aggregate(self, state: ServerState, updates: Iterable[Update]) -> ServerState:
        return fedavg(state, updates, server_lr=self.server_lr)

    def apply_mean(self, state: ServerState, mean: State) -> ServerState:
        return step_from_mean(state, mean, plain, self.server_lr)
