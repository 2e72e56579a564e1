"""The privacy accountant: (noise multiplier, sampling, rounds) -> (epsilon, delta).

A thin layer over Google's `dp-accounting` (https://github.com/google/differential-privacy,
`pip install 'fedforge[dp]'`); fedforge writes no privacy math of its own. Every round of
DP-FedAvg (McMahan et al. 2018) is one subsampled Gaussian mechanism on the sum of clipped
client updates, of noise multiplier z = noise std / clip bound; a run is its self-composition.

- Poisson sampling with rate q: `PoissonSampledDpEvent(q, GaussianDpEvent(z))` under the
  add-or-remove-one-client relation. Privacy loss distributions (PLD; Koskela et al. 2020,
  Doroshenko et al. 2022) by default: the tightest bound dp-accounting offers; Renyi DP
  (Mironov 2017; Mironov et al. 2019) as an option: faster, a little looser.
- Fixed-size sampling (k of N without replacement): `SampledWithoutReplacementDpEvent`, which
  dp-accounting accounts with RDP only (Wang, Balle and Kasiviswanathan 2019, Theorem 27) and
  only under the replace-one-client relation, where N is public. Replacing one client's update
  by another moves the clipped sum by up to 2C, so the event's Gaussian has multiplier z / 2.
  This epsilon bounds a different (substitution) notion than the Poisson one: the two are not
  comparable number for number.
- Local DP (each client noises its own clipped update, std z*C): the server sees every update,
  so there is no amplification by sampling or by the other clients; the guarantee of one client
  is a Gaussian of multiplier z / 2 (its update may be replaced by any other of norm <= C)
  composed over every round of the run (the worst case: it took part in all of them).

The accountant is a frozen value: `spend()` returns the next one, and `state()`/`from_state()`
are plain dicts for checkpoints, so a resumed run recomputes exactly the same epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

from ..errors import ConfigError
from .sampling import FixedSizeSampling, PoissonSampling, Sampling


@lru_cache(maxsize=1)
def _dp() -> SimpleNamespace:
    """dp-accounting's modules, imported when an accountant is first needed: importing them takes
    about a second, which every fedforge process (each deployment client among them) would pay."""
    try:
        from dp_accounting import dp_event
        from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
        from dp_accounting.privacy_accountant import NeighboringRelation
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError:  # the `dp` extra is optional: fail when an accountant is asked for
        raise ConfigError("differential privacy needs dp-accounting: pip install 'fedforge[dp]'") from None
    return SimpleNamespace(
        dp_event=dp_event,
        pld=pld_privacy_accountant,
        pld_distribution=privacy_loss_distribution,
        NeighboringRelation=NeighboringRelation,
        rdp=rdp_privacy_accountant,
    )


METHODS = ("pld", "rdp")
# Calibration stops below this noise multiplier: PLDs of so little noise take minutes to
# build, and the epsilon they give (> 10 per round) protects nothing.
MIN_CALIBRATED_NOISE = 0.3


def _require_dp_accounting() -> None:
    _dp()


def check_delta(delta: float, num_clients: int | None = None) -> None:
    """delta in (0, 1), and below 1 / num_clients when that is given: with delta >= 1/N a
    mechanism that publishes one whole client's data at random would meet the guarantee."""
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    if num_clients is not None and delta >= 1 / num_clients:
        raise ConfigError(f"delta must be < 1/num_clients = {1 / num_clients:.3g}, got {delta}")


def check_epsilon(epsilon: float, what: str = "target epsilon") -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"{what} must be > 0, got {epsilon}")


def _check_rounds(rounds: int, least: int) -> None:
    if not isinstance(rounds, int) or rounds < least:
        raise ConfigError(f"rounds must be an integer >= {least}, got {rounds}")


def round_event(sampling: Sampling, noise_multiplier: float, *, local: bool = False) -> Any:
    """The dp-accounting event of one round (see the module docstring for each case)."""
    dp_event = _dp().dp_event
    if local:
        return dp_event.GaussianDpEvent(noise_multiplier / 2)
    if isinstance(sampling, PoissonSampling):
        return dp_event.PoissonSampledDpEvent(sampling.q, dp_event.GaussianDpEvent(noise_multiplier))
    return dp_event.SampledWithoutReplacementDpEvent(
        sampling.num_clients, sampling.clients_per_round, dp_event.GaussianDpEvent(noise_multiplier / 2)
    )


def _library_accountant(method: str, sampling: Sampling, local: bool) -> Any:
    dp = _dp()
    if method == "pld":
        return dp.pld.PLDAccountant()
    if isinstance(sampling, FixedSizeSampling) and not local:
        return dp.rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
    return dp.rdp.RdpAccountant()


@lru_cache(maxsize=8)
def _poisson_round_pld(q: float, noise_multiplier: float) -> Any:
    # The PLD of one Poisson-subsampled Gaussian round, with the arguments PLDAccountant passes
    # (its default discretisation 1e-4, add-or-remove). Building it is the costly part (0.5-1 s
    # for z ~ 1), so a run builds it once and each epsilon only self-composes it: 2-4x faster
    # per round than a fresh PLDAccountant, and equal to it within 1e-10 relative.
    return _dp().pld_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sampling_prob=q, value_discretization_interval=1e-4
    )


@lru_cache(maxsize=512)
def _epsilon(sampling: Sampling, noise_multiplier: float, method: str, local: bool, rounds: int, delta: float) -> float:
    # Cached: the round loop asks for epsilon(r + 1) in `would_exceed` and then for the same
    # number after the round.
    if method == "pld" and isinstance(sampling, PoissonSampling) and not local:
        return float(_poisson_round_pld(sampling.q, noise_multiplier).self_compose(rounds).get_epsilon_for_delta(delta))
    event = _dp().dp_event.SelfComposedDpEvent(round_event(sampling, noise_multiplier, local=local), rounds)
    return float(_library_accountant(method, sampling, local).compose(event).get_epsilon(delta))


@dataclass(frozen=True)
class Accountant:
    """Privacy spent by a run of rounds of the subsampled Gaussian mechanism.

    Attributes:
        sampling: how clients were sampled (the run's real sampling: its amplification).
        noise_multiplier: z, the noise std over the clip bound (with adaptive clipping, the
            total z that `PrivacyConfig.noise_multiplier` names, not the update share).
        method: "pld" or "rdp"; None picks PLD, or RDP for fixed-size sampling (the only
            analysis dp-accounting has for it).
        local: local DP (see the module docstring).
        rounds: rounds spent so far.
    """

    sampling: Sampling
    noise_multiplier: float
    method: str | None = None
    local: bool = False
    rounds: int = 0

    def __post_init__(self):
        _require_dp_accounting()
        if not isinstance(self.sampling, (PoissonSampling, FixedSizeSampling)):
            raise ConfigError(f"sampling must be PoissonSampling or FixedSizeSampling, got {self.sampling!r}")
        z = self.noise_multiplier
        if not (isinstance(z, (int, float)) and math.isfinite(z) and z > 0):
            raise ConfigError(f"noise_multiplier must be > 0 for a privacy guarantee, got {z}")
        _check_rounds(self.rounds, 0)
        if self.method is None:
            fixed = isinstance(self.sampling, FixedSizeSampling) and not self.local
            object.__setattr__(self, "method", "rdp" if fixed else "pld")
        if self.method not in METHODS:
            raise ConfigError(f"accountant must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "pld" and isinstance(self.sampling, FixedSizeSampling) and not self.local:
            raise ConfigError(
                "dp-accounting has no PLD for fixed-size sampling: use the rdp accountant or poisson sampling"
            )

    def epsilon(self, delta: float) -> float:
        """Epsilon spent by the rounds so far, at `delta` (0 before the first round)."""
        return self.epsilon_after(self.rounds, delta)

    def epsilon_after(self, rounds: int, delta: float) -> float:
        """Epsilon at `delta` after `rounds` rounds in all (from the start of the run)."""
        _check_rounds(rounds, 0)
        check_delta(delta)
        if rounds == 0:
            return 0.0
        return _epsilon(self.sampling, float(self.noise_multiplier), self.method, self.local, rounds, float(delta))

    def would_exceed(self, epsilon_budget: float, delta: float) -> bool:
        """Whether one more round would take epsilon past the budget: the run stops before it."""
        check_epsilon(epsilon_budget, "epsilon budget")
        return self.epsilon_after(self.rounds + 1, delta) > epsilon_budget

    def spend(self, rounds: int = 1) -> Accountant:
        """The accountant after `rounds` more rounds (each released a noised aggregate)."""
        _check_rounds(rounds, 0)
        return replace(self, rounds=self.rounds + rounds)

    def state(self) -> dict[str, Any]:
        """A plain, JSON-ready dict for checkpoints (`from_state` reads it back)."""
        if isinstance(self.sampling, PoissonSampling):
            sampling = {"kind": "poisson", "q": self.sampling.q, "num_clients": self.sampling.num_clients}
        else:
            sampling = {
                "kind": "fixed",
                "num_clients": self.sampling.num_clients,
                "clients_per_round": self.sampling.clients_per_round,
            }
        return {
            "sampling": sampling,
            "noise_multiplier": float(self.noise_multiplier),
            "method": self.method,
            "local": self.local,
            "rounds": self.rounds,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Accountant:
        try:
            s = state["sampling"]
            kind = s["kind"]
            sampling: Sampling
            if kind == "poisson":
                sampling = PoissonSampling(s["q"], s["num_clients"])
            elif kind == "fixed":
                sampling = FixedSizeSampling(s["num_clients"], s["clients_per_round"])
            else:
                raise ConfigError(f"accountant state: unknown sampling kind {kind!r}")
            return cls(sampling, state["noise_multiplier"], state["method"], bool(state["local"]), state["rounds"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"accountant state is incomplete or malformed ({type(e).__name__}: {e})") from None


def calibrate(
    target_epsilon: float,
    delta: float,
    sampling: Sampling,
    rounds: int,
    *,
    method: str | None = None,
    local: bool = False,
    rtol: float = 0.01,
) -> float:
    """The smallest noise multiplier z whose epsilon after `rounds` rounds is <= target_epsilon.

    Bisection on log z over the same accountant the run uses (so the run's epsilon after its
    last round is exactly the one checked here), stopped once epsilon is within `rtol` below
    the target. Epsilon falls as z grows (the subsampled Gaussian is monotone in its noise).

    Raises:
        ConfigError: a bad target, delta or rounds, or a target so loose that it needs
            z < MIN_CALIBRATED_NOISE (about no noise at all).
    """
    check_epsilon(target_epsilon)
    check_delta(delta)
    _check_rounds(rounds, 1)
    if not 0 < rtol < 1:
        raise ConfigError(f"rtol must be in (0, 1), got {rtol}")

    def epsilon(z: float) -> float:
        return Accountant(sampling, z, method, local).epsilon_after(rounds, delta)

    # Bracket [lo, hi] with epsilon(lo) > target >= epsilon(hi), from z = 1 (epsilon is cached).
    lo = hi = 1.0
    if epsilon(hi) > target_epsilon:
        while epsilon(hi) > target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 2**20:
                raise ConfigError(f"target epsilon {target_epsilon} is out of reach (noise multiplier > 2^20)")
    else:
        while epsilon(lo) <= target_epsilon:
            if lo <= MIN_CALIBRATED_NOISE:
                raise ConfigError(
                    f"target epsilon {target_epsilon} needs a noise multiplier below "
                    f"{MIN_CALIBRATED_NOISE}, which protects nothing: choose a smaller target"
                )
            hi, lo = lo, max(lo / 2, MIN_CALIBRATED_NOISE)
    eps_hi = epsilon(hi)
    while eps_hi < (1 - rtol) * target_epsilon and hi / lo > 1 + 1e-9:
        mid = math.sqrt(lo * hi)
        eps_mid = epsilon(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi
