"""Reductions over client updates: running weighted means, partial sums, stacked deltas.

Pure functions and one small accumulator over `ClientUpdate`s (and `PartialSum`s), shared by the
engines that sum clients before sending (vectorized, Ray, secure aggregation), the privacy stage
and the strategies, so that none of them imports another for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .contract import ClientUpdate, State


@dataclass(frozen=True)
class PartialSum:
    """Several clients' updates as one, for a strategy that aggregates linearly (`LinearStrategy`).

    What an engine that sums clients sends instead of their updates (a Ray worker, the vectorized
    engine's `combine`, a secure aggregation): `RunningMean.fold` and the round loop's tally of
    training metrics take it exactly as they would take the updates it stands for.

    Attributes:
        mean_delta: the example-weighted mean of the clients' deltas (unrounded: integer entries in
            float64); the sum is `mean_delta * num_examples`.
        num_examples: the clients' examples in all (the weight of `mean_delta`).
        num_steps: their local steps in all.
        client_ids: the clients it stands for.
        metrics: their training metrics, each the example-weighted mean over the clients.
        unclipped: a secure aggregation's count of its clients' updates that were within the clip
            bound before they clipped them (adaptive clipping); None elsewhere.
    """

    mean_delta: State
    num_examples: int
    num_steps: int
    client_ids: tuple[int, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    unclipped: int | None = None

    def training_metrics(self) -> Mapping[str, float | None]:
        """The clients' example-weighted training metrics, as `ClientUpdate.training_metrics`."""
        return self.metrics


# What an engine hands the round loop: one client's update, or a partial sum of several.
Update = ClientUpdate | PartialSum


def accumulator_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a sum of `t`s is kept in: its own when floating, else float64."""
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
            self._sum = {k: v.to(accumulator_dtype(v)) * weight for k, v in tensors.items()}
        else:
            if tensors.keys() != self._sum.keys():
                raise ValueError(f"update entries {sorted(tensors)} differ from {sorted(self._sum)}")
            for k, v in tensors.items():
                self._sum[k].add_(v.to(self._sum[k].dtype), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def fold(self, update: Update) -> None:
        """Add an update's delta, or a partial sum's mean, weighted by its examples."""
        delta = update.mean_delta if isinstance(update, PartialSum) else update.delta
        self.add(delta, float(update.num_examples))

    def mean(self, like: State | None = None) -> State:
        """The weighted mean, each entry cast to the dtype of the same entry in `like`; without
        `like`, in the sum's own dtypes (float64 for integer entries): a partial mean that another
        RunningMean folds in unrounded (`combine_updates`)."""
        if self._sum is None or self.total_weight == 0:
            raise ValueError("mean of no updates (or of zero total weight)")
        if like is None:
            return {k: s / self.total_weight for k, s in self._sum.items()}
        return {k: cast_like(s / self.total_weight, like[k]) for k, s in self._sum.items()}


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


def client_ids(update: Update) -> tuple[int, ...]:
    """The clients an update stands for: its own, or those of a partial sum."""
    return update.client_ids if isinstance(update, PartialSum) else (update.client_id,)


def combine_updates(updates: Iterable[Update]) -> PartialSum | None:
    """The updates as one PartialSum (None when there are none): what an engine that trains
    clients far from the server (Ray) sends back instead of each update when the round loop allows
    it (`ClientTask.summable`), so that one model-sized message travels per worker, not per client."""
    acc = RunningMean()
    steps = 0
    weighted: list[tuple[Mapping[str, float | None], int]] = []
    ids: list[int] = []
    for update in updates:
        acc.fold(update)
        steps += update.num_steps
        ids.extend(client_ids(update))
        weighted.append((update.training_metrics(), update.num_examples))
    if acc.count == 0:
        return None
    examples = sum(n for _, n in weighted)
    return PartialSum(acc.mean(), examples, steps, tuple(ids), metrics=example_weighted(weighted))


def weighted_mean_delta(updates: Iterable[Update], like: State) -> tuple[State | None, int]:
    """Example-weighted mean of the updates' deltas, and how many updates (or partial sums) there were."""
    acc = RunningMean()
    for update in updates:
        acc.fold(update)
    if acc.count == 0 or acc.total_weight == 0:
        return None, acc.count
    return acc.mean(like), acc.count


def stack_deltas(updates: Iterable[ClientUpdate]) -> tuple[list[ClientUpdate], State]:
    """All updates, and their deltas stacked along a new first (client) dimension, as floats.

    Robust aggregators need every update at once: memory grows with clients per round.
    """
    updates = list(updates)
    if not updates:
        return updates, {}
    stacked = {
        k: torch.stack([u.delta[k].to(accumulator_dtype(u.delta[k])) for u in updates]) for k in updates[0].delta
    }
    return updates, stacked


__all__ = [
    "PartialSum",
    "RunningMean",
    "Update",
    "accumulator_dtype",
    "cast_like",
    "client_ids",
    "combine_updates",
    "example_weighted",
    "stack_deltas",
    "weighted_mean_delta",
]
