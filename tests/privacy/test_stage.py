from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from fedforge.client import ClientUpdate
from fedforge.errors import ConfigError
from fedforge.privacy import PrivacyConfig, PrivacyState, check_strategy, clip_delta, l2_norm, local_bound, privatize
from fedforge.privacy.stage import privatize_update


def update(client_id: int, **delta: torch.Tensor) -> ClientUpdate:
    return ClientUpdate(
        client_id=client_id, delta=delta, num_examples=10 + client_id, num_steps=1, train_loss=0.0, train_accuracy=None
    )


def test_mean_is_the_clipped_sum_over_the_expected_cohort():
    like = {"w": torch.zeros(2), "n": torch.tensor(0)}
    updates = [
        update(0, w=torch.tensor([3.0, 4.0]), n=torch.tensor(5)),  # norm 5 -> clipped to 1
        update(1, w=torch.tensor([0.5, 0.0]), n=torch.tensor(2)),
    ]  # within the bound
    config = PrivacyConfig(noise_multiplier=0.0, expected_clients=10, mode="central", clip=1.0)
    mean, state, info = privatize(iter(updates), like, PrivacyState.initial(config), config, torch.Generator())
    # Divided by m = 10 (expected), not by the 2 that came; every client counts once, whatever its examples.
    torch.testing.assert_close(mean["w"], torch.tensor([0.6 + 0.5, 0.8]) / 10, rtol=1e-5, atol=0)
    assert mean["n"].dtype == torch.int64 and mean["n"].item() == 0  # integer buffers are not released
    assert state == PrivacyState(1.0) and info.num_updates == 2 and info.unclipped_estimate is None


def test_aggregate_noise_has_std_z_c_over_m():
    # 200 seeded rounds x 1000 coordinates = 200,000 draws of N(0, (z C / m)^2) around the clipped mean.
    z, clip, m = 1.5, 2.0, 8.0
    config = PrivacyConfig(noise_multiplier=z, expected_clients=m, mode="central", clip=clip)
    like = {"w": torch.zeros(1000, dtype=torch.float64)}
    g = torch.Generator().manual_seed(0)
    raw = [torch.randn(1000, generator=g, dtype=torch.float64) * s for s in (0.01, 1.0, 10.0)]
    expected = sum(clip_delta({"w": r}, clip)[0]["w"] for r in raw) / m
    errors = []
    for seed in range(200):
        updates = (update(i, w=r) for i, r in enumerate(raw))
        mean, _, info = privatize(updates, like, PrivacyState(clip), config, torch.Generator().manual_seed(seed))
        errors.append(mean["w"] - expected)
    errors = torch.cat(errors)
    n, sigma = errors.numel(), z * clip / m
    assert info.noise_std == z * clip
    # sum(e^2) / sigma^2 ~ chi-square(n): a two-sided 99.9 % acceptance interval.
    statistic = float((errors**2).sum()) / sigma**2
    assert stats.chi2.ppf(0.0005, n) < statistic < stats.chi2.ppf(0.9995, n)
    assert abs(float(errors.mean())) < 4 * sigma / math.sqrt(n)


def test_an_empty_round_is_still_noised():
    config = PrivacyConfig(noise_multiplier=1.0, expected_clients=5, clip=0.5)
    mean, _, info = privatize(
        [], {"w": torch.zeros(10_000)}, PrivacyState(0.5), config, torch.Generator().manual_seed(0)
    )
    assert info.num_updates == 0
    assert float(mean["w"].std()) == pytest.approx(1.0 * 0.5 / 5, rel=0.05)


def test_client_mode_equals_central_mode():
    """Clients clip (with the round's C), the server only noises: the same mean and the same adaptive step."""
    g = torch.Generator().manual_seed(1)
    raw = [update(i, w=torch.randn(20, generator=g) * (0.2 + i), n=torch.tensor(i)) for i in range(6)]
    like = {"w": torch.zeros(20), "n": torch.tensor(0)}
    results = {}
    for mode in ("central", "client"):
        config = PrivacyConfig(
            noise_multiplier=1.0, expected_clients=6, mode=mode, clip=2.0, adaptive=True, count_stddev=1.0
        )
        sent = [privatize_update(u, config, 2.0) for u in raw]
        if mode == "client":
            assert all(l2_norm(u.delta) <= 2.0 for u in sent)
        results[mode] = privatize(sent, like, PrivacyState(2.0), config, torch.Generator().manual_seed(7))
    (mean_a, state_a, info_a), (mean_b, state_b, info_b) = results["central"], results["client"]
    torch.testing.assert_close(mean_a, mean_b)
    assert state_a == state_b and info_a == info_b


def test_local_mode_clients_noise_and_the_server_only_averages():
    z, clip, k, m = 2.0, 1.0, 50, 50.0
    config = PrivacyConfig(noise_multiplier=z, expected_clients=m, mode="local", clip=clip)
    raw = [update(i, w=torch.ones(4000) * 10, n=torch.tensor(3)) for i in range(k)]
    sent = [privatize_update(u, config, clip, torch.Generator().manual_seed(i)) for i, u in enumerate(raw)]
    assert all(u.delta["n"].item() == 0 for u in sent)  # nothing outside the guarantee leaves the client
    mean, _, info = privatize(
        sent, {"w": torch.zeros(4000), "n": torch.tensor(0)}, PrivacyState(clip), config, torch.Generator()
    )
    assert info.noise_std == 0.0
    clipped = clip / math.sqrt(4000)  # each client's clipped coordinate
    residual = mean["w"] - k * clipped / m
    # k clients' noise of std z C, summed and divided by m: std z C sqrt(k) / m (4000 draws: ~1.1 % on the std).
    assert float(residual.std()) == pytest.approx(z * clip * math.sqrt(k) / m, rel=0.05)
    with pytest.raises(ValueError, match="generator"):
        privatize_update(raw[0], config, clip)


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_adaptive_clip_converges_to_the_target_quantile(quantile):
    # Norms ~ lognormal(0, 0.5): the gamma-quantile is exp(0.5 * Phi^-1(gamma)) (1 for the median).
    sigma, clients, rounds = 0.5, 100, 200
    target = math.exp(sigma * stats.norm.ppf(quantile))
    config = PrivacyConfig(
        noise_multiplier=0.5,
        expected_clients=clients,
        mode="central",
        clip=0.1,
        adaptive=True,
        target_quantile=quantile,
    )
    state, like = PrivacyState.initial(config), {"w": torch.zeros(1, dtype=torch.float64)}
    data, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    history = []
    for _ in range(rounds):
        norms = torch.exp(sigma * torch.randn(clients, generator=data, dtype=torch.float64))
        _, state, info = privatize((update(i, w=n.reshape(1)) for i, n in enumerate(norms)), like, state, config, noise)
        assert info.next_clip == state.clip
        history.append(math.log(state.clip))
    # From 0.1 (log 10 = 2.3 away) at eta = 0.2, it arrives within ~40 rounds; then it hovers around the target.
    assert sum(history[-100:]) / 100 == pytest.approx(math.log(target), abs=0.05)


def test_privacy_state_round_trip():
    assert PrivacyState.from_dict(PrivacyState(0.37).to_dict()) == PrivacyState(0.37)
    with pytest.raises(ConfigError, match="privacy state needs a clip bound > 0"):
        PrivacyState.from_dict({"clip": 0})


def test_strategies_that_need_raw_updates_are_refused():
    for name in ("fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi"):
        check_strategy(name)
    for name in ("median", "trimmed_mean", "krum", "multikrum", "qfedavg", "scaffold", "fednova", "mine"):
        with pytest.raises(ConfigError, match=f"cannot serve strategy '{name}'") as e:
            check_strategy(name)
        assert "\n" not in str(e.value)


def test_mismatched_update_is_refused():
    config = PrivacyConfig(noise_multiplier=1.0, expected_clients=2)
    with pytest.raises(ValueError, match="differ from the model"):
        privatize([update(0, v=torch.zeros(2))], {"w": torch.zeros(2)}, PrivacyState(1.0), config, torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_noise_on_every_device():
    # The noise is drawn on the CPU from the seeded stream, so engines on a GPU add the same noise.
    config = PrivacyConfig(noise_multiplier=1.0, expected_clients=3, clip=1.0, adaptive=True, count_stddev=1.0)
    raw = [update(i, w=torch.full((50,), 0.1 * (i + 1))) for i in range(3)]
    results = []
    for device in ("cpu", "cuda"):
        moved = [update(u.client_id, w=u.delta["w"].to(device)) for u in raw]
        mean, state, _ = privatize(
            moved, {"w": torch.zeros(50, device=device)}, PrivacyState(1.0), config, torch.Generator().manual_seed(3)
        )
        results.append((mean["w"].cpu(), state))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].clip == pytest.approx(results[1][1].clip)


def test_the_server_clips_an_update_above_what_an_honest_client_sends():
    """Local mode: a hostile client's update of norm 10^6 moves the sum by at most `local_bound`
    (not 10^6); client mode: one its client did not clip moves it by at most C. Honest updates
    pass untouched, and only the hostile one is counted."""
    z, clip, m, size = 0.5, 1.0, 3.0, 610
    like = {"w": torch.zeros(size), "n": torch.tensor(0)}
    raw = [update(i, w=torch.ones(size) * 10, n=torch.tensor(3)) for i in range(2)]
    hostile = update(2, w=torch.full((size,), 1e6 / math.sqrt(size)), n=torch.tensor(0))
    for mode, bound in [("local", local_bound(clip, z, size)), ("client", clip)]:
        config = PrivacyConfig(noise_multiplier=z if mode == "local" else 0.0, expected_clients=m, mode=mode, clip=clip)
        honest = [privatize_update(u, config, clip, torch.Generator().manual_seed(i)) for i, u in enumerate(raw)]
        assert all(l2_norm(u.delta) <= bound for u in honest)
        alone, _, honest_info = privatize(honest, like, PrivacyState(clip), config, torch.Generator().manual_seed(0))
        torch.testing.assert_close(alone["w"], sum(u.delta["w"] for u in honest) / m)  # nothing honest is clipped
        mean, _, info = privatize(
            [*honest, hostile], like, PrivacyState(clip), config, torch.Generator().manual_seed(0)
        )
        assert l2_norm({"w": mean["w"] - alone["w"]}) <= bound / m
        assert l2_norm({"w": mean["w"] - alone["w"]}) == pytest.approx(bound / m, rel=1e-5)
        assert honest_info.over_bound == 0 and info.over_bound == 1 and info.num_updates == 3
