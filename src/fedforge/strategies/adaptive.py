"""Adaptive server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"):
FedAdagrad, FedAdam and FedYogi apply Adagrad, Adam or Yogi on the server to the mean
client delta, with adaptivity tau."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from ..client import ClientUpdate
from ..errors import ConfigError
from .base import RunInfo, ServerState, StrategyBase, check_server_lr, step_params, weighted_mean_delta

RULES = ("adagrad", "adam", "yogi")


def adaptive(
    state: ServerState, updates: Iterable[ClientUpdate], *, rule: str, server_lr: float, beta1: float = 0.9,
    beta2: float = 0.99, tau: float = 1e-3,
) -> ServerState:
    """One round of Algorithm 2 of Reddi et al. with the server update `rule`.

    delta = weighted mean client delta; m <- beta1 m + (1 - beta1) delta;
    v <- v + delta^2 (adagrad) | beta2 v + (1 - beta2) delta^2 (adam)
       | v - (1 - beta2) delta^2 sign(v - delta^2) (yogi);
    w <- w + server_lr * m / (sqrt(v) + tau). Before round 1, m = 0 and v = tau^2.
    """
    mean, _ = weighted_mean_delta(updates, state.params)
    if mean is None:
        return state.unchanged()
    first, second = state.extras["m"], state.extras["v"]
    m, v, step = {}, {}, dict(mean)
    for k in first:
        d = mean[k]
        m[k] = beta1 * first[k] + (1 - beta1) * d
        d2 = d * d
        if rule == "adagrad":
            v[k] = second[k] + d2
        elif rule == "adam":
            v[k] = beta2 * second[k] + (1 - beta2) * d2
        else:
            v[k] = second[k] - (1 - beta2) * d2 * torch.sign(second[k] - d2)
        step[k] = m[k] / (v[k].sqrt() + tau)
    return state.next(step_params(state.params, step, server_lr), {"m": m, "v": v})


@dataclass(frozen=True)
class _Adaptive(StrategyBase):
    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    rule = "adam"

    def __post_init__(self):
        check_server_lr(self.server_lr)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.tau > 0:
            raise ConfigError(f"tau must be > 0, got {self.tau}")

    def init(self, params, run: RunInfo) -> ServerState:
        state = super().init(params, run)
        floats = {k: v for k, v in state.params.items() if v.is_floating_point()}
        return replace(state, extras={
            "m": {k: torch.zeros_like(v) for k, v in floats.items()},
            "v": {k: torch.full_like(v, self.tau**2) for k, v in floats.items()},
        })

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        return adaptive(state, updates, rule=self.rule, server_lr=self.server_lr, beta1=self.beta1,
                        beta2=self.beta2, tau=self.tau)


@dataclass(frozen=True)
class FedAdagrad(_Adaptive):
    rule = "adagrad"
    name = "fedadagrad"


@dataclass(frozen=True)
class FedAdam(_Adaptive):
    rule = "adam"
    name = "fedadam"


@dataclass(frozen=True)
class FedYogi(_Adaptive):
    rule = "yogi"
    name = "fedyogi"
