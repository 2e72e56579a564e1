"""Server state, the strategy interface, and the pieces strategies share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from ..client import ClientPlan, ClientUpdate, State
from ..errors import ConfigError


@dataclass(frozen=True)
class RunInfo:
    """Facts of the run that some strategies need, handed to `Strategy.init` explicitly (the
    Python API and the command line give the same ones).

    Attributes:
        num_clients: all clients of the run, N (SCAFFOLD's server control averages over them).
        client_lr: the clients' learning rate (SCAFFOLD's control scale; q-FedAvg's L = 1 / lr).
        client_momentum: the clients' SGD momentum (FedNova's normalizer).
    """

    num_clients: int
    client_lr: float
    client_momentum: float = 0.0

    def __post_init__(self):
        if self.num_clients < 1 or not self.client_lr > 0 or not 0 <= self.client_momentum < 1:
            raise ConfigError(f"run facts out of range: {self}")


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries from one round to the next.

    `params` is the global model's full state (parameters and buffers); `extras` holds a
    strategy's own state by name (momentum, second moments, control variates, ...); `run` the
    facts of the run it was initialised with.
    """

    params: State
    round: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    run: RunInfo | None = None

    def unchanged(self) -> ServerState:
        """The state after a round in which no update arrived: same model, next round."""
        return replace(self, round=self.round + 1)

    def next(self, params: State, extras: dict[str, Any] | None = None) -> ServerState:
        """The state of the next round: new `params`, and new `extras` when given."""
        return ServerState(params, self.round + 1, self.extras if extras is None else extras, self.run)

    def run_info(self, strategy: str) -> RunInfo:
        if self.run is None:
            raise ConfigError(f"{strategy} needs the run's facts: start from strategy.init(params, run=RunInfo(...))")
        return self.run


class Strategy(Protocol):
    name: str

    def init(self, params: State, run: RunInfo) -> ServerState:
        """The server state before round 1 of a run with facts `run`."""

    def plan(self, state: ServerState, client_id: int) -> ClientPlan:
        """What selected client `client_id` is asked to do this round."""

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        """The next state from this round's updates (an iterable, consumed once)."""


NO_PLAN = ClientPlan()


class StrategyBase:
    """`init` that copies the model, and `plan` that asks nothing special."""

    def init(self, params: State, run: RunInfo) -> ServerState:
        return ServerState({k: v.detach().clone() for k, v in params.items()}, run=run)

    def plan(self, state: ServerState, client_id: int) -> ClientPlan:
        return NO_PLAN


def _accumulator_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float64


def cast_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` in `like`'s dtype; integer entries are rounded, not truncated."""
    return value.to(like.dtype) if like.is_floating_point() else value.round().to(like.dtype)


class RunningMean:
    """Weighted mean of state dicts, folded in one at a time.

    # Running sum: the server holds one model-sized buffer, never every client's update.
    Integer entries (e.g. BatchNorm's `num_batches_tracked`) are summed in float64 and
    rounded back to their dtype.
    """

    def __init__(self) -> None:
        self._sum: State | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: State, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"weights must be >= 0, got {weight}")
        if self._sum is None:
            self._sum = {k: v.to(_accumulator_dtype(v)) * weight for k, v in tensors.items()}
        else:
            if tensors.keys() != self._sum.keys():
                raise ValueError(f"update entries {sorted(tensors)} differ from {sorted(self._sum)}")
            for k, v in tensors.items():
                self._sum[k].add_(v.to(self._sum[k].dtype), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def mean(self, like: State) -> State:
        """The weighted mean, each entry cast to the dtype of the same entry in `like`."""
        if self._sum is None or self.total_weight == 0:
            raise ValueError("mean of no updates (or of zero total weight)")
        return {k: cast_like(s / self.total_weight, like[k]) for k, s in self._sum.items()}


def weighted_mean_delta(updates: Iterable[ClientUpdate], like: State) -> tuple[State | None, int]:
    """Example-weighted mean of the updates' deltas, and how many updates there were."""
    acc = RunningMean()
    for update in updates:
        acc.add(update.delta, float(update.num_examples))
    if acc.count == 0 or acc.total_weight == 0:
        return None, acc.count
    return acc.mean(like), acc.count


def step_params(params: State, step: State, lr: float = 1.0) -> State:
    """params + lr * step for float entries; integer entries (buffers) take the step as it is."""
    return {k: v + lr * step[k] if v.is_floating_point() else v + cast_like(step[k], v) for k, v in params.items()}


def stack_deltas(updates: Iterable[ClientUpdate]) -> tuple[list[ClientUpdate], State]:
    """All updates, and their deltas stacked along a new first (client) dimension, as floats.

    Robust aggregators need every update at once: memory grows with clients per round.
    """
    updates = list(updates)
    if not updates:
        return updates, {}
    stacked = {k: torch.stack([u.delta[k].to(_accumulator_dtype(u.delta[k])) for u in updates])
               for k in updates[0].delta}
    return updates, stacked


def check_server_lr(server_lr: float) -> None:
    if not server_lr > 0:
        raise ConfigError(f"server_lr must be > 0, got {server_lr}")


def float_keys(state: State) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]
