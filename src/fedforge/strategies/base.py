"""Server state, the strategy interface, and the pieces strategies share."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    facts of the run it was initialised with; `privacy` the privacy stage's (the accountant, the
    clip bound), in a run with differential privacy.
    """

    params: State
    round: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    run: RunInfo | None = None
    privacy: dict[str, Any] | None = None

    def unchanged(self) -> ServerState:
        """The state after a round in which no update arrived: same model, next round."""
        return replace(self, round=self.round + 1)

    def next(self, params: State, extras: dict[str, Any] | None = None) -> ServerState:
        """The state of the next round: new `params`, and new `extras` when given."""
        return replace(self, params=params, round=self.round + 1, extras=self.extras if extras is None else extras)

    def run_info(self, strategy: str) -> RunInfo:
        if self.run is None:
            raise ConfigError(f"{strategy} needs the run's facts: start from strategy.init(params, run=RunInfo(...))")
        return self.run


class Strategy(Protocol):
    name: str
    linear: bool  # aggregate is apply_mean of the weighted mean delta (see StrategyBase); absent: False

    def init(self, params: State, run: RunInfo) -> ServerState:
        """The server state before round 1 of a run with facts `run`."""

    def plan(self, state: ServerState, client_id: int) -> ClientPlan:
        """What selected client `client_id` is asked to do this round."""

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        """The next state from this round's updates (an iterable, consumed once)."""


NO_PLAN = ClientPlan()


class StrategyBase:
    """`init` that copies the model, and `plan` that asks nothing special.

    `linear` says whether `aggregate` depends on the round's updates only through their
    example-weighted mean delta (and on whether any arrived): then `aggregate(state, updates)` is
    `apply_mean(state, weighted mean delta)`, and an engine may hand it partial sums of several
    clients (`combine_updates`) instead of every update, e.g. one per Ray worker. FedAvg and the
    server-optimizer family are linear; strategies that look at each update (robust aggregators,
    SCAFFOLD's controls, q-FedAvg's losses, FedNova's step counts) are not, the default. Those
    say why in `needs_each_update`: the reason given when something that serves linear
    strategies only (differential privacy, secure aggregation) refuses them (`check_linear`).
    """

    linear = False
    needs_each_update = "it looks at each update, not only at their weighted mean"

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

    def mean(self, like: State | None = None) -> State:
        """The weighted mean, each entry cast to the dtype of the same entry in `like`; without
        `like`, in the sum's own dtypes (float64 for integer entries): a partial mean that another
        RunningMean folds in unrounded (`combine_updates`)."""
        if self._sum is None or self.total_weight == 0:
            raise ValueError("mean of no updates (or of zero total weight)")
        if like is None:
            return {k: s / self.total_weight for k, s in self._sum.items()}
        return {k: cast_like(s / self.total_weight, like[k]) for k, s in self._sum.items()}


@dataclass(frozen=True)
class CombinedUpdate(ClientUpdate):
    """Several clients' updates as one, for a strategy that aggregates linearly (`StrategyBase.linear`).

    `delta` is their example-weighted mean delta (unrounded: integer entries in float64),
    `num_examples` and `num_steps` their totals, `metrics` their example-weighted training
    metrics: `RunningMean.add(delta, num_examples)` and the round loop's tally of training
    metrics fold it exactly as they would fold the updates it stands for. `client_id` is -1 (no
    one client); `client_ids` are the clients it stands for. A secure aggregation's sum also
    says how many of its clients' updates were within the clip bound before they clipped them
    (`unclipped`, adaptive clipping's count).
    """

    client_ids: tuple[int, ...] = ()
    unclipped: int | None = None


def example_weighted(metrics: Iterable[tuple[Mapping[str, float | None], int]]) -> dict[str, float]:
    """Each metric's mean over clients weighted by their examples, from (a client's training
    metrics, its examples): the same metrics, with the same weights, as the round loop's tally
    takes from each update (a metric a client has as None adds nothing; the weights are all the
    clients' examples)."""
    sums: dict[str, float] = {}
    examples = 0
    for values, n in metrics:
        examples += n
        for name, value in values.items():
            if value is not None:
                sums[name] = sums.get(name, 0.0) + value * n
    return {name: total / examples for name, total in sums.items()} if examples else {}


def combine_updates(updates: Iterable[ClientUpdate]) -> CombinedUpdate | None:
    """The updates as one CombinedUpdate (None when there are none): what an engine that trains
    clients far from the server (Ray) sends back instead of each update when the round loop allows
    it (`ClientTask.summable`), so that one model-sized message travels per worker, not per client."""
    acc = RunningMean()
    examples = steps = 0
    weighted: list[tuple[Mapping[str, float | None], int]] = []
    ids: list[int] = []
    for update in updates:
        acc.add(update.delta, float(update.num_examples))
        examples += update.num_examples
        steps += update.num_steps
        ids.extend(getattr(update, "client_ids", None) or (update.client_id,))
        weighted.append((update.training_metrics(), update.num_examples))
    if acc.count == 0:
        return None
    metrics = example_weighted(weighted)
    return CombinedUpdate(
        -1,
        acc.mean(),
        examples,
        steps,
        metrics.get("loss", float("nan")),
        metrics.get("accuracy"),
        metrics=metrics,
        client_ids=tuple(ids),
    )


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
    stacked = {
        k: torch.stack([u.delta[k].to(_accumulator_dtype(u.delta[k])) for u in updates]) for k in updates[0].delta
    }
    return updates, stacked


def check_server_lr(server_lr: float) -> None:
    if not server_lr > 0:
        raise ConfigError(f"server_lr must be > 0, got {server_lr}")


def float_keys(state: State) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]
