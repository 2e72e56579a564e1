from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedforge.errors import ConfigError
from fedforge.privacy import HONEST_TAIL, PrivacyConfig, add_noise, clip_delta, l2_norm, local_bound, secure_generator


def test_clip_hand_computed():
    delta = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0]), "n": torch.tensor(7)}
    clipped, norm = clip_delta(delta, 1.0)
    assert norm == 5.0  # the float entries as one vector; the integer entry is not part of it
    torch.testing.assert_close(clipped["w"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([0.8]))
    assert clipped["n"] is delta["n"]  # integer entries are left as they are
    within, norm = clip_delta(delta, 10.0)
    assert norm == 5.0 and all(within[k] is delta[k] for k in delta)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=4),
    scale=st.floats(1e-4, 1e6),
    clip=st.floats(1e-3, 1e3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31),
)
def test_every_clipped_update_has_norm_at_most_the_bound(sizes, scale, clip, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    delta = {f"p{i}": torch.randn(n, generator=g, dtype=dtype) * scale for i, n in enumerate(sizes)}
    clipped, norm = clip_delta(delta, clip)
    assert l2_norm(clipped) <= clip
    assert norm == pytest.approx(l2_norm(delta))
    if norm > clip:  # clipping scales, it does not change the direction
        assert l2_norm(clipped) == pytest.approx(clip, rel=1e-5)


def test_noise_has_the_asked_std_and_is_seeded():
    like = {"w": torch.zeros(100_000), "n": torch.zeros(3, dtype=torch.int64)}
    noised = add_noise(like, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(noised["n"], like["n"])  # integer entries get no noise
    assert noised["w"].std().item() == pytest.approx(0.5, rel=0.01)  # std of the sample std: 0.22 %
    assert torch.equal(noised["w"], add_noise(like, 0.5, torch.Generator().manual_seed(1))["w"])
    assert add_noise(like, 0.0, torch.Generator())["w"] is like["w"]


def test_secure_generator_is_not_reproducible():
    a, b = secure_generator(), secure_generator()
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))


def test_update_noise_multiplier_keeps_the_total():
    config = PrivacyConfig(noise_multiplier=1.0, expected_clients=100, adaptive=True)
    assert config.count_std == 5.0  # m / 20
    # Andrew et al. 2021, Thm. 1: z^-2 = z_update^-2 + (2 sigma_b)^-2.
    assert config.update_noise_multiplier == pytest.approx((1 - 1 / 100) ** -0.5)
    assert config.update_noise_multiplier**-2 + (2 * config.count_std) ** -2 == pytest.approx(1.0)
    assert PrivacyConfig(noise_multiplier=1.0, expected_clients=100).update_noise_multiplier == 1.0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"clip": 0.0}, "clip bound must be > 0, got 0.0"),
        ({"clip": -1.0}, "clip bound must be > 0, got -1.0"),
        ({"noise_multiplier": -0.5}, "noise_multiplier must be >= 0, got -0.5"),
        ({"expected_clients": 0}, "expected_clients must be > 0, got 0"),
        ({"mode": "server"}, "privacy mode must be one of central, client, local, got 'server'"),
        ({"adaptive": True, "mode": "local"}, "adaptive clipping needs the server to count"),
        ({"adaptive": True, "target_quantile": 1.0}, "target_quantile must be in \\(0, 1\\), got 1.0"),
        ({"adaptive": True, "clip_lr": 0.0}, "clip_lr must be > 0, got 0.0"),
        ({"adaptive": True, "count_stddev": -1.0}, "count_stddev must be > 0, got -1.0"),
        # m = 10: sigma_b = 0.5 cannot carry z = 1 (z_update would be imaginary).
        ({"adaptive": True, "expected_clients": 10}, "noise_multiplier 1.0 needs count_stddev > 0.5"),
    ],
)
def test_bad_config_is_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as e:
        PrivacyConfig(**{"noise_multiplier": 1.0, "expected_clients": 100, **options})
    assert "\n" not in str(e.value)


def test_clip_of_zero_norm_and_no_float_entries():
    zero, norm = clip_delta({"w": torch.zeros(3)}, 1.0)
    assert norm == 0.0 and torch.equal(zero["w"], torch.zeros(3))
    assert l2_norm({"n": torch.tensor(3)}) == 0.0
    assert math.isfinite(l2_norm({"w": torch.full((10,), 1e30)}))  # float64 accumulation


@pytest.mark.parametrize("size", [1, 610, 100_000])
def test_local_bound_is_the_chi_square_tail_it_documents(size):
    z, clip = 0.7, 2.0
    bound = local_bound(clip, z, size)
    # The noise's norm past bound - C: the exact chi-square tail is below e^-x = 1e-9 (Laurent-Massart) ...
    assert pytest.approx(math.log(1e9)) == HONEST_TAIL
    tail = stats.chi2.sf(((bound / clip - 1) / z) ** 2, size)
    assert tail <= 1e-9
    # ... and the bound is close to the exact 1e-9 quantile, so a hostile update gains little over an honest one.
    exact = clip * (1 + z * math.sqrt(stats.chi2.isf(1e-9, size)))
    assert bound / exact < (1.6 if size == 1 else 1.02)


def test_honest_local_updates_stay_within_a_looser_local_bound_as_often_as_it_says():
    # Clipped to C, noised with std z C: at x = 2 the bound may be passed with probability <= e^-2 = 0.135.
    z, clip, size, draws = 0.5, 1.0, 50, 20_000
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(draws, size, generator=g, dtype=torch.float64)
    clipped = raw / raw.norm(dim=1, keepdim=True) * clip
    noised = clipped + torch.randn(draws, size, generator=g, dtype=torch.float64) * z * clip
    over = float((noised.norm(dim=1) > local_bound(clip, z, size, tail=2.0)).double().mean())
    assert over <= math.exp(-2)
    assert float((noised.norm(dim=1) > local_bound(clip, z, size)).sum()) == 0
