"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning"), option II: control variates correct each client's drift."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from ..client import ClientPlan, ClientUpdate, State
from ..reductions import RunningMean
from .base import RunInfo, ServerState, StrategyBase, check_server_lr, float_keys, step_params
from .state import Controls


def scaffold(
    state: ServerState, updates: Iterable[ClientUpdate], *, server_lr: float, client_lr: float, num_clients: int
) -> ServerState:
    """Model: w <- w + server_lr * (example-weighted mean delta), as FedAvg.

    Controls: each reporting client i gets c_i+ = c_i - c - delta_i / (K_i * client_lr), with
    K_i its local steps (option II); then c <- c + sum_i (c_i+ - c_i) / num_clients. A client's
    c_i persists across rounds whether or not it is selected (absent means zero).
    """
    controls = _controls(state)
    control = controls.control
    client_controls = dict(controls.client_controls)
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
    return state.next(params, Controls(control, client_controls))


def _controls(state: ServerState) -> Controls:
    if not isinstance(state.strategy_state, Controls):
        raise ValueError(f"SCAFFOLD needs its controls in the server state, got {state.strategy_state!r}")
    return state.strategy_state


@dataclass(frozen=True)
class Scaffold(StrategyBase):
    """SCAFFOLD. N (for the server control's update) and the clients' learning rate (for the
    controls' scale) are the run's facts (RunInfo), given to `init`."""

    server_lr: float = 1.0
    name = "scaffold"
    needs_each_update = "SCAFFOLD needs each client's control variate"

    def __post_init__(self):
        check_server_lr(self.server_lr)

    def init(self, params: State, run: RunInfo) -> ServerState:
        state = super().init(params, run)
        control = {k: torch.zeros_like(state.params[k]) for k in float_keys(state.params)}
        return replace(state, strategy_state=Controls(control))

    def plan(self, state: ServerState, client_id: int) -> ClientPlan:
        controls = _controls(state)
        control, mine = controls.control, controls.client_controls.get(client_id)
        correction = {k: control[k] - mine[k] for k in control} if mine else dict(control)
        return ClientPlan(correction=correction)

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        run = state.run_info(self.name)
        return scaffold(state, updates, server_lr=self.server_lr, client_lr=run.client_lr, num_clients=run.num_clients)
