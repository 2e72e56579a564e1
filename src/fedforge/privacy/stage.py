"""The privacy stage of the round loop: run clients -> privatize -> the strategy's server optimizer.

A transformation of the round's updates (as pfl-research's postprocessors), not a strategy
wrapper: `privatize` turns the updates into the noised mean delta, and a strategy that is one
weighted mean plus a server optimizer (FedAvg, FedAvgM, FedProx, FedAdagrad/Adam/Yogi) applies
its optimizer to that mean. Strategies that need every raw update are refused (`check_strategy`: `LinearStrategy`).

Client side, `privatize_update` is what a client (or an engine on its behalf) does to its update
before sending it: nothing ("central"), clip ("client"), or clip and noise ("local").

Server side, `privatize` does not trust that the clients did their part: an update above what an
honest client's stays within (client mode: C; local mode: `local_bound`) is clipped to that bound,
counted (`PrivacyStats.over_bound`, the round's `over_bound` in history) and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..client import ClientUpdate
from ..errors import ConfigError
from ..reductions import PartialSum, Update
from ..strategies import Strategy, check_linear
from .mechanism import PrivacyConfig, State, adapt_clip, add_noise, clip_delta, local_bound

log = logging.getLogger("fedforge.privacy")

# In "client" mode the server sees updates already clipped to C: one that arrives with a norm
# this close to C is taken as clipped (an unclipped norm in [C(1 - tol), C] is miscounted: the
# quantile estimate is off by at most the fraction of norms in that band).
_CLIPPED_RTOL = 1e-3


def check_strategy(strategy: Strategy | str) -> None:
    """A one-line ConfigError unless `strategy` (or the built-in one of that name) can be run with
    differential privacy: its server step is a function of the mean delta alone."""
    check_linear(strategy, "differential privacy")


@dataclass(frozen=True)
class PrivacyState:
    """What the privacy stage carries between rounds (checkpoints keep it): the clip bound."""

    clip: float

    @classmethod
    def initial(cls, config: PrivacyConfig) -> PrivacyState:
        return cls(float(config.clip))

    def to_dict(self) -> dict[str, Any]:
        return {"clip": self.clip}

    @classmethod
    def from_dict(cls, state: object) -> PrivacyState:
        clip = state.get("clip") if isinstance(state, dict) else None
        if not (isinstance(clip, (int, float)) and clip > 0):
            raise ConfigError(f"privacy state needs a clip bound > 0, got {state!r}")
        return cls(float(clip))


@dataclass(frozen=True)
class PrivacyStats:
    """One round of the privacy stage, for history and the console.

    Attributes:
        clip: the clip bound C used this round.
        noise_std: the std of the noise added to the sum (z_update * C; 0 in local mode, where
            each client added std z * C itself).
        num_updates: how many updates were summed (not private: a diagnostic, for simulation).
        unclipped_estimate: the noised fraction of unclipped updates (adaptive clipping only;
            private, the estimate that moved C).
        next_clip: the clip bound of the next round.
        over_bound: how many updates arrived above what an honest client's stays within (client
            mode: C; local mode: `local_bound`) and were clipped to it (0 in central mode).
    """

    clip: float
    noise_std: float
    num_updates: int
    unclipped_estimate: float | None
    next_clip: float
    over_bound: int = 0


def privatize_update(
    update: ClientUpdate, config: PrivacyConfig, clip: float, generator: torch.Generator | None = None
) -> ClientUpdate:
    """What a client sends under `config.mode`: central: its update as it is; client: clipped
    to `clip`; local: clipped and noised (std z * C, from `generator`, the client's own stream).

    In client and local modes integer entries are zeroed: nothing the guarantee does not cover
    leaves the client in the delta (num_examples and the training metrics still do; see
    docs/privacy.md)."""
    if config.mode == "central":
        return update
    delta, _ = clip_delta(update.delta, clip)
    delta = {k: v if v.is_floating_point() else torch.zeros_like(v) for k, v in delta.items()}
    if config.mode == "local":
        if generator is None:
            raise ValueError("local DP needs the client's generator for its noise")
        delta = add_noise(delta, config.noise_multiplier * clip, generator)
    return replace(update, delta=delta)


def privatize(
    updates: Iterable[Update], like: State, state: PrivacyState, config: PrivacyConfig, generator: torch.Generator
) -> tuple[State, PrivacyState, PrivacyStats]:
    """The round's noised mean delta (DP-FedAvg, McMahan et al. 2018), consuming `updates` once.

    mean = (sum_i clip(delta_i, C) + N(0, (z_update C)^2)) / m, with m the expected cohort size,
    for each float entry of `like` (the global model); integer entries get a zero delta. Every
    update counts once, whatever its num_examples: weighting by examples would let one client
    move the sum by more than C. With no update at all the mean is the noise alone, and the round
    still counts for the accountant (skipping it would reveal that nobody took part).

    Args:
        updates: central mode: raw updates; client mode: updates clipped by the clients with
            `state.clip` (clipped again here: a no-op for an honest client, a bound for the
            others), or a secure aggregation's sum of them (a PartialSum of weight 1 per
            client, counting its unclipped ones: taken as it is, the server cannot clip inside
            it); local mode: clipped and noised updates, each clipped here to `local_bound`
            (a no-op for an honest client but with probability 1e-9, the bound for the others).
        like: the global model's state (keys, shapes, dtypes, devices of the mean).
        state: the clip bound for this round.
        generator: the noise stream (simulation: seeded per round; deployment:
            `secure_generator()`). The update noise is drawn first, then the count's.

    Returns:
        The mean delta for the strategy's server optimizer, the next state, and the round's stats.
    """
    clip = state.clip
    size = sum(v.numel() for v in like.values() if v.is_floating_point())
    # What an honest client's update stays within: it clipped to C, and in local mode it added noise.
    bound = local_bound(clip, config.noise_multiplier, size) if config.mode == "local" else clip
    over_bound = 0
    # Running sum: the stage holds one model-sized buffer, never every client's update.
    total = {k: torch.zeros_like(v) for k, v in like.items() if v.is_floating_point()}
    count = unclipped = 0
    for update in updates:
        entries = update.mean_delta if isinstance(update, PartialSum) else update.delta
        if entries.keys() != like.keys():
            raise ValueError(f"update entries {sorted(entries)} differ from the model's {sorted(like)}")
        if isinstance(update, PartialSum):  # a secure aggregation's sum of updates its clients clipped
            if config.mode != "client":
                raise ValueError(f"a sum of updates cannot be privatized in {config.mode} mode")
            delta = {k: v * update.num_examples for k, v in update.mean_delta.items()}  # each weighs 1: the sum
            unclipped += update.unclipped or 0
            for k, acc in total.items():
                acc.add_(delta[k].to(acc.dtype))
            count += len(update.client_ids)
            continue
        delta, norm = clip_delta(update.delta, bound)
        if config.mode == "client":  # the client clipped already, so `norm` is what arrived; a clipped one is ~C
            unclipped += norm < clip * (1 - _CLIPPED_RTOL)
        elif config.mode == "central":
            unclipped += norm <= clip
        if config.mode != "central" and norm > bound:
            over_bound += 1
            log.warning(
                "client %d sent an update of norm %.4g, above the %.4g an honest client's stays within under "
                "--dp %s: clipped to it",
                update.client_id,
                norm,
                bound,
                config.mode,
            )
        for k, acc in total.items():
            acc.add_(delta[k].to(acc.dtype))
        count += 1
    noise_std = 0.0 if config.mode == "local" else config.update_noise_multiplier * clip
    noised = add_noise(total, noise_std, generator)
    mean = {k: noised[k] / config.expected_clients if k in noised else torch.zeros_like(v) for k, v in like.items()}
    next_clip, estimate = clip, None
    if config.adaptive:
        next_clip, estimate = adapt_clip(clip, unclipped, count, config, generator)
    return mean, PrivacyState(next_clip), PrivacyStats(clip, noise_std, count, estimate, next_clip, over_bound)
