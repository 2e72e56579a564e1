"""The vectorized engine against the sequential one for every built-in task and optimizer rule.

Clients of unequal sizes (a short last batch per epoch, which a task's mean loss cannot pad),
FedProx and SCAFFOLD with Adam, stragglers, optimizer state kept between rounds, chunks; and
what falls back to the sequential engine says so in one line.
"""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from helpers import assert_same_run as assert_same
from helpers import blobs
from torch import nn

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.data import TensorData
from fedforge.engines import AutoEngine, ClientTask, SequentialEngine, VectorizedEngine
from fedforge.scenarios import Scenario
from fedforge.strategies import FedProx, Scaffold
from fedforge.tasks import CLASSIFICATION, LANGUAGE_MODEL, REGRESSION

UNEQUAL = [np.arange(0, 3), np.arange(3, 20), np.arange(20, 61), np.arange(61, 62), np.arange(62, 160)]
VOCAB = 11


def regression_data(n=160):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return TensorData(x, x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1 * torch.randn(n, generator=g) + 4.0)


def token_data(n=160, length=6):
    """Sequences that mostly count up (mod VOCAB): a next-token rule worth learning."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    tokens = (start + torch.arange(length + 1)) % VOCAB
    noise = torch.rand(tokens.shape, generator=g) < 0.1
    tokens = torch.where(noise, torch.randint(0, VOCAB, tokens.shape, generator=g), tokens)
    return TensorData(tokens[:, :-1], tokens[:, 1:])


class TinyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, x):
        return self.out(self.lstm(self.embed(x))[0])


def seeded(factory):
    def build():
        torch.manual_seed(0)
        return factory()

    return build


CASES = {
    "classification (tanh)": (
        CLASSIFICATION,
        lambda: blobs(160, dim=8),
        seeded(lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))),
    ),
    "classification (relu)": (
        CLASSIFICATION,
        lambda: blobs(160, dim=8),
        seeded(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))),
    ),
    "regression": (
        REGRESSION,
        regression_data,
        seeded(lambda: nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))),
    ),
    "language-model (embedding)": (
        LANGUAGE_MODEL,
        token_data,
        seeded(lambda: nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB))),
    ),
    "language-model (lstm)": (LANGUAGE_MODEL, token_data, seeded(TinyLSTM)),
}

# Learning rates small enough that float32 round-off is not amplified into a visible difference.
OPTIMIZERS = {
    "sgd": ("sgd", {"lr": 0.05}),
    "sgd+momentum+decay": ("sgd", {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.01}),
    "adam": ("adam", {"lr": 0.01}),
    "adamw": ("adamw", {"lr": 0.01, "weight_decay": 0.05}),
}


def config_for(task, optimizer, *, keep=False, **client):
    name, options = OPTIMIZERS[optimizer]
    task = task if name == "sgd" else task.with_optimizer(name)
    task = dataclasses.replace(task, keep_optimizer_state=keep)
    return ClientConfig(**{"batch_size": 8, **options, **client, "task": task})


def run_both(case, config, *, rounds=2, clients_per_round=3, caplog=None, **kwargs):
    """The same run on both engines; no notice that the vectorized engine fell back."""
    _, data, build = CASES[case]
    data = data()
    results = []
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        for engine in (SequentialEngine(), VectorizedEngine(**kwargs.pop("engine_options", {}))):
            results.append(
                simulate(
                    build(),
                    FederatedData(data, UNEQUAL, data),
                    rounds=rounds,
                    clients_per_round=clients_per_round,
                    client=config,
                    engine=engine,
                    seed=1,
                    **kwargs,
                )
            )
    assert not [r.getMessage() for r in caplog.records if "cannot batch" in r.getMessage()]
    return results


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("case", CASES)
def test_every_task_and_optimizer_agrees_across_engines(case, optimizer, caplog):
    task = CASES[case][0]
    assert_same(*run_both(case, config_for(task, optimizer, local_epochs=2), clients_per_round=4, caplog=caplog))


@pytest.mark.parametrize(
    "strategy, scenario",
    [
        (FedProx(proximal_mu=0.5), Scenario()),
        (Scaffold(), Scenario()),
        (None, Scenario(local_epochs_range=(1, 3), straggler_fraction=0.5)),
        (FedProx(proximal_mu=0.1), Scenario(straggler_fraction=0.6, dropout=0.2)),
    ],
    ids=["fedprox", "scaffold", "epochs+stragglers", "fedprox+stragglers+dropout"],
)
@pytest.mark.parametrize(
    "case, optimizer",
    [("regression", "adam"), ("language-model (embedding)", "adamw"), ("classification (relu)", "adam")],
)
def test_strategies_and_scenarios_with_adam_agree_across_engines(case, optimizer, strategy, scenario, caplog):
    config = config_for(CASES[case][0], optimizer, weight_decay=0.01)
    assert_same(
        *run_both(case, config, rounds=3, clients_per_round=4, strategy=strategy, scenario=scenario, caplog=caplog)
    )


@pytest.mark.parametrize(
    "case, optimizer",
    [
        ("classification (relu)", "sgd+momentum+decay"),  # the fastmlp kernel's momentum buffers
        ("classification (tanh)", "sgd+momentum+decay"),
        ("regression", "adam"),
        ("language-model (embedding)", "adamw"),
    ],
)
def test_optimizer_state_kept_between_rounds_agrees_across_engines(case, optimizer, caplog):
    """4 of 5 clients a round for 4 rounds: most clients come back, some after a round away."""
    task = CASES[case][0]
    kept = run_both(
        case,
        config_for(task, optimizer, keep=True),
        rounds=4,
        clients_per_round=4,
        caplog=caplog,
        scenario=Scenario(straggler_fraction=0.5),
    )
    assert_same(*kept)
    fresh = run_both(
        case,
        config_for(task, optimizer),
        rounds=4,
        clients_per_round=4,
        caplog=caplog,
        scenario=Scenario(straggler_fraction=0.5),
    )
    assert not all(torch.equal(kept[0].state.params[k], fresh[0].state.params[k]) for k in fresh[0].state.params)


def test_kept_states_pass_through_chunks(caplog):
    """A budget of a few clients per chunk: the carried states are stacked chunk by chunk."""
    config = config_for(REGRESSION, "adam", keep=True)
    sequential, vectorized = run_both(
        "regression", config, rounds=3, clients_per_round=5, caplog=caplog, engine_options={"max_memory": 60_000}
    )
    assert (
        VectorizedEngine(max_memory=60_000).chunk_size(
            CASES["regression"][2](), [ClientTask(0, regression_data(40), 0)], config
        )
        < 5
    )
    assert_same(sequential, vectorized)


def test_tuple_and_dict_inputs_with_adam(caplog):
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(5 + 3, 1)

        def forward(self, features, extra):
            return self.linear(torch.cat([features, extra], 1))

    data = regression_data()
    extra = torch.randn(len(data), 3, generator=torch.Generator().manual_seed(5))
    dict_data = TensorData({"features": data.x, "extra": extra}, data.y)
    config = config_for(REGRESSION, "adam")
    results = []
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        for engine in (SequentialEngine(), VectorizedEngine()):
            results.append(
                simulate(
                    Named(),
                    FederatedData(dict_data, UNEQUAL, dict_data),
                    rounds=2,
                    clients_per_round=3,
                    client=config,
                    engine=engine,
                    seed=1,
                )
            )
    assert not [r for r in caplog.records if "cannot batch" in r.getMessage()]
    assert_same(*results)


def fallback_notices(config, build, data, caplog):
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        sequential, vectorized = (
            simulate(
                build(),
                FederatedData(data, UNEQUAL, data),
                rounds=2,
                clients_per_round=3,
                client=config,
                engine=engine,
                seed=1,
            )
            for engine in (SequentialEngine(), VectorizedEngine())
        )
    for name, value in sequential.state.params.items():
        assert torch.equal(vectorized.state.params[name], value)
    return [r.getMessage() for r in caplog.records if "cannot batch" in r.getMessage()]


@pytest.mark.parametrize(
    "optimizer, options, says",
    [
        (torch.optim.RMSprop, {}, "RMSprop is not one of fedforge's optimizer rules"),
        (torch.optim.Adam, {"amsgrad": True}, "Adam with {'amsgrad': True} is not one of fedforge's optimizer rules"),
    ],
)
def test_an_optimizer_no_rule_computes_falls_back_with_a_notice(optimizer, options, says, caplog):
    task = dataclasses.replace(REGRESSION, optimizer=optimizer, optimizer_options=options)
    _, data, build = CASES["regression"]
    notices = fallback_notices(ClientConfig(batch_size=8, lr=0.01, task=task), build, data(), caplog)
    assert len(notices) == 1 and "\n" not in notices[0] and says in notices[0]


def test_a_task_with_its_own_loop_falls_back_with_a_notice(caplog):
    def own(module, batches, config):
        optimizer = torch.optim.SGD(module.parameters(), lr=config.lr)
        for x, y in batches:
            optimizer.zero_grad()
            REGRESSION.loss(module(x), y).backward()
            optimizer.step()

    task = dataclasses.replace(REGRESSION, name="own", train=own)
    _, data, build = CASES["regression"]
    notices = fallback_notices(ClientConfig(batch_size=8, lr=0.01, task=task), build, data(), caplog)
    assert len(notices) == 1 and "task own trains with a loop of its own" in notices[0]


def test_auto_engine_picks_per_model_and_task():
    engine = AutoEngine()
    tasks = [ClientTask(0, regression_data(8), seed=0)]
    mlp = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    assert engine.choose(mlp, tasks, config_for(REGRESSION, "adam")) is engine.vectorized
    rmsprop = dataclasses.replace(REGRESSION, optimizer=torch.optim.RMSprop)
    assert engine.choose(mlp, tasks, ClientConfig(task=rmsprop)) is engine.sequential
    batchnorm = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Linear(16, 1))
    assert engine.choose(batchnorm, tasks, config_for(REGRESSION, "adam")) is engine.sequential
    lm_tasks = [ClientTask(0, token_data(8), seed=0)]
    assert engine.choose(TinyLSTM(), lm_tasks, config_for(LANGUAGE_MODEL, "adam")) is engine.sequential
