from __future__ import annotations

import pytest
import torch

from fedforge.errors import ConfigError
from fedforge.privacy import FixedSizeSampling, PoissonSampling, poisson_sample


def test_poisson_sample_is_sorted_unique_and_reproducible():
    a = poisson_sample(1000, 0.1, torch.Generator().manual_seed(3))
    b = poisson_sample(1000, 0.1, torch.Generator().manual_seed(3))
    assert a == b == sorted(set(a))
    assert all(0 <= c < 1000 for c in a)


def test_poisson_sample_joins_each_client_with_probability_q():
    # 200 rounds x 500 clients = 100,000 Bernoulli(0.05) draws: std of the rate ~ 6.9e-4.
    g = torch.Generator().manual_seed(0)
    joined = sum(len(poisson_sample(500, 0.05, g)) for _ in range(200))
    assert abs(joined / 100_000 - 0.05) < 5 * (0.05 * 0.95 / 100_000) ** 0.5


def test_poisson_sample_extremes():
    assert poisson_sample(7, 1.0, torch.Generator().manual_seed(0)) == list(range(7))
    # q = 1e-6 over 10 clients: nobody joins (an empty round is a valid round).
    assert poisson_sample(10, 1e-6, torch.Generator().manual_seed(0)) == []


@pytest.mark.parametrize("q", [0, -0.1, 1.5, float("nan")])
def test_bad_rate(q):
    with pytest.raises(ConfigError, match="sampling rate q must be in"):
        poisson_sample(10, q, torch.Generator())
    with pytest.raises(ConfigError, match="sampling rate q"):
        PoissonSampling(q, 10)


def test_sampling_descriptions():
    assert PoissonSampling(0.1, 1000).expected_clients == pytest.approx(100)
    fixed = FixedSizeSampling(1000, 50)
    assert fixed.q == 0.05 and fixed.expected_clients == 50
    with pytest.raises(ConfigError, match="clients_per_round must be in"):
        FixedSizeSampling(10, 11)
