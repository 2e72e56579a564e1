"""What the Ray engine's tests share, in a module its workers import (the test modules put this folder on
their PYTHONPATH): the problem every worker loads, a model that can kill its worker, and the comparison."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.data import dirichlet
from fedforge.errors import DataError
from fedforge.scenarios import Scenario
from fedforge.strategies import make_strategy

HERE = Path(__file__).resolve().parent
# The workers import this module, and `helpers` from tests/.
WORKER_ENV = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), *sys.path])}}
NUM_CLIENTS, SEED = 12, 5
CLIENT = ClientConfig(batch_size=16, lr=0.1)


def blobs_data(num_clients: int = NUM_CLIENTS) -> FederatedData:
    """The test problem, as every worker loads it: Gaussian blobs split by Dirichlet(0.5)."""
    from helpers import blobs

    train = blobs(480, seed=1)
    parts = dirichlet(train.y.numpy(), num_clients, alpha=0.5, rng=np.random.default_rng(0))
    return FederatedData(train, parts, blobs(120, seed=2))


def held_out_data() -> FederatedData:
    """The test problem with a fifth of each client's examples held out (personalized evaluation)."""
    from fedforge.data.partition import split_holdout

    data = blobs_data()
    parts, held_out = split_holdout(data.partition, 0.2, rng=np.random.default_rng(3))
    return FederatedData(data.train, parts, data.test, held_out)


def failing_data() -> FederatedData:
    raise DataError("fashion-mnist not found in /nowhere")


class Net(nn.Module):
    """An MLP whose forward, in a Ray worker, kills that worker's process once: when the file `trap` exists
    (whoever removes it dies; the restarted worker finds no trap and trains on)."""

    def __init__(self, trap: str | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.trap, self.driver = trap, os.getpid()

    def forward(self, x):
        if self.trap and os.getpid() != self.driver and os.path.exists(self.trap):
            try:
                os.remove(self.trap)
            except FileNotFoundError:
                pass  # another worker sprang it
            else:
                os._exit(1)
        return self.net(x)


def run(engine, strategy="fedavg", scenario=Scenario(), rounds=3, model=None, client=CLIENT, data=blobs_data, **kwargs):
    options = {"krum_f": 1} if strategy == "krum" else {}
    return simulate(
        model or Net(),
        data(),
        rounds=rounds,
        clients_per_round=6,
        client=client,
        strategy=make_strategy(strategy, **options),
        engine=engine,
        scenario=scenario,
        seed=SEED,
        **kwargs,
    )


def assert_same_run(a, b):
    """Same selected and dropped clients every round, the same training metrics (to the rounding that a
    different summation order leaves), the same final weights."""
    torch.testing.assert_close(a.state.params, b.state.params)
    for x, y in zip(a.history.records, b.history.records, strict=True):
        assert (x.round, x.clients, x.dropped) == (y.round, y.clients, y.dropped)
        if x.train_loss is not None:
            assert math.isclose(x.train_loss, y.train_loss, rel_tol=1e-4)


def assert_same_kept(a, b):
    """The same clients keep the same client states and optimizer states."""
    assert a.client_states.keys() == b.client_states.keys() and a.optimizer_states.keys() == b.optimizer_states.keys()
    for c, state in a.client_states.items():
        torch.testing.assert_close(state.flat(), b.client_states[c].flat())
    for c, optimizer in a.optimizer_states.items():
        torch.testing.assert_close(optimizer.slots, b.optimizer_states[c].slots)


class BNNet(nn.Module):
    """An MLP with a BatchNorm layer: FedBN's personal entries (its weights and running statistics)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)
