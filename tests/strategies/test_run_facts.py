"""Run facts reach strategies through `init(params, run)`: the Python API and the command line agree."""

import pytest
import torch

import fedforge as ff
from fedforge.cli import main
from fedforge.config import Config
from fedforge.experiment import load
from fedforge.models import build_model
from fedforge.strategies import RunInfo, Scaffold

FLAGS = {
    "dataset": "synthetic",
    "num_clients": 6,
    "clients_per_round": 3,
    "model": "logreg",
    "rounds": 3,
    "batch_size": 10,
    "lr": 0.05,
    "momentum": 0.5,
    "local_epochs_dist": "uniform:1:3",
}


@pytest.mark.parametrize("strategy", ["scaffold", "fednova", "qfedavg"])
def test_python_api_equals_the_command_line(tmp_path, strategy):
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    assert (
        main(
            [
                "run",
                "-q",
                *argv,
                "--strategy",
                strategy,
                "--engine",
                "sequential",
                "--out-dir",
                str(tmp_path),
                "--name",
                "cli",
            ]
        )
        == 0
    )
    from_cli = torch.load(tmp_path / "cli" / "model.pt")

    config = Config(**FLAGS, strategy=strategy)
    dataset, data = load(config, progress=False)
    model = build_model("logreg", dataset.input_shape, dataset.num_classes, seed=0)
    result = ff.simulate(
        model,
        data,
        rounds=3,
        clients_per_round=3,
        strategy=ff.make_strategy(strategy),
        client=ff.ClientConfig(batch_size=10, lr=0.05, momentum=0.5),
        scenario=config.scenario(),
        engine=ff.SequentialEngine(),
        seed=0,
    )
    assert result.state.run == RunInfo(num_clients=6, client_lr=0.05, client_momentum=0.5)
    for name, value in from_cli.items():
        torch.testing.assert_close(result.state.params[name], value)


def test_a_state_without_run_facts_is_refused_by_name():
    state = ff.ServerState({"w": torch.zeros(1)})
    with pytest.raises(ff.ConfigError, match="scaffold needs the run"):
        Scaffold().aggregate(state, [])
