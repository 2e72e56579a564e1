"""Client sampling the accountant can trust: which clients take part in a round, and how.

Privacy amplification by sampling only holds for the sampling the run really used, so the
accountant takes one of these descriptions, never a bare rate:

- `PoissonSampling(q)`: each client joins each round independently with probability q (the
  sampling of DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent
  Language Models"). The cohort size varies; the expected size is q * N.
- `FixedSizeSampling(num_clients, clients_per_round)`: k distinct clients drawn uniformly
  without replacement (fedforge's usual selection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError


def _check_rate(q: float) -> None:
    if not (isinstance(q, (int, float)) and math.isfinite(q) and 0 < q <= 1):
        raise ConfigError(f"sampling rate q must be in (0, 1], got {q}")


@dataclass(frozen=True)
class PoissonSampling:
    """Each of `num_clients` clients joins a round independently with probability `q`."""

    q: float
    num_clients: int

    def __post_init__(self):
        _check_rate(self.q)
        if self.num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {self.num_clients}")

    @property
    def expected_clients(self) -> float:
        """q * N: what the noisy sum is divided by (never the actual count, which is private)."""
        return self.q * self.num_clients


@dataclass(frozen=True)
class FixedSizeSampling:
    """`clients_per_round` distinct clients out of `num_clients`, uniformly without replacement."""

    num_clients: int
    clients_per_round: int

    def __post_init__(self):
        if self.num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {self.num_clients}")
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ConfigError(f"clients_per_round must be in [1, {self.num_clients}], got {self.clients_per_round}")

    @property
    def q(self) -> float:
        return self.clients_per_round / self.num_clients

    @property
    def expected_clients(self) -> float:
        return float(self.clients_per_round)


Sampling = PoissonSampling | FixedSizeSampling


def poisson_sample(num_clients: int, q: float, generator: torch.Generator) -> list[int]:
    """The clients of one Poisson-sampled round: each of `num_clients` joins with probability `q`.

    The list is sorted and may be empty. A round with no client is still a round: the privacy
    stage adds its noise to an empty sum and the accountant counts it, because skipping it would
    reveal that nobody was sampled (and the accountant's analysis assumes every round releases).

    Args:
        generator: the round's selection stream (`_seeding.generator(seed, SELECTION, round)`).
    """
    _check_rate(q)
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    joined = torch.rand(num_clients, generator=generator, dtype=torch.float64) < q
    return torch.nonzero(joined).flatten().tolist()
