"""The vectorized engine against the sequential one: same clients, same batches, same weights."""

import itertools
import logging

import numpy as np
import pytest
import torch
from helpers import assert_same_run as assert_same
from helpers import blobs
from torch import nn

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.client import epoch_orders
from fedforge.data import TensorData, quantity
from fedforge.engines import ClientTask, SequentialEngine, VectorizedEngine
from fedforge.engines.vectorized import DEFAULT_MAX_MEMORY, build_schedule
from fedforge.errors import DivergenceError
from fedforge.models import build_model
from fedforge.reductions import PartialSum, combine_updates
from fedforge.scenarios import Scenario
from fedforge.strategies import FedProx, QFedAvg, Scaffold


def images(n, seed):
    """Small 28x28 'images' whose class is visible, for the built-in image models."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.5
    x[torch.arange(n), 0, y, y] += 3.0
    return TensorData(x, y)


def seeded(*layers):
    """A model factory whose every call gives the same initial weights."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(*[layer() for layer in layers])

    return build


def run_both(model_fn, data, partition, *, rounds=2, clients_per_round=3, strategy=None, scenario=Scenario(), **client):
    config = ClientConfig(**{"batch_size": 8, "lr": 0.05, **client})
    results = []
    for engine in (SequentialEngine(), VectorizedEngine()):
        results.append(
            simulate(
                model_fn(),
                FederatedData(data, partition, None),
                rounds=rounds,
                clients_per_round=clients_per_round,
                client=config,
                engine=engine,
                seed=1,
                strategy=strategy,
                scenario=scenario,
            )
        )
    return results


EQUAL = [np.arange(i * 40, (i + 1) * 40) for i in range(5)]
UNEQUAL = [np.arange(0, 3), np.arange(3, 20), np.arange(20, 61), np.arange(61, 62), np.arange(62, 160)]


@pytest.mark.parametrize("name", ["mlp", "2nn", "logreg", "cnn"])
@pytest.mark.parametrize("partition", [EQUAL, UNEQUAL], ids=["equal", "unequal"])
def test_built_in_models(name, partition):
    data = images(200, seed=0)
    results = run_both(
        lambda: build_model(name, (1, 28, 28), 10, seed=0), data, partition, local_epochs=2, momentum=0.9, lr=0.01
    )
    assert_same(*results)


@pytest.mark.parametrize(
    "client",
    [
        {},
        {"local_epochs": 3},
        {"momentum": 0.5, "weight_decay": 0.01},
        {"weight_decay": 0.1},
        {"batch_size": 1},
        {"batch_size": 500},
    ],
)
def test_hyperparameters_on_unequal_clients(client):
    data = blobs(160, dim=8)
    model = seeded(lambda: nn.Linear(8, 16), nn.ReLU, lambda: nn.Linear(16, 4))
    assert_same(*run_both(model, data, UNEQUAL, clients_per_round=5, **client))


def test_torch_func_path_for_other_models():
    """A Tanh network is not a Linear/ReLU stack: vmap(grad(functional_call)) trains it."""
    data = blobs(160, dim=8)
    model = seeded(lambda: nn.Linear(8, 16), nn.Tanh, lambda: nn.Linear(16, 4))
    assert_same(*run_both(model, data, UNEQUAL, clients_per_round=5, momentum=0.9, local_epochs=2))


def test_model_with_buffers_stacks_them_through_torch_func():
    """BatchNorm1d's running statistics and step count are each client's own, as in the sequential engine."""
    data = blobs(200, dim=8)
    model = seeded(lambda: nn.Linear(8, 16), lambda: nn.BatchNorm1d(16), nn.ReLU, lambda: nn.Linear(16, 4))
    sizes = np.cumsum([0, 3, 18, 42, 2, 95])  # no batch of one, which BatchNorm refuses in training
    partition = [np.arange(a, b) for a, b in itertools.pairwise(sizes)]
    sequential, vectorized = run_both(model, data, partition, clients_per_round=5, momentum=0.5)
    assert_same(sequential, vectorized)
    torch.testing.assert_close(vectorized.state.params["1.running_var"], sequential.state.params["1.running_var"])
    assert vectorized.state.params["1.num_batches_tracked"] == sequential.state.params["1.num_batches_tracked"] > 0


def test_the_default_budget_bounds_a_chunk_on_the_cpu():
    data = images(400, seed=1)
    model = build_model("mlp", (1, 28, 28), 10, seed=0)
    tasks = [ClientTask(c, data.subset(np.arange(2 * c, 2 * c + 2)), seed=c) for c in range(200)]
    stacked_bytes = 2 * sum(v.numel() * v.element_size() for v in model.state_dict().values())
    size = VectorizedEngine().chunk_size(model, tasks, ClientConfig(batch_size=2))
    assert 1 < size < len(tasks)
    assert size * stacked_bytes <= DEFAULT_MAX_MEMORY["cpu"] < 2 * (size + 1) * stacked_bytes


def test_chunks_bound_memory_and_change_nothing():
    data = images(300, seed=1)
    partition = quantity(300, 12, rng=np.random.default_rng(0), sigma=1.0)
    model = build_model("mlp", (1, 28, 28), 10, seed=0)
    config = ClientConfig(batch_size=8, lr=0.05)
    engine = VectorizedEngine(max_memory=2 * 1024 * 1024)
    tasks = [ClientTask(c, data.subset(p), seed=c) for c, p in enumerate(partition)]
    assert engine.chunk_size(model, tasks, config) < len(tasks)
    assert VectorizedEngine().chunk_size(model, tasks, config) == len(tasks)
    state = model.state_dict()
    chunked = list(engine.run(model, state, tasks, config))
    whole = list(VectorizedEngine().run(model, state, tasks, config))
    sequential = list(SequentialEngine().run(model, state, tasks, config))
    for a, b, c in zip(chunked, whole, sequential, strict=True):
        assert a.client_id == b.client_id == c.client_id and a.num_steps == c.num_steps
        for name in state:
            torch.testing.assert_close(a.delta[name], c.delta[name])
            torch.testing.assert_close(b.delta[name], c.delta[name])


@pytest.mark.parametrize("model_name", ["mlp", "tanh"])
def test_combine_sums_summable_chunks_as_combine_updates_would(model_name):
    data = images(300, seed=1)
    partition = quantity(300, 12, rng=np.random.default_rng(0), sigma=1.0)
    model = (
        build_model("mlp", (1, 28, 28), 10, seed=0)
        if model_name == "mlp"
        # fastmlp / torch.func
        else seeded(nn.Flatten, lambda: nn.Linear(784, 16), nn.Tanh, lambda: nn.Linear(16, 10))()
    )
    config, state = ClientConfig(batch_size=8, lr=0.05), {k: v.clone() for k, v in model.state_dict().items()}
    tasks = [ClientTask(c, data.subset(p), seed=c, summable=True) for c, p in enumerate(partition)]
    engine = VectorizedEngine(max_memory=2 * 1024 * 1024, combine=True)
    chunks = -(-len(tasks) // engine.chunk_size(model, tasks, config))
    combined = list(engine.run(model, state, tasks, config))
    assert chunks > 1 and len(combined) == chunks and all(isinstance(u, PartialSum) for u in combined)
    mine, reference = combine_updates(combined), combine_updates(SequentialEngine().run(model, state, tasks, config))
    assert mine.client_ids == reference.client_ids == tuple(range(len(tasks)))
    assert (mine.num_examples, mine.num_steps) == (reference.num_examples, reference.num_steps)
    assert mine.metrics == pytest.approx(reference.metrics)
    for name in state:
        torch.testing.assert_close(mine.mean_delta[name], reference.mean_delta[name])
    # A client the round loop must see on its own keeps its chunk client by client.
    size = engine.chunk_size(model, tasks, config)
    alone = [ClientTask(0, data.subset(partition[0]), seed=0), *tasks[1:]]
    out = list(engine.run(model, state, alone, config))
    assert [u.client_id for u in out[:size]] == list(range(size))
    assert all(isinstance(u, PartialSum) for u in out[size:])
    # A diverged client is still named, as without combining.
    huge = TensorData(data.x * 1e38, data.y)
    diverging = [
        ClientTask(c, (huge if c == 5 else data).subset(p), seed=c, summable=True) for c, p in enumerate(partition)
    ]
    for each in (VectorizedEngine(), VectorizedEngine(combine=True)):
        with pytest.raises(DivergenceError, match=r"client 5 diverged"):
            list(each.run(model, state, diverging, config))


class ClientsTracker:
    """A tracker of our own protocol (tracking.Tracker) that keeps what it is sent."""

    def __init__(self):
        self.clients = []

    def prepare(self):
        pass

    def start(self, config, run_dir):
        return self

    def round(self, record, clients):
        self.clients.append(dict(clients))

    def finish(self, error):
        pass


def test_fedforge_run_sums_each_chunk_unless_a_tracker_wants_each_client(tmp_path, monkeypatch):
    from fedforge.config import Config
    from fedforge.experiment import run_experiment

    handed = []
    run = VectorizedEngine.run

    def spied(self, *args):
        for update in run(self, *args):
            handed.append(type(update).__name__)
            yield update

    monkeypatch.setattr(VectorizedEngine, "run", spied)
    config = Config(
        dataset="synthetic",
        num_clients=6,
        clients_per_round=4,
        model="mlp",
        batch_size=10,
        rounds=2,
        out_dir=str(tmp_path),
    )
    summed = run_experiment(config.replace(name="summed"), progress=False, verbose=False)
    assert handed == ["PartialSum"] * 2  # one chunk a round
    handed.clear()
    tracker = ClientsTracker()
    each = run_experiment(config.replace(name="each"), progress=False, verbose=False, trackers=[tracker])
    assert handed == ["ClientUpdate"] * 8
    assert [sorted(c) for c in tracker.clients] == [[], *[sorted(r.clients) for r in each.history.records[1:]]]
    for a, b in zip(summed.history.records[1:], each.history.records[1:], strict=True):  # round 0: the initial model
        assert a.clients == b.clients and a.test_loss == pytest.approx(b.test_loss, rel=1e-5)
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-6)


def test_schedule_holds_each_clients_sequential_batches():
    data = blobs(50)
    sizes = [7, 20, 1, 22]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    tasks = [
        ClientTask(c, TensorData(data.x[s : s + n], data.y[s : s + n]), seed=100 + c)
        for c, (s, n) in enumerate(zip(starts, sizes, strict=True))
    ]
    config = ClientConfig(batch_size=4, local_epochs=2)
    schedule = build_schedule(tasks, starts.tolist(), config)
    assert schedule.steps == [4, 10, 2, 12]
    assert schedule.active == [4] * 2 + [3] * 2 + [2] * 6 + [1] * 2
    for position, i in enumerate(schedule.stack_order):
        n, start = sizes[i], starts[i]
        expected = []  # the sequential engine's batches: one permutation per epoch, cut in 4s
        for order in epoch_orders(n, 2, torch.Generator().manual_seed(100 + i)):
            expected += [order[k : k + 4] + start for k in range(0, n, 4)]
        for t, batch in enumerate(expected):
            real = schedule.weight[position, t] > 0
            assert torch.equal(schedule.rows[position, t][real], batch)
            torch.testing.assert_close(schedule.weight[position, t][real], torch.full((len(batch),), 1 / len(batch)))
        assert (schedule.weight[position, len(expected) :] == 0).all()


def test_operation_vmap_cannot_batch_falls_back_at_run_time(caplog):
    """Dropout is random: vmap refuses it, and the engine trains those clients sequentially."""
    data = blobs(200, dim=8)
    model = seeded(lambda: nn.Linear(8, 16), lambda: nn.Dropout(0.2), nn.ReLU, lambda: nn.Linear(16, 4))()
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        result = simulate(
            model,
            FederatedData(data, EQUAL, data),
            rounds=2,
            clients_per_round=3,
            client=ClientConfig(batch_size=8, lr=0.05),
            engine=VectorizedEngine(),
        )
    assert any("cannot batch" in r.getMessage() and "random" in r.getMessage() for r in caplog.records)
    assert [len(r.clients) for r in result.history.records] == [0, 3, 3]
    assert result.history.final.test_accuracy > 0.5


@pytest.mark.parametrize(
    "strategy, scenario",
    [
        (FedProx(proximal_mu=0.5), Scenario()),
        (Scaffold(), Scenario()),
        (QFedAvg(q=0.5), Scenario()),
        (None, Scenario(local_epochs_range=(1, 3), straggler_fraction=0.5)),
        (FedProx(proximal_mu=0.1), Scenario(straggler_fraction=0.6, dropout=0.2)),
    ],
    ids=["fedprox", "scaffold", "qfedavg", "epochs+stragglers", "fedprox+stragglers+dropout"],
)
@pytest.mark.parametrize("model", ["mlp (kernel)", "tanh (torch.func)"])
def test_strategies_and_scenarios_agree_across_engines(strategy, scenario, model):
    data = blobs(160, dim=8)
    act = nn.ReLU if model.startswith("mlp") else nn.Tanh
    build = seeded(lambda: nn.Linear(8, 16), act, lambda: nn.Linear(16, 4))
    sequential, vectorized = run_both(
        build, data, UNEQUAL, rounds=3, clients_per_round=4, strategy=strategy, scenario=scenario, momentum=0.5
    )
    assert sequential.history.column("dropped") == vectorized.history.column("dropped")
    assert_same(sequential, vectorized)


def test_auto_picks_the_batched_kernels_for_mlps_and_sequential_for_other_convolutions_on_cpu():
    from fedforge.engines import AutoEngine

    engine = AutoEngine()
    tasks = [ClientTask(0, images(4, seed=0), seed=0)]
    assert engine.choose(build_model("mlp", (1, 28, 28), 10), tasks) is engine.vectorized
    unknown = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Hardswish(), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    assert engine.choose(unknown, tasks) is engine.sequential  # torch.func: no faster than one at a time
