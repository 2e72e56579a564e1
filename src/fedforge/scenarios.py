"""What happens to clients beyond the algorithm: unequal work, stragglers, dropouts, attacks.

Each choice draws from its own stream of the run's seed (see `_seeding`), so a scenario
changes nothing else about a run: the same clients are selected with or without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import _seeding
from ._options import option
from .client import ClientConfig, ClientPlan, ClientUpdate
from .errors import ConfigError

ATTACKS = ("sign_flip", "gaussian", "label_flip", "scale")


@dataclass(frozen=True)
class Scenario:
    """Client behaviour for a simulation.

    Attributes:
        local_epochs_range: (low, high): each selected client draws its local epochs
            uniformly from low..high every round (None: everyone does the config's).
        straggler_fraction: share of the selected clients, drawn every round, that finish only
            part of their work: a number of steps drawn uniformly from 1 to their full count
            (FedProx's x ~ U[1, E] epochs, at the granularity of steps).
        drop_stragglers: stragglers do not report at all (FedAvg in the FedProx paper) rather
            than sending their partial work.
        dropout: probability that a selected client never reports.
        attack: what malicious clients do: "sign_flip" (send -scale x their delta), "scale"
            (scale x delta), "gaussian" (noise of std scale instead of a delta), "label_flip"
            (train on labels mapped y -> C - 1 - y).
        malicious_fraction: share of all clients that are malicious, fixed for the run.
        attack_scale: the attack's scale.
    """

    local_epochs_range: tuple[int, int] | None = None
    straggler_fraction: float = 0.0
    drop_stragglers: bool = False
    dropout: float = 0.0
    attack: str | None = None
    malicious_fraction: float = 0.0
    attack_scale: float = 1.0

    def __post_init__(self):
        if self.local_epochs_range is not None:
            low, high = self.local_epochs_range
            if not 1 <= low <= high:
                raise ConfigError(f"local epochs range must satisfy 1 <= low <= high, got {low}..{high}")
        for name in ("straggler_fraction", "dropout", "malicious_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.attack is not None and self.attack not in ATTACKS:
            raise ConfigError(f"unknown attack {self.attack!r} (choose from: {', '.join(ATTACKS)})")
        if self.attack is None and self.malicious_fraction > 0:
            raise ConfigError("malicious_fraction needs an attack (--attack)")


def parse_epochs_dist(text: str | None) -> tuple[int, int] | None:
    """ "uniform:1:5" -> (1, 5); None -> None."""
    if text is None:
        return None
    match = re.fullmatch(r"uniform:(\d+):(\d+)", text.strip())
    if not match:
        raise ConfigError(f"local_epochs_dist must look like uniform:1:5, got {text!r}")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class ScenarioSettings:
    """What clients do beyond the algorithm (TOML: flat keys or the table [scenario])."""

    local_epochs_dist: str | None = option(None, "per-client local epochs each round, e.g. uniform:1:5")
    straggler_fraction: float = option(0.0, "share of selected clients that do only part of their work")
    drop_stragglers: bool = option(False, "stragglers send nothing instead of their partial work")
    dropout: float = option(0.0, "probability that a selected client never reports")
    attack: str | None = option(None, "what malicious clients do", ATTACKS)
    malicious_fraction: float = option(0.0, "share of clients that are malicious")
    attack_scale: float = option(1.0, "scale of the attack (sign_flip, scale: factor; gaussian: std)")

    def __post_init__(self):
        self.scenario()

    def scenario(self) -> Scenario:
        """The scenario these settings describe (which checks them)."""
        return Scenario(
            local_epochs_range=parse_epochs_dist(self.local_epochs_dist),
            straggler_fraction=self.straggler_fraction,
            drop_stragglers=self.drop_stragglers,
            dropout=self.dropout,
            attack=self.attack,
            malicious_fraction=self.malicious_fraction,
            attack_scale=self.attack_scale,
        )


def malicious_clients(scenario: Scenario, num_clients: int, seed: int) -> frozenset[int]:
    """The malicious clients of a run: round(fraction x clients) of them, fixed by the seed."""
    if scenario.attack is None:
        return frozenset()
    count = round(scenario.malicious_fraction * num_clients)
    rng = _seeding.numpy_rng(seed, _seeding.MALICIOUS)
    return frozenset(rng.choice(num_clients, size=count, replace=False).tolist())


def client_work(
    scenario: Scenario, selected: list[int], sizes: list[int], config: ClientConfig, seed: int, round_: int
) -> tuple[dict[int, ClientPlan], tuple[int, ...]]:
    """Per selected client, the work part of its plan (epochs, max_steps); and who drops out."""
    plans: dict[int, ClientPlan] = {}
    dropped: list[int] = []
    epochs_rng = _seeding.numpy_rng(seed, _seeding.LOCAL_EPOCHS, round_)
    straggler_rng = _seeding.numpy_rng(seed, _seeding.STRAGGLERS, round_)
    dropout_rng = _seeding.numpy_rng(seed, _seeding.DROPOUT, round_)
    k = len(selected)
    stragglers = set(
        np.asarray(selected)[straggler_rng.permutation(k)[: round(scenario.straggler_fraction * k)]].tolist()
    )
    for client, size in zip(selected, sizes, strict=True):
        plan = ClientPlan()
        if scenario.local_epochs_range is not None:
            low, high = scenario.local_epochs_range
            plan = replace(plan, epochs=int(epochs_rng.integers(low, high + 1)))
        full = plan.num_steps(size, config)
        if client in stragglers:
            if scenario.drop_stragglers:
                dropped.append(client)
            plan = replace(plan, max_steps=int(straggler_rng.integers(1, full + 1)))
        if scenario.dropout and dropout_rng.random() < scenario.dropout and client not in dropped:
            dropped.append(client)
        plans[client] = plan
    return plans, tuple(sorted(dropped))


def label_flipped(scenario: Scenario, num_clients: int, seed: int) -> frozenset[int]:
    """The clients whose training labels the scenario flips (label_flip's malicious clients;
    `data.client_pool` flips them)."""
    return malicious_clients(scenario, num_clients, seed) if scenario.attack == "label_flip" else frozenset()


def attack_update(update: ClientUpdate, scenario: Scenario, seed: int, round_: int) -> ClientUpdate:
    """A malicious client's update as the attack makes it (label_flip acts on data instead)."""
    s = scenario.attack_scale
    if scenario.attack == "sign_flip":
        delta = {k: -s * v if v.is_floating_point() else v for k, v in update.delta.items()}
    elif scenario.attack == "scale":
        delta = {k: s * v if v.is_floating_point() else v for k, v in update.delta.items()}
    elif scenario.attack == "gaussian":
        g = _seeding.generator(seed, _seeding.ATTACK_NOISE, round_, update.client_id)
        delta = {
            k: s * torch.randn(v.shape, generator=g).to(v) if v.is_floating_point() else v
            for k, v in update.delta.items()
        }
    else:
        return update
    return replace(update, delta=delta)
