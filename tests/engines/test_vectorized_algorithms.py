"""The vectorized engine runs every client algorithm batched, and its runs equal the sequential one's.

In float64, so that the final weights and what each client keeps (its personal entries, its
algorithm's state, Ditto's copy) agree to 1e-10: a client's row mixed with another's, a phase
started from the wrong model or a state kept from the wrong phase cannot hide in round-off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from helpers import blobs
from torch import nn

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.algorithms import ClientAlgorithm, Ditto, FedBN, FedPer, FedRep, Roles
from fedforge.data import TensorData, dirichlet
from fedforge.engines import SequentialEngine, VectorizedEngine
from fedforge.errors import ConfigError
from fedforge.scenarios import Scenario
from fedforge.strategies import FedDyn, FedProx, Scaffold
from fedforge.tasks import make_task


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Pull(ClientAlgorithm):
    """A loss term of a test's own, not linear in the parameters: sum cosh(w - w_received), scaled
    down by the rounds the client has trained (its state), which `finish` counts."""

    scale: float = 0.05
    name: ClassVar[str] = "pull"

    def init_state(self, shared):
        return {"steps": torch.zeros((), dtype=torch.float64)}

    def loss_term(self, phase, params, received, state, inputs):
        pull = sum(torch.cosh(params[n] - received[n]).sum() for n in params)
        return self.scale / (1.0 + state["steps"]) * pull

    def finish(self, received, trained, state, inputs, steps, lr):
        return {"steps": state["steps"] + steps}, {}


class NotScalar(ClientAlgorithm):
    name: ClassVar[str] = "not-scalar"

    def loss_term(self, phase, params, received, state, inputs):
        return torch.stack([(p - received[n]).pow(2).sum() for n, p in params.items()])


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 4),
    ).double()


def mlp_data():
    data = blobs(480, num_classes=4, dim=8, seed=1)
    return TensorData(data.x.double(), data.y)


def cnn_data():
    data = mlp_data()  # the blobs as 8x8 images: their 8 features along the diagonal
    x = torch.zeros(len(data), 1, 8, 8, dtype=torch.float64)
    x[:, 0, torch.arange(8), torch.arange(8)] = data.x
    return TensorData(x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)), data.y)


DATA = {"mlp": (mlp, mlp_data), "cnn": (cnn, cnn_data)}

# (name, strategy, client algorithm): the strategies bring their own.
ALGORITHMS = [
    ("fedprox", FedProx(proximal_mu=0.3), None),
    ("scaffold", Scaffold(), None),
    ("feddyn", FedDyn(feddyn_alpha=0.1), None),
    ("ditto", None, Ditto(lam=0.2, epochs=2)),
    ("fedper", None, FedPer()),
    ("fedrep", None, FedRep(head_epochs=2)),
    ("fedbn", None, FedBN()),
    ("frozen", None, ClientAlgorithm(roles=Roles(frozen=("0.*",)))),
    ("pull", None, Pull()),
    ("pull-frozen", None, Pull(roles=Roles(frozen=("0.*",)))),  # a loss term, differentiated outside vmap
]


def run(engine, model_name, strategy, algorithm, *, scenario=Scenario(), rounds=3, **client):
    make_model, make_data = DATA[model_name]
    data = make_data()
    parts = dirichlet(data.y.numpy(), 8, alpha=0.5, rng=np.random.default_rng(0))
    kept = {}

    def on_client(update):
        kept[update.client_id] = update.client_state

    config = ClientConfig(**{"lr": 0.05, "batch_size": 16, "local_epochs": 1, **client})
    if algorithm is not None:
        config = dataclasses.replace(config, algorithm=algorithm)
    result = simulate(
        make_model(),
        FederatedData(data, parts, None),
        rounds=rounds,
        clients_per_round=4,
        client=config,
        strategy=strategy,
        engine=engine,
        seed=3,
        scenario=scenario,
        on_client=on_client,
    )
    return result, kept


def assert_same(a, b, rtol=1e-10, atol=1e-10):
    (ra, kept_a), (rb, kept_b) = a, b
    assert ra.history.column("clients") == rb.history.column("clients")
    assert ra.state.params.keys() == rb.state.params.keys()
    for name, value in ra.state.params.items():
        torch.testing.assert_close(rb.state.params[name], value, rtol=rtol, atol=atol, msg=name)
    for x, y in zip(ra.history.records[1:], rb.history.records[1:], strict=True):
        assert x.train_accuracy == y.train_accuracy
        assert x.train_loss == pytest.approx(y.train_loss, rel=1e-9)
    assert kept_a.keys() == kept_b.keys()
    for client, state in kept_a.items():
        other = kept_b[client]
        assert (state is None) == (other is None), client
        if state is not None:
            flat, other_flat = state.flat(), other.flat()
            assert flat.keys() == other_flat.keys()
            for name, value in flat.items():
                torch.testing.assert_close(other_flat[name], value, rtol=rtol, atol=atol, msg=f"{client} {name}")


KERNELS = {"mlp": "fastmlp", "cnn": "fastconv"}


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize(("name", "strategy", "algorithm"), ALGORITHMS, ids=[a[0] for a in ALGORITHMS])
def test_every_algorithm_is_batched_and_agrees_with_sequential(model_name, name, strategy, algorithm):
    engine = VectorizedEngine()
    vectorized = run(engine, model_name, strategy, algorithm)
    sequential = run(SequentialEngine(), model_name, strategy, algorithm)
    assert_same(vectorized, sequential)
    # fastmlp trains every parameter, without a loss term: the others go through torch.func.
    whole = name not in ("fedrep", "frozen", "pull", "pull-frozen")
    kernel = KERNELS[model_name] if model_name == "cnn" or whole else "torch.func"
    assert str(engine.choice) == f"vectorized ({kernel} kernel)"
    if name not in ("fedprox", "frozen") and (name, model_name) != ("fedbn", "mlp"):  # these keep nothing
        assert any(state is not None for state in vectorized[1].values())


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("name", ["scaffold", "ditto", "fedrep", "pull"])
def test_stragglers_and_momentum(model_name, name):
    # Stragglers stop early in each phase: the phases' stacks are sorted differently.
    strategy, algorithm = next((s, a) for n, s, a in ALGORITHMS if n == name)
    scenario = Scenario(straggler_fraction=0.5)
    vectorized = run(VectorizedEngine(), model_name, strategy, algorithm, scenario=scenario, momentum=0.9)
    assert_same(vectorized, run(SequentialEngine(), model_name, strategy, algorithm, scenario=scenario, momentum=0.9))


@pytest.mark.parametrize("name", ["scaffold", "fedper", "fedrep"])
def test_adam_with_kept_optimizer_state_one_client_a_chunk(name):
    # Chunks of one client (unbatched by torch.func where nothing but the trained parameters is
    # stacked); the optimizer state kept is the first phase's (FedRep's head's).
    strategy, algorithm = next((s, a) for n, s, a in ALGORITHMS if n == name)
    task = dataclasses.replace(make_task("classification", optimizer="adam"), keep_optimizer_state=True)
    options = {"task": task, "lr": 0.01}
    vectorized = run(VectorizedEngine(max_memory=1), "mlp", strategy, algorithm, **options)
    sequential = run(SequentialEngine(), "mlp", strategy, algorithm, **options)
    assert_same(vectorized, sequential)


def test_a_loss_term_that_is_not_a_scalar_is_a_one_line_error():
    for engine in (VectorizedEngine(), SequentialEngine()):
        with pytest.raises(ConfigError, match="loss_term must return a scalar tensor, got \\(6,\\)"):
            run(engine, "cnn", None, NotScalar(), rounds=1)
