import dataclasses
import math

import pytest
import torch

from fedforge.client import ClientConfig
from fedforge.config import Config
from fedforge.errors import ConfigError
from fedforge.history import History
from fedforge.schedules import Constant, Cosine, Exponential, Step, parse_schedule


def values(schedule, rounds, lr):
    return [schedule(r, rounds, lr) for r in range(1, rounds + 1)]


def torch_values(make, rounds, lr):
    """The lr torch's scheduler `make(optimizer)` gives epochs 0..rounds-1 (round r is epoch r - 1)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = make(optimizer)
    out = []
    for _ in range(rounds):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_constant():
    assert values(Constant(), 4, 0.1) == [0.1] * 4


def test_step_by_hand():
    assert values(Step(step_size=2, gamma=0.5), 5, 0.8) == [0.8, 0.8, 0.4, 0.4, 0.2]
    assert values(Step(step_size=1, gamma=0.1), 3, 1.0) == pytest.approx([1.0, 0.1, 0.01])


def test_exponential_by_hand():
    assert values(Exponential(gamma=0.5), 4, 0.8) == [0.8, 0.4, 0.2, 0.1]


def test_cosine_by_hand():
    # No warm-up, 4 rounds from 1.0 towards 0: (1 + cos(pi t / 4)) / 2 for t = 0..3.
    half = (1 + math.cos(math.pi / 4)) / 2
    assert values(Cosine(), 4, 1.0) == pytest.approx([1.0, half, 0.5, 1 - half])
    # Two rounds of warm-up (lr/2, lr), then 2 rounds of cosine towards min_lr 0.2: 1.0, then 0.2 + 0.8 / 2.
    assert values(Cosine(warmup=2, min_lr=0.2), 4, 1.0) == pytest.approx([0.5, 1.0, 1.0, 0.6])


@pytest.mark.parametrize(
    "schedule, make",
    [
        (Step(step_size=3, gamma=0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
        (Exponential(gamma=0.9), lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)),
        (Cosine(min_lr=0.01), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=12, eta_min=0.01)),
    ],
)
def test_as_torch_schedulers(schedule, make):
    assert values(schedule, 12, 0.1) == pytest.approx(torch_values(make, 12, 0.1), rel=1e-12)


def test_cosine_with_warmup_is_torchs_linear_then_cosine():
    warmup, rounds, lr = 3, 12, 0.1

    def make(o):
        linear = torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / warmup, total_iters=warmup - 1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=rounds - warmup, eta_min=0.001)
        return torch.optim.lr_scheduler.SequentialLR(o, [linear, cosine], milestones=[warmup])

    expected = torch_values(make, rounds, lr)
    assert values(Cosine(warmup=warmup, min_lr=0.001), rounds, lr) == pytest.approx(expected, rel=1e-12)


def test_cosine_stays_above_min_lr_zero():
    assert min(values(Cosine(warmup=1), 1000, 0.1)) > 0


def test_round_config_sets_the_rounds_lr_only():
    base = ClientConfig(lr=0.8, local_epochs=2, round=3, rounds=5)
    config = Step(step_size=2, gamma=0.5).round_config(3, base)
    assert config == dataclasses.replace(base, lr=0.4)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("constant", Constant()),
        ("step", Step()),
        ("step:step_size=5,gamma=0.5", Step(step_size=5, gamma=0.5)),
        (" exponential : gamma = 0.9 ", Exponential(gamma=0.9)),
        ("cosine:warmup=5,min_lr=0.001", Cosine(warmup=5, min_lr=0.001)),
        ("cosine:min_lr=1e-4,", Cosine(min_lr=1e-4)),
    ],
)
def test_parse(text, expected):
    assert parse_schedule(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("cosin", "unknown lr_schedule 'cosin'; did you mean 'cosine'?"),
        ("step:gama=0.5", "unknown key 'gama'; did you mean 'gamma'?"),
        ("constant:gamma=0.5", "takes no options"),
        ("step:gamma", "'gamma' is not KEY=VALUE"),
        ("step:gamma=0.5,gamma=0.4", "gamma is given twice"),
        ("step:gamma=0", "gamma must be in (0, 1]"),
        ("step:gamma=1.5", "gamma must be in (0, 1]"),
        ("exponential:gamma=-0.5", "gamma must be in (0, 1]"),
        ("exponential:gamma=nan", "gamma must be finite"),
        ("step:gamma=1e999", "gamma must be finite"),
        ("step:gamma=half", "gamma must be a number"),
        ("step:step_size=0", "step_size must be an integer >= 1"),
        ("step:step_size=1.5", "step_size must be an integer"),
        ("step:step_size=" + "9" * 5000, "characters), got 'step:step_size=9999"),
        ("cosine:warmup=-1", "warmup must be an integer >= 0"),
        ("cosine:min_lr=-0.1", "min_lr must be a number >= 0"),
        ("cosine:min_lr=inf", "min_lr must be finite"),
        ("cosine:" + "warmup=1," * 30, "at most 200 characters"),
    ],
)
def test_parse_refuses(text, message):
    with pytest.raises(ConfigError, match="lr_schedule") as e:
        parse_schedule(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_checked_against_the_run():
    with pytest.raises(ConfigError, match=r"min_lr must be in \[0, lr=0.01\], got 0.1"):
        Cosine(min_lr=0.1).check(0.01)
    with pytest.raises(ConfigError, match="warmup must be < rounds=5, got 5"):
        Cosine(warmup=5).check(0.1, rounds=5)
    with pytest.raises(ConfigError, match="reaches 0 by round 2000"):
        Exponential(gamma=0.5).check(0.1, rounds=2000)
    Cosine(warmup=4, min_lr=0.1).check(0.1, rounds=5)  # min_lr = lr: a constant lr after warm-up
    with pytest.raises(ConfigError, match="round 6 is not one of the run's 1 to 5"):
        Constant()(6, 5, 0.1)
    with pytest.raises(ConfigError, match="warmup must be < rounds=3"):
        Cosine(warmup=3)(1, 3, 0.1)  # a call checks too


# On the command line and in TOML.

BASE = ["--dataset", "synthetic", "--num-clients", "3", "--clients-per-round", "3", "--model", "logreg", "-q"]


def fedforge(capsys, *argv):
    from fedforge.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def lrs(run_dir):
    return [r.metrics.get("lr") for r in History.from_json((run_dir / "history.json").read_text()).records]


def test_a_run_follows_the_schedule_and_records_its_lr(capsys, tmp_path):
    flags = [*BASE, "--rounds", "3", "--out-dir", str(tmp_path), "--name", "s", "--lr", "0.4"]
    code, _, _ = fedforge(capsys, "run", *flags, "--lr-schedule", "step:step_size=1,gamma=0.5")
    assert code == 0
    assert lrs(tmp_path / "s") == [None, 0.4, 0.2, 0.1]
    assert "lr" in (tmp_path / "s" / "history.csv").read_text().splitlines()[0].split(",")
    assert 'lr_schedule = "step:step_size=1,gamma=0.5"' in (tmp_path / "s" / "config.toml").read_text()


def test_the_schedule_from_a_config_file(tmp_path):
    (tmp_path / "c.toml").write_text('rounds = 8\n[client]\nlr = 0.1\nlr_schedule = "cosine:warmup=2,min_lr=0.001"\n')
    config = Config.load(tmp_path / "c.toml")
    assert config.round_config() is not None
    assert config.round_config()(1, ClientConfig(lr=0.1, round=1, rounds=8)).lr == pytest.approx(0.05)
    assert Config().round_config() is None  # constant: every round the run's config


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr-schedule", "cosine:warmup=5", "--rounds", "5"], "lr_schedule cosine: warmup must be < rounds=5, got 5"),
        (["--lr-schedule", "cosine:min_lr=0.5"], r"lr_schedule cosine: min_lr must be in [0, lr=0.01], got 0.5"),
        (["--lr-schedule", "step:gamma=2"], "lr_schedule step: gamma must be in (0, 1], got 2.0"),
        (
            ["--lr-schedule", "linear"],
            "unknown lr_schedule 'linear' (choose from: constant, step, exponential, cosine)",
        ),
        (
            ["--lr-schedule", "exponential:gamma=1e-300", "--rounds", "3"],
            "lr_schedule exponential: the lr reaches 0 by round 3 (gamma is too small)",
        ),
    ],
)
def test_refused_with_one_line(capsys, tmp_path, argv, message):
    code, _, err = fedforge(capsys, "run", *BASE, "--out-dir", str(tmp_path), *argv)
    assert code != 0
    assert err.strip() == f"fedforge: error: {message}"


def test_a_config_file_value_of_the_wrong_type_is_refused(tmp_path):
    (tmp_path / "c.toml").write_text("[client]\nlr_schedule = 0.5\n")
    with pytest.raises(ConfigError, match=r"lr_schedule must be str, got 0\.5"):
        Config.load(tmp_path / "c.toml")


def test_resume_continues_the_schedule_where_it_left_off(capsys, tmp_path):
    flags = [*BASE, "--out-dir", str(tmp_path), "--lr", "0.4", "--lr-schedule", "step:step_size=2,gamma=0.5"]
    assert fedforge(capsys, "run", *flags, "--rounds", "4", "--name", "whole")[0] == 0
    assert fedforge(capsys, "run", *flags, "--rounds", "2", "--name", "part")[0] == 0
    assert fedforge(capsys, "run", "-q", "--resume", str(tmp_path / "part"), "--rounds", "4")[0] == 0
    assert lrs(tmp_path / "part") == lrs(tmp_path / "whole") == [None, 0.4, 0.4, 0.2, 0.2]
    whole, part = (torch.load(tmp_path / name / "model.pt") for name in ("whole", "part"))
    for name, value in whole.items():
        torch.testing.assert_close(part[name], value, rtol=0, atol=0)


def test_resume_for_more_rounds_is_refused_when_the_schedule_spreads_over_the_rounds(capsys, tmp_path):
    flags = [*BASE, "--out-dir", str(tmp_path), "--name", "c", "--lr-schedule", "cosine"]
    assert fedforge(capsys, "run", *flags, "--rounds", "2")[0] == 0
    code, _, err = fedforge(capsys, "run", "-q", "--resume", str(tmp_path / "c"), "--rounds", "3")
    assert code != 0
    assert "its lr_schedule cosine spreads over the run's 2 rounds (resume it with --rounds 2)" in err
