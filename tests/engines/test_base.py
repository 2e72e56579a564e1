"""The Engine base: what an engine can do is declared there, with defaults, and read by the round loop."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_same_run, blobs
from torch import nn

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.data import iid
from fedforge.engines import AutoEngine, Engine, SequentialEngine, VectorizedEngine
from fedforge.engines.base import Traffic, as_engine
from fedforge.engines.network import NetworkEngine
from fedforge.engines.ray import RayEngine
from fedforge.reductions import combine_updates
from fedforge.strategies import Median


def problem():
    train = blobs(300, seed=1)
    return FederatedData(train, iid(len(train), 6, rng=np.random.default_rng(0)), blobs(100, seed=2))


def run(engine=None, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    config = ClientConfig(batch_size=16, lr=0.1)
    return simulate(model, problem(), rounds=2, clients_per_round=3, client=config, engine=engine, **kwargs)


class Counting(Engine):
    """The sequential engine, counting 10 bytes up and 1 down per client as if it sent messages."""

    name = "counting"

    def __init__(self):
        self.engine, self.up, self.down = SequentialEngine(), 0, 0

    def run(self, model, global_state, tasks, config):
        for update in self.engine.run(model, global_state, tasks, config):
            self.up, self.down = self.up + 10, self.down + 1
            yield update

    def traffic(self):
        return Traffic(self.up, self.down)


class Plain:
    """An engine as written before the base class: `name`, `run` and a declared capability."""

    name = "plain"
    works_ahead = True

    def run(self, model, global_state, tasks, config):
        return iter(list(SequentialEngine().run(model, global_state, tasks, config)))


def test_every_engine_is_an_engine_and_declares_what_it_does():
    for engine in (SequentialEngine, VectorizedEngine, AutoEngine, NetworkEngine, RayEngine):
        assert issubclass(engine, Engine)
    assert [e.works_ahead for e in (SequentialEngine, VectorizedEngine, AutoEngine, NetworkEngine, RayEngine)] == [
        False,
        False,
        False,
        False,
        True,
    ]
    assert NetworkEngine.clients_privatize and not RayEngine.clients_privatize
    # Only the Ray engine keeps what its clients keep (on their workers): the round loop holds it for the others.
    assert [
        e.keeps_client_state for e in (SequentialEngine, VectorizedEngine, AutoEngine, NetworkEngine, RayEngine)
    ] == [
        False,
        False,
        False,
        False,
        True,
    ]


def test_the_base_declares_defaults_and_run_is_required():
    engine = SequentialEngine()
    assert (engine.works_ahead, engine.clients_privatize, engine.traffic()) == (False, False, None)
    # An engine that keeps no client state has none to take, commit or give.
    assert engine.restore({}, {}) is None and engine.commit(1, [0]) is None and engine.gather() == ({}, {})
    engine.close()  # nothing to release
    with pytest.raises(TypeError, match="abstract"):
        Engine()


def test_an_engine_that_counts_traffic_has_each_rounds_bytes_recorded():
    counted = run(Counting())
    assert_same_run(run(), counted)
    traffic = [{k: r.metrics[k] for k in ("bytes_up", "bytes_down") if k in r.metrics} for r in counted.history.records]
    assert traffic == [{}, {"bytes_up": 30, "bytes_down": 3}, {"bytes_up": 30, "bytes_down": 3}]
    assert all("bytes_up" not in r.metrics for r in run().history.records)  # an in-process engine sends none


def test_an_engine_that_does_not_subclass_the_base_is_adopted_with_what_it_declares():
    engine = as_engine(Plain())
    assert isinstance(engine, Engine) and engine.name == "plain"
    assert (engine.works_ahead, engine.clients_privatize, engine.traffic()) == (True, False, None)
    sequential = SequentialEngine()
    assert as_engine(sequential) is sequential
    assert_same_run(run(), run(Plain()))
    with pytest.raises(TypeError, match="run"):
        as_engine(object())


class Messaging:
    """An engine as written before the base class that sends messages: it counts their bytes in
    `bytes_up` and `bytes_down`, and holds something until `close()`."""

    name = "messaging"

    def __init__(self):
        self.bytes_up, self.bytes_down, self.closed = 0, 0, False

    def run(self, model, global_state, tasks, config):
        for update in SequentialEngine().run(model, global_state, tasks, config):
            self.bytes_up, self.bytes_down = self.bytes_up + 10, self.bytes_down + 1
            yield update

    def close(self):
        self.closed = True


class Reporting(Plain):
    """An engine that does not subclass the base but has its `traffic()` method."""

    def traffic(self):
        return Traffic(7, 5)


def test_an_adopted_engine_passes_on_its_traffic_and_its_close():
    engine = Messaging()
    counted = run(engine)
    traffic = [{k: r.metrics[k] for k in ("bytes_up", "bytes_down") if k in r.metrics} for r in counted.history.records]
    assert traffic == [{}, {"bytes_up": 30, "bytes_down": 3}, {"bytes_up": 30, "bytes_down": 3}]
    adopted = as_engine(engine)
    assert adopted.traffic() == Traffic(60, 6) and not engine.closed
    adopted.close()
    assert engine.closed
    assert as_engine(Reporting()).traffic() == Traffic(7, 5)
    as_engine(Plain()).close()  # nothing to close: nothing happens


class Summing(Engine):
    """An engine that sums the round's updates whether or not its tasks allow it (`summable`)."""

    name = "summing"

    def run(self, model, global_state, tasks, config):
        yield combine_updates(SequentialEngine().run(model, global_state, tasks, config))


def test_a_partial_sum_where_no_engine_may_sum_is_refused():
    with pytest.raises(
        TypeError, match=r"^the engine sent a partial sum of clients \(\d+, \d+, \d+\) where it may not$"
    ):
        run(Summing(), strategy=Median())
    assert_same_run(run(), run(Summing()))  # FedAvg is linear: it takes the partial sum


def test_traffic_since_is_the_difference():
    assert Traffic(50, 7).since(Traffic(20, 2)) == {"bytes_up": 30, "bytes_down": 5}


def test_the_settings_do_not_import_the_ray_engine():
    code = "import sys, fedforge.config; print('fedforge.engines.ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
