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


@pytest.mark.parametrize("name", ["simple-cnn", "resnet8"])
def test_fastconv_on_cuda_equals_the_sequential_engine(name):
    """The convolution kernel (grouped convolutions, BatchNorm statistics per client) on the GPU,
    in float64 so that cuDNN's choice of algorithm cannot hide a mistake in round-off."""
    from fedforge.data import TensorData
    from fedforge.models import build_model

    g = torch.Generator().manual_seed(0)
    data = TensorData(
        torch.randn(120, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 10, (120,), generator=g)
    )
    parts = [np.arange(0, 5), np.arange(5, 30), np.arange(30, 70), np.arange(70, 120)]
    results = []
    for engine in (SequentialEngine(), VectorizedEngine()):
        results.append(
            simulate(
                build_model(name, (1, 28, 28), 10, seed=0).double().to("cuda"),
                FederatedData(data, parts, None).to("cuda"),
                rounds=2,
                clients_per_round=4,
                engine=engine,
                seed=1,
                client=ClientConfig(batch_size=8, lr=0.02, momentum=0.9),
            )
        )
    assert results[1].history.column("clients") == results[0].history.column("clients")
    for key, value in results[0].state.params.items():
        torch.testing.assert_close(results[1].state.params[key], value, rtol=1e-9, atol=1e-9)
