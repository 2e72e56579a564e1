"""The engines on a CUDA device, with the data on it (skipped where there is none).

Run these on a machine with a GPU: `pytest tests/engines/test_cuda.py`.
"""

import json

import numpy as np
import pytest
import torch
from helpers import blobs
from torch import nn

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.cli import main
from fedforge.engines import SequentialEngine, VectorizedEngine
from fedforge.strategies import Scaffold

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

UNEQUAL = [np.arange(0, 3), np.arange(3, 20), np.arange(20, 61), np.arange(61, 62), np.arange(62, 160)]


def build(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 4))


def run(engine, device, act=nn.ReLU, strategy=None):
    data = FederatedData(blobs(160), UNEQUAL, blobs(100, seed=1)).to(device)
    return simulate(
        build(act).to(device),
        data,
        rounds=3,
        clients_per_round=4,
        engine=engine,
        seed=1,
        client=ClientConfig(batch_size=8, lr=0.05, momentum=0.5),
        strategy=strategy,
    )


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh], ids=["kernel", "torch.func"])
def test_engines_agree_on_cuda(act):
    sequential = run(SequentialEngine(), "cuda", act, Scaffold())
    vectorized = run(VectorizedEngine(), "cuda", act, Scaffold())
    assert sequential.history.column("clients") == vectorized.history.column("clients")
    for name, value in sequential.state.params.items():
        assert value.device.type == "cuda" and vectorized.state.params[name].device.type == "cuda"
        torch.testing.assert_close(vectorized.state.params[name], value)


def test_cuda_run_equals_the_cpu_run():
    cpu, cuda = run(SequentialEngine(), "cpu"), run(VectorizedEngine(), "cuda")
    assert cpu.history.column("clients") == cuda.history.column("clients")
    for name, value in cpu.state.params.items():
        torch.testing.assert_close(cuda.state.params[name].cpu(), value, rtol=1e-4, atol=1e-5)


def test_run_command_on_cuda(tmp_path):
    code = main(
        [
            "run",
            "-q",
            "--dataset",
            "synthetic",
            "--model",
            "logreg",
            "--rounds",
            "2",
            "--device",
            "cuda",
            "--out-dir",
            str(tmp_path),
            "--name",
            "gpu",
        ]
    )
    assert code == 0
    rounds = json.loads((tmp_path / "gpu" / "history.json").read_text())["rounds"]
    assert len(rounds) == 3 and rounds[-1]["test_accuracy"] > 0.3
