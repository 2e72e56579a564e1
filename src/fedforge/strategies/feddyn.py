"""FedDyn (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization")."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from ..algorithms import ClientAlgorithm, FedDynClient
from ..client import ClientUpdate, State
from ..errors import ConfigError
from ..reductions import RunningMean
from .base import RunInfo, ServerState, StrategyBase, float_keys, step_params
from .state import Dynamic


def feddyn(state: ServerState, updates: Iterable[ClientUpdate], *, alpha: float, num_clients: int) -> ServerState:
    """The server's step (the paper's Algorithm 1): h <- h - alpha / m * sum_i delta_i over the
    round's clients (m: all clients of the run), then w <- mean_i w_i - h / alpha, the mean of the
    clients' models unweighted, as the paper has it."""
    h = _h(state)
    mean = RunningMean()
    total = {k: torch.zeros_like(v) for k, v in h.items()}
    for update in updates:
        mean.add(update.delta, 1.0)
        for k in h:
            total[k] += update.delta[k]
    if mean.count == 0:
        return state.unchanged()
    h = {k: h[k] - alpha / num_clients * total[k] for k in h}
    params = step_params(state.params, mean.mean(state.params))
    params = {k: v - h[k] / alpha if k in h else v for k, v in params.items()}
    return state.next(params, Dynamic(h))


def _h(state: ServerState) -> State:
    if not isinstance(state.strategy_state, Dynamic):
        raise ValueError(f"FedDyn needs its h in the server state, got {state.strategy_state!r}")
    return state.strategy_state.h


@dataclass(frozen=True)
class FedDyn(StrategyBase):
    """FedDyn: each client minimises loss - <g_i, w> + alpha/2 ||w - w_global||^2 and keeps its
    g_i (`algorithms.FedDynClient`); the server keeps h and corrects the mean model by it. The paper
    tries alpha (`feddyn_alpha`) in {0.1, 0.01, 0.001}."""

    feddyn_alpha: float = 0.01
    name = "feddyn"
    needs_each_update = "FedDyn averages the clients' models unweighted, not by their examples"

    def __post_init__(self):
        if not (self.feddyn_alpha > 0 and math.isfinite(self.feddyn_alpha)):
            raise ConfigError(f"feddyn_alpha must be > 0, got {self.feddyn_alpha}")

    def client_algorithm(self) -> ClientAlgorithm:
        return FedDynClient(self.feddyn_alpha)

    def init(self, params: State, run: RunInfo) -> ServerState:
        state = super().init(params, run)
        h = {k: torch.zeros_like(state.params[k]) for k in float_keys(params)}
        return replace(state, strategy_state=Dynamic(h))

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        return feddyn(state, updates, alpha=self.feddyn_alpha, num_clients=state.run_info(self.name).num_clients)
