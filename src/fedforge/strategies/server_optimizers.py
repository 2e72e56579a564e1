"""Server optimizers: how the weighted mean of the client deltas moves the global model.

FedAvg (with its server learning rate), FedAvgM, FedAdagrad, FedAdam and FedYogi are one weighted
mean of the deltas followed by one of these rules, as Reddi et al. (2021, "Adaptive Federated
Optimization") frame them: the mean delta is the negative of a pseudo-gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..client import State
from ..reductions import Update, weighted_mean_delta
from .base import ServerState, step_params
from .state import Moments, Momentum, StrategyState

# A rule: (mean delta, the optimizer's state in ServerState.strategy_state) -> (step, its next state).
Rule = Callable[[State, StrategyState | None], tuple[State, StrategyState | None]]
ADAPTIVE_RULES = ("adagrad", "adam", "yogi")


def mean_then_step(state: ServerState, updates: Iterable[Update], rule: Rule, server_lr: float) -> ServerState:
    """w <- w + server_lr * step, the step being `rule` applied to the example-weighted mean
    client delta. Integer buffers take the mean delta as it is. No update: nothing changes."""
    mean, _ = weighted_mean_delta(updates, state.params)
    if mean is None:
        return state.unchanged()
    return step_from_mean(state, mean, rule, server_lr)


def step_from_mean(state: ServerState, mean: State, rule: Rule, server_lr: float) -> ServerState:
    """w <- w + server_lr * `rule`(mean): the server optimizer applied to a mean delta computed
    elsewhere (the privacy stage's noised mean, for one)."""
    step, kept = rule(mean, state.strategy_state)
    return state.next(step_params(state.params, step, server_lr), kept)


def plain(mean: State, kept: StrategyState | None) -> tuple[State, StrategyState | None]:
    """FedAvg: the step is the mean delta."""
    return mean, kept


def momentum(beta: float) -> Rule:
    """FedAvgM (Hsu et al. 2019): v <- beta * v + mean delta; the step is v (v starts at 0,
    `initial_momentum`)."""

    def rule(mean: State, kept: StrategyState | None) -> tuple[State, StrategyState | None]:
        previous = kept.velocity if isinstance(kept, Momentum) else None  # None: a bare ServerState, v = 0
        velocity = {
            k: beta * previous[k] + v if previous is not None else v.clone()
            for k, v in mean.items()
            if v.is_floating_point()
        }
        return {**mean, **velocity}, Momentum(velocity)

    return rule


def adaptive(kind: str, *, beta1: float, beta2: float, tau: float) -> Rule:
    """Algorithm 2 of Reddi et al. with `kind` in ADAPTIVE_RULES, for the float entries:
    m <- beta1 m + (1 - beta1) delta;
    v <- v + delta^2 (adagrad) | beta2 v + (1 - beta2) delta^2 (adam)
       | v - (1 - beta2) delta^2 sign(v - delta^2) (yogi);
    step = m / (sqrt(v) + tau). m and v are the state's `Moments` (see `initial_moments`)."""

    def rule(mean: State, kept: StrategyState | None) -> tuple[State, StrategyState | None]:
        if not isinstance(kept, Moments):
            raise ValueError(f"an adaptive server optimizer needs its moments in the server state, got {kept!r}")
        first, second = kept.m, kept.v
        m, v, step = {}, {}, dict(mean)
        for k in first:
            d = mean[k]
            m[k] = beta1 * first[k] + (1 - beta1) * d
            d2 = d * d
            if kind == "adagrad":
                v[k] = second[k] + d2
            elif kind == "adam":
                v[k] = beta2 * second[k] + (1 - beta2) * d2
            else:
                v[k] = second[k] - (1 - beta2) * d2 * torch.sign(second[k] - d2)
            step[k] = m[k] / (v[k].sqrt() + tau)
        return step, Moments(m, v)

    return rule


def initial_momentum(params: State) -> Momentum:
    """Server momentum's state before round 1: v = 0 for each float entry."""
    return Momentum({k: torch.zeros_like(v) for k, v in params.items() if v.is_floating_point()})


def initial_moments(params: State, tau: float) -> Moments:
    """The adaptive rules' state before round 1: m = 0 and v = tau^2 (the paper's v_{-1})."""
    floats = {k: v for k, v in params.items() if v.is_floating_point()}
    return Moments(
        {k: torch.zeros_like(v) for k, v in floats.items()},
        {k: torch.full_like(v, tau**2) for k, v in floats.items()},
    )
