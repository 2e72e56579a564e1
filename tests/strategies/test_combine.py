"""Partial sums (PartialSum): linear strategies and the tally of metrics take them as the updates they stand for."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import blobs
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.contract import ClientUpdate
from fedforge.data import dirichlet
from fedforge.engines import SequentialEngine
from fedforge.errors import ConfigError
from fedforge.reductions import PartialSum, combine_updates, weighted_mean_delta
from fedforge.scenarios import Scenario
from fedforge.simulation import _Tally
from fedforge.strategies import (
    LINEAR_STRATEGIES,
    STRATEGIES,
    FedAvg,
    LinearStrategy,
    RunInfo,
    StrategyBase,
    check_linear,
    make_strategy,
)

LIKE = {"w": torch.zeros(3), "n": torch.zeros((), dtype=torch.long)}


def update(cid, w, n, loss, accuracy=None, steps=1, batches=0, **metrics):
    return ClientUpdate(
        cid,
        {"w": torch.tensor(w, dtype=torch.float32), "n": torch.tensor(batches)},
        n,
        steps,
        loss,
        accuracy,
        metrics=metrics,
    )


def test_two_updates_by_hand():
    a = update(1, [1.0, 0.0, 2.0], 1, loss=0.5, accuracy=1.0, steps=2, batches=1)
    b = update(2, [4.0, 3.0, -1.0], 3, loss=1.0, accuracy=0.0, steps=3, batches=2)
    c = combine_updates([a, b])
    assert isinstance(c, PartialSum) and not isinstance(c, ClientUpdate) and c.client_ids == (1, 2)
    assert (c.num_examples, c.num_steps) == (4, 5)
    torch.testing.assert_close(c.mean_delta["w"], torch.tensor([13 / 4, 9 / 4, -1 / 4]))
    # An integer buffer's mean stays unrounded (1.75, not 2), so the server's mean of means is exact.
    assert c.mean_delta["n"].dtype == torch.float64 and c.mean_delta["n"].item() == 1.75
    assert c.metrics == c.training_metrics() == {"loss": (0.5 + 3.0) / 4, "accuracy": 1 / 4}
    assert combine_updates([]) is None
    # Partial sums of partial sums: the clients of both, the same mean.
    d = combine_updates([c, update(7, [0.0, 0.0, 0.0], 4, loss=0.0)])
    assert d.client_ids == (1, 2, 7) and d.num_examples == 8
    torch.testing.assert_close(d.mean_delta["w"], torch.tensor([13 / 8, 9 / 8, -1 / 8]))


def test_a_metric_some_clients_lack_counts_as_the_tally_counts_it():
    a, b = update(1, [1.0, 0, 0], 2, loss=1.0), update(2, [0, 1.0, 0], 2, loss=3.0, accuracy=0.5)
    tally_of_each, tally_of_one = _Tally(None), _Tally(None)
    list(tally_of_each.aggregated([a, b]))
    list(tally_of_one.aggregated([combine_updates([a, b])]))
    assert tally_of_one.means() == pytest.approx(tally_of_each.means())  # accuracy: 0.5 * 2 / 4, as the tally says


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 500), st.floats(0, 5), st.floats(0, 1), st.integers(0, 9)), min_size=1, max_size=12
    ),
    st.data(),
)
def test_the_mean_of_partial_sums_is_the_mean_of_the_updates(clients, data):
    g = torch.Generator().manual_seed(len(clients))
    updates = [
        ClientUpdate(i, {"w": torch.randn(3, generator=g), "n": torch.tensor(batches)}, n, 1, loss, accuracy)
        for i, (n, loss, accuracy, batches) in enumerate(clients)
    ]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(updates)), max_size=4)))
    groups = [updates[a:b] for a, b in zip([0, *cuts], [*cuts, len(updates)], strict=True)]
    combined = [c for c in map(combine_updates, groups) if c is not None]
    mean_each, count = weighted_mean_delta(updates, LIKE)
    mean_combined, _ = weighted_mean_delta(combined, LIKE)
    torch.testing.assert_close(mean_combined, mean_each)
    tallies = _Tally(None), _Tally(None)
    list(tallies[0].aggregated(updates))
    list(tallies[1].aggregated(combined))
    assert sum(n for _, n in tallies[1].metrics) == sum(n for _, n in tallies[0].metrics)
    assert tallies[1].means() == pytest.approx(tallies[0].means(), rel=1e-12)
    assert sorted(i for c in combined for i in c.client_ids) == list(range(count))


def test_linear_strategies_are_those_with_apply_mean_and_aggregate_partial_sums_alike():
    run = RunInfo(num_clients=10, client_lr=0.1)
    g = torch.Generator().manual_seed(0)
    updates = [
        ClientUpdate(i, {"w": torch.randn(3, generator=g), "n": torch.tensor(i)}, 10 + 7 * i, 3, 1.0, None)
        for i in range(5)
    ]
    params = {"w": torch.randn(3, generator=g), "n": torch.tensor(4)}
    for name in STRATEGIES:
        strategy = make_strategy(name)
        if not isinstance(strategy, LinearStrategy):
            assert name not in LINEAR_STRATEGIES
            continue
        state = strategy.init(params, run)
        for _ in range(2):  # twice: the server optimizers' own state must move alike too
            each = strategy.aggregate(state, updates)
            combined = strategy.aggregate(state, [combine_updates(updates[:2]), combine_updates(updates[2:])])
            torch.testing.assert_close(combined.params, each.params, msg=name)
            state = each


def test_what_serves_linear_strategies_only_refuses_the_others_with_their_own_reason():
    assert LINEAR_STRATEGIES == ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedprox")
    for name, cls in STRATEGIES.items():
        if name in LINEAR_STRATEGIES:
            check_linear(name, "it")
            check_linear(make_strategy(name), "it")
            continue
        # Every strategy that is not linear says why, in its own words.
        assert cls.needs_each_update != StrategyBase.needs_each_update, name
        for strategy in (name, make_strategy(name)):
            with pytest.raises(
                ConfigError,
                match=rf"^it cannot serve strategy '{name}': {cls.needs_each_update} "
                rf"\(use one of fedavg, fedavgm, ",
            ) as e:
                check_linear(strategy, "it")
            assert "\n" not in str(e.value)

    class Mine(StrategyBase):  # the user's own, without a step from the mean: not linear
        name = "mine"

        def aggregate(self, state, updates):
            return state.unchanged()

    class Plain:  # a Strategy that is not a StrategyBase, and not linear
        name = "plain"
        init, plan, aggregate = Mine.init, Mine.plan, Mine.aggregate

    class MyLinear(Mine):  # the user's own with apply_mean: linear, by the protocol alone
        def apply_mean(self, state, mean):
            return state.next(state.params)

    with pytest.raises(ConfigError, match="strategy 'mine': it looks at each update, not only at their weighted mean"):
        check_linear(Mine(), "it")
    with pytest.raises(ConfigError, match="strategy 'plain': it does not reduce the updates to one weighted mean"):
        check_linear(Plain(), "it")
    assert not isinstance(Mine(), LinearStrategy) and isinstance(MyLinear(), LinearStrategy)
    assert isinstance(FedAvg(), LinearStrategy)
    check_linear(MyLinear(), "it")
    with pytest.raises(ConfigError, match="strategy 'unknown': it does not reduce"):
        check_linear("unknown", "it")


class CombiningEngine:
    """The sequential engine answering as the Ray engine does: one PartialSum for the summable tasks, then the
    others' own updates."""

    name = "combining"

    def __init__(self):
        self.engine = SequentialEngine()
        self.summable: list[list[int]] = []

    def run(self, model, global_state, tasks, config):
        self.summable.append([t.client_id for t in tasks if t.summable])
        updates = list(self.engine.run(model, global_state, tasks, config))
        combined = combine_updates(u for u, t in zip(updates, tasks, strict=True) if t.summable)
        yield from ([combined] if combined else []) + [u for u, t in zip(updates, tasks, strict=True) if not t.summable]


def problem():
    train = blobs(400, seed=1)
    return FederatedData(
        train, dirichlet(train.y.numpy(), 8, alpha=0.5, rng=np.random.default_rng(0)), blobs(100, seed=2)
    )


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize(
    "strategy, scenario, summed",
    [
        ("fedavg", Scenario(), "all"),
        ("fedadam", Scenario(straggler_fraction=0.5, dropout=0.2), "all"),
        ("fedavg", Scenario(attack="label_flip", malicious_fraction=0.25), "all"),
        # The attacked clients' own updates are transformed by the round loop: never summed.
        ("fedavg", Scenario(attack="sign_flip", malicious_fraction=0.25, attack_scale=3.0), "honest"),
        ("krum", Scenario(), "none"),
        ("scaffold", Scenario(), "none"),
    ],
)
def test_the_round_loop_gives_the_same_run_with_partial_sums(strategy, scenario, summed):
    def go(engine):
        kwargs = {"krum_f": 1} if strategy == "krum" else {}
        return simulate(
            model(),
            problem(),
            rounds=3,
            clients_per_round=5,
            client=ClientConfig(batch_size=16, lr=0.1),
            strategy=make_strategy(strategy, **kwargs),
            engine=engine,
            scenario=scenario,
            seed=3,
        )

    engine = CombiningEngine()
    combined, each = go(engine), go(SequentialEngine())
    torch.testing.assert_close(combined.state.params, each.state.params)
    for a, b in zip(combined.history.records, each.history.records, strict=True):
        assert a.clients == b.clients and a.dropped == b.dropped
        assert (a.train_loss is None) == (b.train_loss is None)
        if a.train_loss is not None:
            # Round 1 trains from the same model: its tally equals to float64 rounding. Later rounds start from
            # models equal to float32 rounding (a mean of partial means is summed in another order).
            tolerance = 1e-9 if a.round == 1 else 1e-5
            assert math.isclose(a.train_loss, b.train_loss, rel_tol=tolerance)
            assert math.isclose(a.train_accuracy, b.train_accuracy, rel_tol=tolerance)
    assert any(engine.summable) if summed != "none" else not any(engine.summable)
    if summed == "honest":
        from fedforge.scenarios import malicious_clients

        bad = malicious_clients(scenario, 8, 3)
        assert all(c not in bad for ids in engine.summable for c in ids)
        selected = {c for r in each.history.records for c in r.clients} - set(
            c for r in each.history.records for c in r.dropped
        )
        assert bad & selected  # the test would prove nothing if no attacker was ever selected
