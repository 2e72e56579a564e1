"""Which engine trained the clients, and why: AutoEngine's pick and the vectorized engine's fallback as data."""

import dataclasses

import torch
from torch import nn

from fedforge import ClientConfig
from fedforge.data import TensorData
from fedforge.engines import AutoEngine, ClientTask, EngineChoice, SequentialEngine, VectorizedEngine, engine_choice
from fedforge.models import build_model
from fedforge.tasks import REGRESSION

ADAM = ClientConfig(batch_size=8, task=REGRESSION.with_optimizer("adam"))


def _tasks(x_shape=(5,), n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *x_shape, generator=g)
    return [ClientTask(0, TensorData(x, x.flatten(1).sum(1)), seed=0)]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_auto_says_what_it_picked_and_why():
    engine = AutoEngine()
    assert engine.choice is None  # before any round
    tasks = _tasks()
    mlp = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    engine.choose(mlp, tasks, ADAM)
    assert engine.choice == EngineChoice("vectorized")
    own_loop = ClientConfig(task=dataclasses.replace(REGRESSION, train=lambda model, batches, config: None))
    engine.choose(mlp, tasks, own_loop)
    assert str(engine.choice) == (
        "sequential (the vectorized engine cannot batch this model or task: "
        "task regression trains with a loop of its own)"
    )
    rmsprop = ClientConfig(task=dataclasses.replace(REGRESSION, optimizer=torch.optim.RMSprop))
    engine.choose(mlp, tasks, rmsprop)
    assert engine.choice.engine == "sequential" and "RMSprop is not one of fedforge's optimizer rules" in (
        engine.choice.reason
    )
    cnn = build_model("simple-cnn", (1, 28, 28), 10)
    engine.choose(cnn, _tasks((1, 28, 28)), ClientConfig())
    assert engine.choice == EngineChoice("vectorized")  # its fastconv kernel
    unknown = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Hardswish(), nn.Flatten(), nn.Linear(2 * 26 * 26, 1))
    engine.choose(unknown, _tasks((1, 28, 28)), ClientConfig())
    assert engine.choice.engine == "sequential" and engine.choice.reason.startswith("auto: Conv2d, Hardswish")


def test_auto_reports_the_kernel_the_vectorized_engine_ran():
    engine = AutoEngine()
    mlp = build_model("mlp", (5,), 3, seed=0)
    tasks = [ClientTask(0, TensorData(torch.randn(16, 5), torch.randint(0, 3, (16,))), seed=0)]
    list(engine.run(mlp, _state(mlp), tasks, ClientConfig(batch_size=8)))
    assert engine.choice == EngineChoice("vectorized", "fastmlp kernel") and str(engine.choice) == (
        "vectorized (fastmlp kernel)"
    )
    assert engine_choice(engine) == engine.choice


def test_the_vectorized_engine_records_its_fallback():
    engine = VectorizedEngine()
    model = nn.Sequential(nn.Linear(5, 16), nn.Linear(16, 1))
    assert engine_choice(engine) == EngineChoice("vectorized")  # nothing ran yet: the engine as named
    rmsprop = ClientConfig(task=dataclasses.replace(REGRESSION, optimizer=torch.optim.RMSprop))
    updates = list(engine.run(model, _state(model), _tasks(), rmsprop))
    assert len(updates) == 1
    assert engine.choice.engine == "sequential" and "RMSprop" in engine.choice.reason
    assert engine_choice(SequentialEngine()) == EngineChoice("sequential")
