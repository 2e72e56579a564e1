"""Every strategy on tiny hand-computed cases, then the equivalences the papers promise."""

import math

import numpy as np
import pytest
import torch
from helpers import blobs
from torch import nn

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.algorithms import FedDynClient, ScaffoldClient
from fedforge.client import ClientUpdate
from fedforge.data import dirichlet
from fedforge.strategies import (
    Controls,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedDyn,
    FedNova,
    FedProx,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    QFedAvg,
    RunInfo,
    Scaffold,
    ServerState,
    TrimmedMean,
    fedavg,
    krum_scores,
    median,
    multikrum_select,
    trimmed_mean,
)
from fedforge.strategies.fednova import normalizer


def up(cid, n, delta, steps=1, loss=None, extras=None):
    return ClientUpdate(
        client_id=cid,
        delta={"w": torch.tensor(delta, dtype=torch.float64)},
        num_examples=n,
        num_steps=steps,
        train_loss=0.0,
        train_accuracy=0.0,
        initial_loss=loss,
        extras=extras or {},
    )


def w(state):
    return state.params["w"].tolist()


RUN = RunInfo(num_clients=4, client_lr=0.1)


def start(strategy, value=0.0):
    return strategy.init({"w": torch.tensor([value], dtype=torch.float64)}, RUN)


# ---- hand-computed -------------------------------------------------------------------------


def test_fedavgm_two_rounds():
    s = FedAvgM(server_lr=1.0, server_momentum=0.9)
    state = s.aggregate(start(s), [up(0, 1, [1.0]), up(1, 3, [3.0])])  # mean 2.5, v = 2.5
    assert w(state) == pytest.approx([2.5])
    state = s.aggregate(state, [up(0, 1, [1.0])])  # v = 0.9 * 2.5 + 1 = 3.25
    assert w(state) == pytest.approx([5.75])


@pytest.mark.parametrize(
    "cls, expected",
    [
        # m = 0.1 * 2 = 0.2; v0 = tau^2 = 0.01
        (FedAdagrad, 0.1 * 0.2 / (math.sqrt(0.01 + 4) + 0.1)),  # v = 4.01
        (FedAdam, 0.1 * 0.2 / (math.sqrt(0.99 * 0.01 + 0.01 * 4) + 0.1)),  # v = 0.0499
        (FedYogi, 0.1 * 0.2 / (math.sqrt(0.01 + 0.01 * 4) + 0.1)),  # v = 0.01 - 0.01*4*sign(0.01-4) = 0.05
    ],
)
def test_adaptive_first_round(cls, expected):
    s = cls(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    state = s.aggregate(start(s), [up(0, 1, [1.0]), up(1, 1, [3.0])])  # mean delta 2
    assert w(state) == pytest.approx([expected])


def test_scaffold_controls_hand_computed():
    s, client = Scaffold(), ScaffoldClient()  # N = 4, client lr 0.1 (RUN)
    state = start(s)
    control = s.plan(state, 0).inputs
    assert control["w"].tolist() == [0.0]
    received = {"w": torch.tensor([0.0], dtype=torch.float64)}
    mine = client.init_state(received)  # c_i = 0 before a client's first round
    assert client.terms(0, received, mine, control).correction["w"].tolist() == [0.0]
    # c_0 = 0 - 0 - (-0.2) / (2 * 0.1) = 1; c_1 = -(0.8) / (4 * 0.1) = -2; each sends c_i+ - c_i
    steps = (torch.tensor(2.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64))
    c0, sent0 = client.finish(received, {"w": received["w"] - 0.2}, mine, control, steps[0], 0.1)
    c1, sent1 = client.finish(received, {"w": received["w"] + 0.8}, mine, control, steps[1], 0.1)
    assert c0["w"].tolist() == pytest.approx([1.0]) and c1["w"].tolist() == pytest.approx([-2.0])
    assert sent0["w"].tolist() == pytest.approx([1.0])
    state = s.aggregate(state, [up(0, 10, [-0.2], steps=2, extras=sent0), up(1, 10, [0.8], steps=4, extras=sent1)])
    assert w(state) == pytest.approx([0.3])  # FedAvg of the model
    assert isinstance(state.strategy_state, Controls)
    assert state.strategy_state.control["w"].tolist() == pytest.approx([-0.25])  # (1 - 2) / 4
    control = s.plan(state, 0).inputs
    assert client.terms(0, received, c0, control).correction["w"].tolist() == pytest.approx([-1.25])  # c - c_0
    never = client.terms(0, received, mine, control)  # a client never selected: c_3 = 0
    assert never.correction["w"].tolist() == pytest.approx([-0.25])


def test_feddyn_hand_computed():
    s, client = FedDyn(feddyn_alpha=0.5), FedDynClient(alpha=0.5)  # N = 4 (RUN)
    state = start(s, 1.0)
    received = state.params
    g = client.init_state(received)
    # loss - <g, w> + alpha/2 ||w - w_received||^2: gradient term alpha w - alpha w_received - g
    terms = client.terms(0, received, g, {})
    assert terms.decay == 0.5 and terms.offset["w"].tolist() == [-0.5]
    g0, _ = client.finish(received, {"w": received["w"] + 2.0}, g, {}, torch.tensor(1.0), 0.1)
    assert g0["w"].tolist() == [-1.0]  # g - alpha (w_trained - w_received)
    state = s.aggregate(state, [up(0, 10, [2.0]), up(1, 30, [4.0])])
    # h = 0 - 0.5 / 4 * (2 + 4) = -0.75; w = mean(3, 5) - h / alpha = 4 + 1.5 (unweighted, as the paper)
    assert state.strategy_state.h["w"].tolist() == pytest.approx([-0.75])
    assert w(state) == pytest.approx([5.5])


def test_fednova_hand_computed():
    assert normalizer(2, 0.0) == 2 and normalizer(2, 0.5) == pytest.approx((2 - 0.5 * 0.75 / 0.5) / 0.5)
    s = FedNova()
    # a = 2 and 4; p = 1/2 each; tau_eff = 3; step = 3 * (0.5 * 1/2 + 0.5 * 4/4) = 2.25
    state = s.aggregate(start(s), [up(0, 5, [1.0], steps=2), up(1, 5, [4.0], steps=4)])
    assert w(state) == pytest.approx([2.25])


def test_qfedavg_hand_computed():
    s = QFedAvg(q=1.0)  # L = 1 / 0.1 (RUN)
    # dw = L * (w - w_k) = -1; Delta = F * dw = -2; h = q ||dw||^2 + L F = 1 + 20; w <- w + 2/21
    state = s.aggregate(start(s), [up(0, 7, [0.1], loss=2.0)])
    assert w(state) == pytest.approx([2 / 21])
    assert s.plan(state, 0).measure_initial_loss


def test_robust_reducers_hand_computed():
    assert median(torch.tensor([[1.0], [100.0], [2.0]])).tolist() == [2.0]
    assert median(torch.tensor([[1.0], [2.0], [3.0], [100.0]])).tolist() == [2.5]
    assert trimmed_mean(torch.tensor([[1.0], [2.0], [3.0], [100.0]]), 0.25).tolist() == [2.5]
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 10.0]])
    # f = 0: two neighbours each; scores 0.02, 0.03, 0.03, large
    assert krum_scores(points, 0).tolist()[:3] == pytest.approx([0.02, 0.03, 0.03])
    assert multikrum_select(points, 0, 1).tolist() == [0]
    assert sorted(multikrum_select(points, 0, 3).tolist()) == [0, 1, 2]
    state = ServerState({"w": torch.zeros(2, dtype=torch.float64)})
    updates = [ClientUpdate(i, {"w": p.double()}, 1, 1, 0.0, 0.0) for i, p in enumerate(points)]
    assert Krum(krum_f=0).aggregate(state, updates).params["w"].tolist() == [0.0, 0.0]
    assert MultiKrum(krum_f=0, multikrum_m=3).aggregate(state, updates).params["w"].tolist() == pytest.approx(
        [0.1 / 3, 0.1 / 3]
    )


def test_krum_needs_enough_clients():
    with pytest.raises(ValueError, match="more than f \\+ 2"):
        krum_scores(torch.zeros(3, 2), 1)


# ---- equivalences ---------------------------------------------------------------------------


def problem():
    train, test = blobs(400, seed=1), blobs(100, seed=2)
    parts = dirichlet(train.y.numpy(), 6, alpha=0.5, rng=np.random.default_rng(0))
    return FederatedData(train, parts, test)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def run(strategy, rounds=3, **client):
    return simulate(
        model(),
        problem(),
        rounds=rounds,
        clients_per_round=4,
        strategy=strategy,
        seed=3,
        client=ClientConfig(**{"batch_size": 16, "lr": 0.05, **client}),
    )


def assert_same_weights(a, b):
    for k in a.state.params:
        torch.testing.assert_close(a.state.params[k], b.state.params[k])


def test_fedavgm_without_momentum_is_fedavg():
    assert_same_weights(run(FedAvgM(server_momentum=0.0, server_lr=1.0)), run(FedAvg()))


def test_fedprox_with_mu_zero_is_fedavg():
    assert_same_weights(run(FedProx(proximal_mu=0.0)), run(FedAvg()))


def test_fedprox_with_mu_changes_training():
    a, b = run(FedProx(proximal_mu=1.0)), run(FedAvg())
    assert not torch.allclose(a.state.params["0.weight"], b.state.params["0.weight"])


def test_scaffold_first_round_is_fedavg():
    assert_same_weights(run(Scaffold(), rounds=1), run(FedAvg(), rounds=1))


def test_fednova_with_equal_steps_is_fedavg():
    equal = FederatedData(blobs(240, seed=1), [np.arange(i * 40, (i + 1) * 40) for i in range(6)], blobs(50, seed=2))
    runs = [
        simulate(
            model(),
            equal,
            rounds=3,
            clients_per_round=4,
            strategy=s,
            seed=3,
            client=ClientConfig(batch_size=16, lr=0.05, momentum=0.5),
        )
        for s in (FedNova(), FedAvg())
    ]
    assert_same_weights(*runs)


def test_qfedavg_with_q_zero_is_fedavg():
    assert_same_weights(run(QFedAvg(q=0.0)), run(FedAvg()))


@pytest.mark.parametrize("strategy", [Median(), TrimmedMean(trim_beta=0.3), Krum(krum_f=2), MultiKrum(krum_f=2)])
def test_robust_aggregators_recover_the_honest_mean(strategy):
    torch.manual_seed(0)
    honest = [torch.randn(50, dtype=torch.float64) * 0.01 + 1.0 for _ in range(7)]
    evil = [torch.full((50,), 1e6, dtype=torch.float64), torch.full((50,), -1e6, dtype=torch.float64)]
    updates = [ClientUpdate(i, {"w": d}, 100, 1, 0.0, 0.0) for i, d in enumerate(honest + evil)]
    result = strategy.aggregate(ServerState({"w": torch.zeros(50, dtype=torch.float64)}), updates).params["w"]
    assert (result - 1.0).abs().max() < 0.05
    poisoned = fedavg(ServerState({"w": torch.zeros(50, dtype=torch.float64)}), updates[:8]).params["w"]
    assert poisoned.abs().min() > 1e4  # whereas the plain mean is ruined
