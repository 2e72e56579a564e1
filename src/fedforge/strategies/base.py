"""Server state, the strategy interface, and the running weighted mean they share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..client import ClientUpdate, State


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries from one round to the next.

    `params` is the global model's full state (parameters and buffers); `extras` holds a
    strategy's own tensors (momentum, control variates, ...) by name.
    """

    params: State
    round: int = 0
    extras: dict[str, State] = field(default_factory=dict)


class Strategy(Protocol):
    name: str

    def init(self, params: State) -> ServerState: ...

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState: ...


def _accumulator_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float64


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
        out = {}
        for k, s in self._sum.items():
            m = s / self.total_weight
            out[k] = m.to(like[k].dtype) if like[k].is_floating_point() else m.round().to(like[k].dtype)
        return out


def weighted_mean_delta(updates: Iterable[ClientUpdate], like: State) -> tuple[State | None, int]:
    """Example-weighted mean of the updates' deltas, and how many updates there were."""
    acc = RunningMean()
    for update in updates:
        acc.add(update.delta, float(update.num_examples))
    if acc.count == 0 or acc.total_weight == 0:
        return None, acc.count
    return acc.mean(like), acc.count
