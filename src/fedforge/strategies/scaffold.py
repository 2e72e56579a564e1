"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning"), option II: control variates correct each client's drift."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..client import ClientPlan, ClientUpdate, State
from ..errors import ConfigError
from .base import RunningMean, ServerState, StrategyBase, check_server_lr, float_keys, step_params


def scaffold(
    state: ServerState, updates: Iterable[ClientUpdate], *, server_lr: float, client_lr: float, num_clients: int
) -> ServerState:
    """Model: w <- w + server_lr * (example-weighted mean delta), as FedAvg.

    Controls: each reporting client i gets c_i+ = c_i - c - delta_i / (K_i * client_lr), with
    K_i its local steps (option II); then c <- c + sum_i (c_i+ - c_i) / num_clients. A client's
    c_i persists across rounds whether or not it is selected (absent means zero).
    """
    control: State = state.extras["control"]
    client_controls: dict[int, State] = dict(state.extras["client_controls"])
    model_mean = RunningMean()
    control_change = {k: torch.zeros_like(v) for k, v in control.items()}
    for update in updates:
        model_mean.add(update.delta, float(update.num_examples))
        old = client_controls.get(update.client_id)
        scale = 1.0 / (update.num_steps * client_lr)
        new = {k: (old[k] if old else 0) - control[k] - scale * update.delta[k] for k in control}
        for k in control:
            control_change[k] += new[k] - (old[k] if old else 0)
        client_controls[update.client_id] = new
    if model_mean.count == 0:
        return state.unchanged()
    params = step_params(state.params, model_mean.mean(state.params), server_lr)
    control = {k: control[k] + control_change[k] / num_clients for k in control}
    return ServerState(params, state.round + 1, {"control": control, "client_controls": client_controls})


@dataclass(frozen=True)
class Scaffold(StrategyBase):
    """SCAFFOLD. `num_clients` (N, for the server control's update) and `client_lr` (for the
    controls' scale) are the run's; the simulation fills them in."""

    num_clients: int = 1
    client_lr: float = 0.01
    server_lr: float = 1.0
    name = "scaffold"

    def __post_init__(self):
        check_server_lr(self.server_lr)
        if self.num_clients < 1 or not self.client_lr > 0:
            raise ConfigError("scaffold needs num_clients >= 1 and client_lr > 0")

    def init(self, params: State) -> ServerState:
        state = super().init(params)
        control = {k: torch.zeros_like(state.params[k]) for k in float_keys(state.params)}
        return ServerState(state.params, 0, {"control": control, "client_controls": {}})

    def plan(self, state: ServerState, client_id: int) -> ClientPlan:
        control = state.extras["control"]
        mine = state.extras["client_controls"].get(client_id)
        correction = {k: control[k] - mine[k] for k in control} if mine else dict(control)
        return ClientPlan(correction=correction)

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        return scaffold(state, updates, server_lr=self.server_lr, client_lr=self.client_lr,
                        num_clients=self.num_clients)
