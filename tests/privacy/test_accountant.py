from __future__ import annotations

import json

import pytest
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedforge.errors import ConfigError
from fedforge.privacy import Accountant, FixedSizeSampling, PoissonSampling, calibrate, check_delta

POISSON = PoissonSampling(0.1, 1000)
DELTA = 1e-5


def direct(accountant, rounds: int, event) -> float:
    return accountant.compose(dp_event.SelfComposedDpEvent(event, rounds)).get_epsilon(DELTA)


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_poisson_epsilon_is_dp_accountings(method):
    ours = Accountant(POISSON, 1.0, method=method, rounds=100).epsilon(DELTA)
    library = PLDAccountant() if method == "pld" else RdpAccountant()
    theirs = direct(library, 100, dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0)))
    # PLD: fedforge self-composes one round's PLD, built once; PLDAccountant composes it with an
    # identity first: the same calls, equal but for float rounding.
    assert ours == pytest.approx(theirs, rel=1e-10, abs=0)
    assert 5 < ours < 10  # PLD 7.05, RDP 7.90 (dp-accounting 0.6.0)


def test_fixed_size_epsilon_is_rdp_replace_one_with_twice_the_sensitivity():
    acc = Accountant(FixedSizeSampling(1000, 100), 2.0, rounds=50)
    assert acc.method == "rdp"
    # Replacing one client moves the sum by up to 2C: multiplier z / 2 under REPLACE_ONE.
    event = dp_event.SampledWithoutReplacementDpEvent(1000, 100, dp_event.GaussianDpEvent(1.0))
    assert acc.epsilon(DELTA) == direct(RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE), 50, event)
    with pytest.raises(ConfigError, match="no PLD for fixed-size sampling"):
        Accountant(FixedSizeSampling(1000, 100), 2.0, method="pld")


def test_local_dp_is_a_gaussian_of_half_the_multiplier_every_round():
    acc = Accountant(POISSON, 20.0, local=True, rounds=30)
    assert acc.epsilon(DELTA) == direct(PLDAccountant(), 30, dp_event.GaussianDpEvent(10.0))
    # No amplification: far more than the central guarantee of the same noise.
    assert acc.epsilon(DELTA) > 10 * Accountant(POISSON, 20.0, rounds=30).epsilon(DELTA)


def test_pld_is_tighter_than_rdp_and_close():
    for z, rounds in [(1.0, 100), (2.0, 500)]:
        pld = Accountant(POISSON, z, method="pld").epsilon_after(rounds, DELTA)
        rdp = Accountant(POISSON, z, method="rdp").epsilon_after(rounds, DELTA)
        # RDP's conversion to (epsilon, delta) is lossy: it overestimates, typically by 5-20 %.
        assert pld <= rdp <= 1.3 * pld


def test_pld_agrees_with_prv_accountant():
    prv = pytest.importorskip("prv_accountant")
    from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

    mechanism = PoissonSubsampledGaussianMechanism(noise_multiplier=1.0, sampling_probability=0.1)
    lower, _, upper = prv.PRVAccountant(
        prvs=[mechanism], max_self_compositions=[100], eps_error=0.01, delta_error=1e-9
    ).compute_epsilon(delta=DELTA, num_self_compositions=[100])
    ours = Accountant(POISSON, 1.0).epsilon_after(100, DELTA)
    # PRV gives a bracket of the true epsilon; PLD is a pessimistic estimate of it, within 1e-2.
    assert lower - 0.01 <= ours <= upper + 0.01


def test_rounds_spend_and_budget():
    acc = Accountant(POISSON, 1.0)
    assert acc.epsilon(DELTA) == 0.0
    after = [acc.spend(r).epsilon(DELTA) for r in (1, 2, 10)]
    assert after == sorted(after) and after[0] > 0
    ten = acc.spend(10)
    assert ten.rounds == 10 and acc.rounds == 0
    assert ten.epsilon(DELTA) == acc.epsilon_after(10, DELTA)
    assert ten.would_exceed(ten.epsilon_after(11, DELTA) - 1e-9, DELTA)
    assert not ten.would_exceed(ten.epsilon_after(11, DELTA), DELTA)


@pytest.mark.parametrize(
    "acc",
    [
        Accountant(POISSON, 1.3, rounds=7),
        Accountant(FixedSizeSampling(50, 5), 2.0, rounds=3),
        Accountant(POISSON, 4.0, method="rdp", local=True, rounds=2),
    ],
)
def test_state_round_trip(acc):
    state = json.loads(json.dumps(acc.state()))
    back = Accountant.from_state(state)
    assert back == acc
    # A resumed run continues exactly: same epsilon now and after more rounds.
    assert back.epsilon(DELTA) == acc.epsilon(DELTA)
    assert back.spend(2).epsilon(DELTA) == acc.spend(2).epsilon(DELTA)


def test_bad_state():
    with pytest.raises(ConfigError, match="accountant state"):
        Accountant.from_state({"noise_multiplier": 1.0})
    state = Accountant(POISSON, 1.0).state()
    state["rounds"] = -1
    with pytest.raises(ConfigError, match="rounds must be an integer >= 0, got -1"):
        Accountant.from_state(state)


@pytest.mark.parametrize(
    "sampling, target, rounds, method",
    [
        (POISSON, 4.0, 50, "pld"),
        (POISSON, 1.0, 20, "rdp"),
        (FixedSizeSampling(1000, 100), 8.0, 30, None),
    ],
)
def test_calibration_meets_the_target_within_two_percent(sampling, target, rounds, method):
    z = calibrate(target, DELTA, sampling, rounds, method=method)
    eps = Accountant(sampling, z, method=method).epsilon_after(rounds, DELTA)
    assert 0.98 * target <= eps <= target
    # The smallest such z (epsilon is within 1 % of the target): 3 % less noise exceeds it.
    assert Accountant(sampling, 0.97 * z, method=method).epsilon_after(rounds, DELTA) > target


def test_calibration_refuses_a_target_that_needs_no_noise():
    with pytest.raises(ConfigError, match="protects nothing"):
        calibrate(1000.0, DELTA, PoissonSampling(0.01, 1000), 1, method="rdp")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: calibrate(0, DELTA, POISSON, 10), "target epsilon must be > 0, got 0"),
        (lambda: calibrate(-1.0, DELTA, POISSON, 10), "target epsilon must be > 0, got -1.0"),
        (lambda: calibrate(1.0, 0.0, POISSON, 10), "delta must be in \\(0, 1\\), got 0.0"),
        (lambda: calibrate(1.0, 1.0, POISSON, 10), "delta must be in \\(0, 1\\), got 1.0"),
        (lambda: calibrate(1.0, DELTA, POISSON, 0), "rounds must be an integer >= 1, got 0"),
        (lambda: calibrate(1.0, DELTA, PoissonSampling(1.2, 10), 5), "sampling rate q must be in \\(0, 1\\], got 1.2"),
        (lambda: Accountant(POISSON, 0.0), "noise_multiplier must be > 0"),
        (lambda: Accountant(POISSON, 1.0, method="gdp"), "accountant must be one of pld, rdp, got 'gdp'"),
        (lambda: Accountant(POISSON, 1.0).would_exceed(0, DELTA), "epsilon budget must be > 0, got 0"),
        (lambda: check_delta(1e-3, num_clients=1000), "delta must be < 1/num_clients = 0.001, got 0.001"),
    ],
)
def test_bad_input_is_one_line(call, message):
    with pytest.raises(ConfigError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


def test_delta_below_one_over_n_passes():
    check_delta(1e-5, num_clients=10_000)
