"""Robust aggregation: coordinate-wise median, trimmed mean, Krum and Multi-Krum.

The reducers are pure functions over updates stacked along dimension 0; the strategies apply
them to the clients' deltas (unweighted: a robust rule must not let one client's claimed
size buy it influence).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..client import ClientUpdate
from ..errors import ConfigError
from ..reductions import stack_deltas
from .base import ServerState, StrategyBase, step_params


def median(stacked: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median over dimension 0 (the mean of the two middle values when even)."""
    ordered = stacked.sort(0).values
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stacked: torch.Tensor, beta: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the floor(beta * n) smallest and largest values."""
    n = len(stacked)
    k = math.floor(beta * n)
    if 2 * k >= n:
        raise ValueError(f"trimmed_mean with beta={beta} drops all {n} updates")
    return stacked.sort(0).values[k : n - k].mean(0)


def krum_scores(flat: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each row: the summed squared distance to its n - f - 2 nearest other rows.

    Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent".
    """
    n = len(flat)
    neighbours = n - f - 2
    if neighbours < 1:
        raise ValueError(f"krum with f={f} needs more than f + 2 = {f + 2} updates, got {n}")
    distances = torch.cdist(flat.double(), flat.double()).pow(2)
    distances.fill_diagonal_(float("inf"))
    return distances.sort(1).values[:, :neighbours].sum(1)


def multikrum_select(flat: torch.Tensor, f: int, m: int) -> torch.Tensor:
    """Indices of the m rows with the lowest Krum scores (m = 1 is Krum)."""
    return krum_scores(flat, f).argsort()[:m]


def _robust_step(state: ServerState, updates: Iterable[ClientUpdate], reduce) -> ServerState:
    updates, stacked = stack_deltas(updates)
    if not updates:
        return state.unchanged()
    return state.next(step_params(state.params, reduce(stacked)))


# Why a robust aggregator refuses entries kept on the clients (personal or frozen ones).
ROBUST_WHOLE_MODEL = (
    "its robustness is argued over whole models; with entries kept on the clients it would judge a part "
    "of each, which its guarantee does not cover"
)


@dataclass(frozen=True)
class Median(StrategyBase):
    name = "median"
    needs_each_update = "the coordinate-wise median needs every update"
    needs_every_entry = ROBUST_WHOLE_MODEL

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        return _robust_step(state, updates, lambda s: {k: median(v) for k, v in s.items()})


@dataclass(frozen=True)
class TrimmedMean(StrategyBase):
    trim_beta: float = 0.1
    name = "trimmed_mean"
    needs_each_update = "trimming needs every update"
    needs_every_entry = ROBUST_WHOLE_MODEL

    def __post_init__(self):
        if not 0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim_beta must be in [0, 0.5), got {self.trim_beta}")

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        return _robust_step(state, updates, lambda s: {k: trimmed_mean(v, self.trim_beta) for k, v in s.items()})


def _krum_reduce(stacked: dict[str, torch.Tensor], f: int, m: int) -> dict[str, torch.Tensor]:
    flat = torch.cat([v.flatten(1) for v in stacked.values()], dim=1)
    chosen = multikrum_select(flat, f, m)
    return {k: v[chosen].mean(0) for k, v in stacked.items()}


@dataclass(frozen=True)
class Krum(StrategyBase):
    """Krum: the one update closest to its n - f - 2 neighbours."""

    krum_f: int = 1
    name = "krum"
    needs_each_update = "Krum compares the updates with each other"
    needs_every_entry = ROBUST_WHOLE_MODEL

    def __post_init__(self):
        if self.krum_f < 0:
            raise ConfigError(f"krum_f must be >= 0, got {self.krum_f}")

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        return _robust_step(state, updates, lambda s: _krum_reduce(s, self.krum_f, 1))


@dataclass(frozen=True)
class MultiKrum(StrategyBase):
    """Multi-Krum: the mean of the m best-scored updates (m = 0: n - f)."""

    krum_f: int = 1
    multikrum_m: int = 0
    name = "multikrum"
    needs_each_update = "Multi-Krum compares the updates with each other"
    needs_every_entry = ROBUST_WHOLE_MODEL

    def __post_init__(self):
        if self.krum_f < 0 or self.multikrum_m < 0:
            raise ConfigError(f"krum_f and multikrum_m must be >= 0, got {self.krum_f}, {self.multikrum_m}")

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        def reduce(stacked):
            n = len(next(iter(stacked.values())))
            return _krum_reduce(stacked, self.krum_f, self.multikrum_m or n - self.krum_f)

        return _robust_step(state, updates, reduce)
