"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning"), option II: control variates correct each client's drift."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from ..algorithms import ClientAlgorithm, ScaffoldClient
from ..client import ClientPlan, ClientUpdate, State
from ..reductions import RunningMean
from .base import RunInfo, ServerState, StrategyBase, check_server_lr, float_keys, step_params
from .state import Controls


def scaffold(state: ServerState, updates: Iterable[ClientUpdate], *, server_lr: float, num_clients: int) -> ServerState:
    """Model: w <- w + server_lr * (example-weighted mean delta), as FedAvg.

    Control: c <- c + sum_i (c_i+ - c_i) / num_clients, from the change each reporting client sends
    (its `extras`, `ScaffoldClient`): the clients keep their c_i, whether or not they are selected.
    """
    control = _controls(state).control
    model_mean = RunningMean()
    control_change = {k: torch.zeros_like(v) for k, v in control.items()}
    for update in updates:
        model_mean.add(update.delta, float(update.num_examples))
        for k in control:
            control_change[k] += update.extras[k]
    if model_mean.count == 0:
        return state.unchanged()
    params = step_params(state.params, model_mean.mean(state.params), server_lr)
    control = {k: control[k] + control_change[k] / num_clients for k in control}
    return state.next(params, Controls(control))


def _controls(state: ServerState) -> Controls:
    if not isinstance(state.strategy_state, Controls):
        raise ValueError(f"SCAFFOLD needs its controls in the server state, got {state.strategy_state!r}")
    return state.strategy_state


@dataclass(frozen=True)
class Scaffold(StrategyBase):
    """SCAFFOLD: the server sends each client its control c (`ClientPlan.inputs`); the clients'
    side is `algorithms.ScaffoldClient`. N (for the server control's update) is a fact of the run
    (RunInfo), given to `init`."""

    server_lr: float = 1.0
    name = "scaffold"
    needs_each_update = "SCAFFOLD needs each client's control variate"

    def __post_init__(self):
        check_server_lr(self.server_lr)

    def client_algorithm(self) -> ClientAlgorithm:
        return ScaffoldClient()

    def init(self, params: State, run: RunInfo) -> ServerState:
        state = super().init(params, run)
        control = {k: torch.zeros_like(state.params[k]) for k in float_keys(state.params)}
        return replace(state, strategy_state=Controls(control))

    def plan(self, state: ServerState, client_id: int) -> ClientPlan:
        return ClientPlan(inputs=_controls(state).control)

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        run = state.run_info(self.name)
        return scaffold(state, updates, server_lr=self.server_lr, num_clients=run.num_clients)
