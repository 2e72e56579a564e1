"""Differential privacy in the round loop: clipping end to end, the budget stop, resume, sampling."""

from __future__ import annotations

import pytest
import torch

from fedforge.cli import main
from fedforge.config import Config
from fedforge.experiment import run_experiment
from fedforge.privacy import Accountant, PoissonSampling

BASE = dict(
    dataset="synthetic",
    num_clients=30,
    clients_per_round=10,
    model="logreg",
    batch_size=10,
    lr=0.5,
    local_epochs=3,
    delta=1e-3,
)


def _run(tmp_path, name, **settings):
    config = Config(**{**BASE, "out_dir": str(tmp_path), "name": name, **settings})
    return run_experiment(config, progress=False, verbose=False)


@pytest.mark.parametrize("mode", ["central", "client"])
def test_the_global_model_moves_by_at_most_the_clip_bound(tmp_path, mode):
    """With almost no noise, the mean of updates clipped to C moves the model by at most C; the
    same round without privacy moves it further (so the bound is the clipping's doing)."""
    from fedforge.experiment import load
    from fedforge.models import build_model

    config = Config(**{**BASE, "out_dir": str(tmp_path), "rounds": 1})
    initial = build_model("logreg", load(config, progress=False)[0].input_shape, 10, seed=0).state_dict()

    def moved(name, **settings):
        state = _run(tmp_path, name, rounds=1, **settings).state.params
        return torch.sqrt(sum(((state[k] - initial[k]) ** 2).sum() for k in initial)).item()

    assert moved("plain") > 2.0
    assert moved(f"dp-{mode}", dp=mode, clip=0.25, noise_multiplier=1e-6) <= 0.25 * (1 + 1e-4)


def test_the_server_clips_no_honest_local_update(tmp_path):
    """--dp local: the server's bound on each update (`local_bound`, passed by an honest update
    with probability 1e-9) leaves every honest update as it is, so the run is what it was without it."""
    outcome = _run(tmp_path, "local", rounds=3, dp="local", noise_multiplier=0.5, clip=0.5)
    records = [r for r in outcome.history.records if r.round > 0]
    assert len(records) == 3 and all(r.metrics["over_bound"] == 0 for r in records)


def test_the_run_stops_before_it_would_pass_its_budget(tmp_path):
    outcome = _run(
        tmp_path,
        "budget",
        rounds=50,
        dp="client",
        noise_multiplier=1.0,
        target_epsilon=2.0,
        sampling="poisson",
        clip=0.5,
    )
    spent = [r.metrics["epsilon"] for r in outcome.history.records]
    done = outcome.history.final.round
    assert 1 <= done < 50 and spent[-1] <= 2.0
    accountant = Accountant(PoissonSampling(10 / 30, 30), 1.0)
    assert accountant.epsilon_after(done + 1, 1e-3) > 2.0  # one more round would have passed it
    assert spent == pytest.approx([accountant.epsilon_after(r, 1e-3) for r in range(done + 1)], rel=1e-9)
    assert (tmp_path / "budget" / "model.pt").exists() and (tmp_path / "budget" / "accuracy.png").exists()


def test_poisson_sampling_varies_the_cohort_and_the_noise_is_calibrated(tmp_path):
    # RDP: PLD's calibration under Poisson sampling takes 9 s (test_accountant.py checks it).
    outcome = _run(tmp_path, "poisson", rounds=4, dp="client", target_epsilon=4.0, sampling="poisson", accountant="rdp")
    sizes = {len(r.clients) for r in outcome.history.records[1:]}
    assert len(sizes) > 1  # each client joins with probability 1/3: the cohort size varies
    z = outcome.state.privacy.accountant.noise_multiplier
    final = Accountant(PoissonSampling(10 / 30, 30), z, method="rdp").epsilon_after(4, 1e-3)
    assert 0.98 * 4.0 <= final <= 4.0 and outcome.history.final.metrics["epsilon"] == pytest.approx(final)


def test_resume_continues_the_accountant_and_the_clip_bound_exactly(tmp_path):
    settings = dict(dp="central", noise_multiplier=0.8, adaptive_clip=True, clip=0.3, sampling="poisson")
    whole = _run(tmp_path, "whole", rounds=4, **settings)
    _run(tmp_path, "cut", rounds=2, **settings)
    config = Config(**{**BASE, "out_dir": str(tmp_path), "name": "cut", "rounds": 4, **settings})
    resumed = run_experiment(config, progress=False, verbose=False, resume=True)
    for k, v in whole.state.params.items():
        torch.testing.assert_close(resumed.state.params[k], v)
    assert resumed.history.column("epsilon") == whole.history.column("epsilon")
    assert resumed.history.column("clip") == whole.history.column("clip")
    assert len(set(whole.history.column("clip"))) > 1  # adaptive: the bound moved


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dp", "client", "--target-epsilon", "0"], "target epsilon must be > 0, got 0.0"),
        (["--dp", "client", "--target-epsilon", "1", "--delta", "0.2"], "delta must be < 1/num_clients = 0.1, got 0.2"),
        (["--dp", "client", "--noise-multiplier", "1", "--clip", "0"], "clip bound must be > 0, got 0.0"),
        (
            ["--dp", "client", "--noise-multiplier", "1", "--strategy", "krum"],
            "differential privacy cannot serve strategy 'krum': Krum compares the updates with each other",
        ),
        (["--dp", "client"], "differential privacy needs a target epsilon (--target-epsilon) or a noise multiplier"),
        (["--target-epsilon", "1"], "target_epsilon and noise_multiplier are for differential privacy: add --dp"),
    ],
)
def test_bad_privacy_settings_are_one_line(tmp_path, capsys, flags, message):
    assert main(["run", "-q", "--dataset", "synthetic", "--num-clients", "10", "--out-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
