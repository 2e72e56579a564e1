"""User-level differential privacy for a whole run: the settings, and the stage the round loop runs.

`DifferentialPrivacy` is what a user asks for (mode, clip bound, noise or a target epsilon,
delta); `PrivacyRun` is that request set up for one run (the noise multiplier, calibrated if
need be, the accountant over the sampling the run really uses, the clip bound) and carried from
round to round. The round loop calls, in order: `exhausted` (stop before the budget would be
passed), `on_clients` (what the clients do to their updates in client and local modes, when the
engine's clients do not do it themselves), `aggregate` (the noised mean, then the strategy's
server optimizer), and `metrics` (epsilon spent, the clip bound) for the round's record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypedDict

import torch

from .. import _seeding
from ..contract import ClientUpdate
from ..errors import ConfigError
from ..reductions import Update
from ..strategies import LinearStrategy, ServerState
from .accountant import METHODS, Accountant, calibrate, check_delta, check_epsilon
from .mechanism import MODES, PrivacyConfig, secure_generator
from .sampling import FixedSizeSampling, PoissonSampling, Sampling
from .stage import PrivacyState, PrivacyStats, check_strategy, privatize, privatize_update

log = logging.getLogger("fedforge")
SAMPLINGS = ("fixed", "poisson")


@dataclass(frozen=True)
class DifferentialPrivacy:
    """User-level differential privacy (DP-FedAvg, McMahan et al. 2018) as a user asks for it.

    Attributes:
        mode: "client" (clients clip, the server adds the noise: the deployment default),
            "central" (the server clips and noises) or "local" (each client noises its own).
        clip: C, the bound on each client's update norm (the initial C when adaptive).
        noise_multiplier: z (noise std over C); None: calibrated so that the run's last round
            ends at `target_epsilon`.
        target_epsilon: the budget: the run stops before a round would pass it (None: no
            budget; then `noise_multiplier` is needed).
        delta: of the (epsilon, delta) guarantee; must be < 1 / num_clients.
        adaptive, target_quantile, clip_lr: adaptive clipping (Andrew et al. 2021).
        accountant: "pld" or "rdp" (None: PLD, or RDP where dp-accounting has only that).
        secure_noise: noise from the OS's cryptographic source instead of the run's seed
            (deployment); the simulation's noise is seeded, so runs repeat exactly.
    """

    mode: str = "client"
    clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    accountant: str | None = None
    secure_noise: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"dp must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError(
                "differential privacy needs a target epsilon (--target-epsilon) or a noise multiplier "
                "(--noise-multiplier)"
            )
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"noise_multiplier must be > 0 for a privacy guarantee, got {self.noise_multiplier}")
        if self.target_epsilon is not None:
            check_epsilon(self.target_epsilon)
        check_delta(self.delta)
        if not self.clip > 0:
            raise ConfigError(f"clip bound must be > 0, got {self.clip}")
        if self.accountant is not None and self.accountant not in METHODS:
            raise ConfigError(f"accountant must be one of {', '.join(METHODS)}, got {self.accountant!r}")

    def check(self, strategy, num_clients: int) -> None:
        """What can be checked against the run before it starts (a strategy DP can serve, delta)."""
        check_strategy(strategy)
        check_delta(self.delta, num_clients)


def sampling_for(kind: str, num_clients: int, clients_per_round: int) -> Sampling:
    """The accountant's description of the run's client sampling: `clients_per_round` of
    `num_clients` each round (fixed), or each client with probability clients_per_round / N."""
    if kind == "poisson":
        return PoissonSampling(clients_per_round / num_clients, num_clients)
    if kind == "fixed":
        return FixedSizeSampling(num_clients, clients_per_round)
    raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {kind!r}")


@dataclass(frozen=True)
class PrivacyRunState:
    """What the privacy stage carries from round to round (`ServerState.privacy`, checkpoints keep
    it): the accountant, with the rounds spent, and the stage's clip bound."""

    accountant: Accountant
    stage: PrivacyState

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the checkpoint (`from_dict` reads them back)."""
        return {"accountant": self.accountant.state(), "stage": self.stage.to_dict()}

    @classmethod
    def from_dict(cls, state: Any) -> PrivacyRunState:
        if not isinstance(state, dict) or not isinstance(state.get("accountant"), dict):
            raise ConfigError("its privacy state is not a table with an accountant")
        return cls(Accountant.from_state(state["accountant"]), PrivacyState.from_dict(state.get("stage")))


class _ClientPart(TypedDict, total=False):
    """The ClientPlan fields of a client's part in the privacy stage."""

    clip: float
    noise_multiplier: float


def _noise_multiplier(settings: DifferentialPrivacy, sampling: Sampling, rounds: int) -> float:
    """The settings' noise multiplier, or else the one calibrated to spend target_epsilon in `rounds`."""
    if settings.noise_multiplier is not None:
        return settings.noise_multiplier
    assert settings.target_epsilon is not None, "DifferentialPrivacy checks that one of the two is given"
    z = calibrate(
        settings.target_epsilon,
        settings.delta,
        sampling,
        rounds,
        method=settings.accountant,
        local=settings.mode == "local",
    )
    log.info(
        "noise multiplier %.4f: calibrated for epsilon %.4g at delta %g over %d rounds",
        z,
        settings.target_epsilon,
        settings.delta,
        rounds,
    )
    return z


class PrivacyRun:
    """The privacy stage of one run, with what it carries between rounds (`state`)."""

    def __init__(
        self,
        settings: DifferentialPrivacy,
        sampling: Sampling,
        *,
        rounds: int,
        seed: int,
        saved: PrivacyRunState | None = None,
    ):
        self.settings, self.seed = settings, seed
        if saved is not None:  # a resumed run: the accountant and the clip bound continue exactly
            self.accountant = saved.accountant
            self.clip = saved.stage
            z = self.accountant.noise_multiplier
        else:
            z = _noise_multiplier(settings, sampling, rounds)
            self.accountant = Accountant(sampling, z, settings.accountant, local=settings.mode == "local")
        self.mechanism = PrivacyConfig(
            z,
            sampling.expected_clients,
            mode=settings.mode,
            clip=settings.clip,
            adaptive=settings.adaptive,
            target_quantile=settings.target_quantile,
            clip_lr=settings.clip_lr,
        )
        if saved is None:
            self.clip = PrivacyState.initial(self.mechanism)
        self.last: PrivacyStats | None = None  # the last round's stats, for its record

    @property
    def noise_multiplier(self) -> float:
        return float(self.accountant.noise_multiplier)

    def state(self) -> PrivacyRunState:
        """What the server state carries to the next round (`saved=` continues from it)."""
        return PrivacyRunState(self.accountant, self.clip)

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.settings.delta)

    def exhausted(self) -> bool:
        """Whether one more round would take epsilon past the budget."""
        budget = self.settings.target_epsilon
        return budget is not None and self.accountant.would_exceed(budget, self.settings.delta)

    def _generator(self, *keys: int) -> torch.Generator:
        return secure_generator() if self.settings.secure_noise else _seeding.generator(self.seed, *keys)

    def client_plan(self) -> _ClientPart:
        """What a client must know to do its part (`ClientPlan.clip`, `noise_multiplier`)."""
        if self.settings.mode == "central":
            return {}
        return {
            "clip": self.clip.clip,
            "noise_multiplier": self.noise_multiplier if self.settings.mode == "local" else 0.0,
        }

    def on_clients(self, updates: Iterable[ClientUpdate], round_: int) -> Iterator[ClientUpdate]:
        """What each client does before sending in client and local modes (clip; and noise, each
        from the client's own stream), for engines whose clients do not do it themselves."""
        for update in updates:
            yield privatize_update(
                update,
                self.mechanism,
                self.clip.clip,
                self._generator(_seeding.DP_LOCAL_NOISE, round_, update.client_id),
            )

    def aggregate(
        self, strategy: LinearStrategy, state: ServerState, updates: Iterable[Update], round_: int
    ) -> ServerState:
        """The next server state: the strategy's server optimizer applied to the noised mean of
        the round's updates; the accountant spends the round."""
        mean, self.clip, stats = privatize(
            updates, state.params, self.clip, self.mechanism, self._generator(_seeding.DP_NOISE, round_)
        )
        self.accountant = self.accountant.spend()
        self.last = stats
        return replace(strategy.apply_mean(state, mean), privacy=self.state())

    def metrics(self) -> dict[str, float]:
        """For the round's record: epsilon spent so far (at the run's delta), the clip bound and, in
        client and local modes, how many updates the server clipped for arriving above what an
        honest client's stays within (`over_bound`)."""
        stats = self.last
        values = {
            "epsilon": self.epsilon(),
            "clip": stats.clip if stats else self.clip.clip,
            "noise_multiplier": self.noise_multiplier,
        }
        if stats is not None and self.settings.mode != "central":
            values["over_bound"] = float(stats.over_bound)
        if stats is not None and stats.unclipped_estimate is not None:
            values["unclipped"] = stats.unclipped_estimate
        return values


__all__ = ["SAMPLINGS", "DifferentialPrivacy", "PrivacyRun", "PrivacyRunState", "sampling_for"]
