"""Adaptive server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"):
FedAdagrad, FedAdam and FedYogi apply Adagrad, Adam or Yogi on the server to the mean
client delta, with adaptivity tau."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..client import State
from ..errors import ConfigError
from ..reductions import Update
from .base import RunInfo, ServerState, StrategyBase, check_server_lr
from .server_optimizers import adaptive as server_rule
from .server_optimizers import initial_moments, mean_then_step, step_from_mean


def adaptive(
    state: ServerState,
    updates: Iterable[Update],
    *,
    rule: str,
    server_lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> ServerState:
    """One round of Algorithm 2 of Reddi et al. with the server update `rule` (see
    `server_optimizers.adaptive`): w <- w + server_lr * m / (sqrt(v) + tau). Before round 1,
    m = 0 and v = tau^2; no bias correction (docs/strategies.md)."""
    return mean_then_step(state, updates, server_rule(rule, beta1=beta1, beta2=beta2, tau=tau), server_lr)


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
        return replace(state, strategy_state=initial_moments(state.params, self.tau))

    def aggregate(self, state: ServerState, updates: Iterable[Update]) -> ServerState:
        return adaptive(
            state, updates, rule=self.rule, server_lr=self.server_lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau
        )

    def apply_mean(self, state: ServerState, mean: State) -> ServerState:
        """The server step from a mean delta aggregated elsewhere (the privacy stage)."""
        return step_from_mean(
            state, mean, server_rule(self.rule, beta1=self.beta1, beta2=self.beta2, tau=self.tau), self.server_lr
        )


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
