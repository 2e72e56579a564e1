"""q-FedAvg (Li et al. 2020, "Fair Resource Allocation in Federated Learning"): clients with
a higher loss weigh more, with fairness parameter q."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..client import ClientPlan, ClientUpdate
from ..errors import ConfigError
from ..reductions import RunningMean
from .base import ServerState, StrategyBase, step_params

_PLAN = ClientPlan(measure_initial_loss=True)


def qfedavg(state: ServerState, updates: Iterable[ClientUpdate], *, q: float, lipschitz: float) -> ServerState:
    """With F_k the global model's loss on client k, dw_k = L (w - w_k) = -L delta_k and p_k
    = n_k / n over the reporting clients:
    w <- w - sum_k p_k F_k^q dw_k / sum_k p_k (q F_k^(q-1) ||dw_k||^2 + L F_k^q).

    The paper samples clients with probability p_k and averages uniformly; weighting by p_k
    under uniform sampling has the same expectation, and makes q = 0 exactly FedAvg.
    Integer buffers take the plain weighted mean.
    """
    numerator, plain = RunningMean(), RunningMean()
    denominator = 0.0
    L = lipschitz
    for update in updates:
        if update.initial_loss is None:
            raise ValueError("q-FedAvg needs each client's initial loss (ClientPlan.measure_initial_loss)")
        F = max(update.initial_loss, 1e-10)
        floats = {k: v for k, v in update.delta.items() if v.is_floating_point()}
        norm2 = sum(float((L * v).pow(2).sum()) for v in floats.values())
        numerator.add(
            {k: F**q * L * v if v.is_floating_point() else v for k, v in update.delta.items()},
            float(update.num_examples),
        )
        plain.add(update.delta, float(update.num_examples))
        denominator += update.num_examples * (q * F ** (q - 1) * norm2 + L * F**q)
    if numerator.count == 0:
        return state.unchanged()
    # numerator.mean() = sum p_k F^q L delta_k (the sign of dw folded in); same weights on both sides
    scale = numerator.total_weight / denominator
    pulled, buffers = numerator.mean(state.params), plain.mean(state.params)
    step = {k: scale * v if v.is_floating_point() else buffers[k] for k, v in pulled.items()}
    return state.next(step_params(state.params, step))


@dataclass(frozen=True)
class QFedAvg(StrategyBase):
    """q-FedAvg; L = 1 / the clients' learning rate (RunInfo.client_lr), as in the paper."""

    q: float = 1.0
    name = "qfedavg"
    needs_each_update = "q-FedAvg weights each update by its client's loss"

    def __post_init__(self):
        if self.q < 0:
            raise ConfigError(f"q must be >= 0, got {self.q}")

    def plan(self, state: ServerState, client_id: int) -> ClientPlan:
        return _PLAN

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        return qfedavg(state, updates, q=self.q, lipschitz=1.0 / state.run_info(self.name).client_lr)
