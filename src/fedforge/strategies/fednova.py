"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization"): normalized averaging for unequal local work."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..client import ClientUpdate
from ..reductions import RunningMean
from .base import ServerState, StrategyBase, check_server_lr, step_params


def normalizer(steps: int, momentum: float = 0.0) -> float:
    """a_i, the norm of client i's accumulated-gradient coefficients: tau for plain SGD,
    [tau - rho (1 - rho^tau) / (1 - rho)] / (1 - rho) with momentum rho."""
    if not momentum:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


def fednova(
    state: ServerState, updates: Iterable[ClientUpdate], *, momentum: float = 0.0, server_lr: float = 1.0
) -> ServerState:
    """w <- w + server_lr * tau_eff * sum_i p_i delta_i / a_i, with p_i = n_i / n and
    tau_eff = sum_i p_i a_i. Equal local steps give FedAvg. Integer buffers take the plain mean."""
    normalized = RunningMean()
    plain = RunningMean()
    tau_eff = 0.0
    for update in updates:
        a = normalizer(update.num_steps, momentum)
        normalized.add(
            {k: v / a if v.is_floating_point() else v for k, v in update.delta.items()}, float(update.num_examples)
        )
        plain.add(update.delta, float(update.num_examples))
        tau_eff += a * update.num_examples
    if normalized.count == 0:
        return state.unchanged()
    tau_eff /= normalized.total_weight
    direction = normalized.mean(state.params)
    buffers = plain.mean(state.params)
    step = {k: tau_eff * d if d.is_floating_point() else buffers[k] for k, d in direction.items()}
    return state.next(step_params(state.params, step, server_lr))


@dataclass(frozen=True)
class FedNova(StrategyBase):
    """FedNova; the clients' SGD momentum is the run's (RunInfo.client_momentum)."""

    server_lr: float = 1.0
    name = "fednova"
    needs_each_update = "FedNova reweights each update by its client's step count"

    def __post_init__(self):
        check_server_lr(self.server_lr)

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        return fednova(state, updates, momentum=state.run_info(self.name).client_momentum, server_lr=self.server_lr)
