import numpy as np
import pytest
import torch
from helpers import blobs
from torch import nn

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.client import ClientUpdate
from fedforge.data import iid
from fedforge.errors import ConfigError
from fedforge.scenarios import Scenario, attack_update, client_work, malicious_clients, parse_epochs_dist


def test_malicious_clients_are_fixed_by_the_seed():
    s = Scenario(attack="sign_flip", malicious_fraction=0.2)
    a, b = malicious_clients(s, 50, seed=1), malicious_clients(s, 50, seed=1)
    assert a == b and len(a) == 10 and all(0 <= c < 50 for c in a)
    assert malicious_clients(s, 50, seed=2) != a
    assert malicious_clients(Scenario(), 50, seed=1) == frozenset()


def test_heterogeneous_epochs_and_stragglers():
    config = ClientConfig(batch_size=10, local_epochs=2)
    s = Scenario(local_epochs_range=(1, 4), straggler_fraction=0.5)
    selected = list(range(20))
    plans, dropped = client_work(s, selected, [100] * 20, config, seed=0, round_=1)
    assert dropped == ()
    assert {p.epochs for p in plans.values()} <= {1, 2, 3, 4} and len({p.epochs for p in plans.values()}) > 1
    stragglers = [c for c, p in plans.items() if p.max_steps is not None]
    assert len(stragglers) == 10
    assert all(1 <= plans[c].max_steps <= plans[c].epochs * 10 for c in stragglers)
    _, dropped = client_work(
        Scenario(straggler_fraction=0.5, drop_stragglers=True), selected, [100] * 20, config, seed=0, round_=1
    )
    assert len(dropped) == 10


def test_dropout_rate():
    config = ClientConfig()
    total = sum(
        len(client_work(Scenario(dropout=0.3), list(range(100)), [10] * 100, config, 0, r)[1]) for r in range(1, 21)
    )
    assert 0.25 < total / 2000 < 0.35


def small():
    train, test = blobs(600, seed=1), blobs(200, seed=2)
    return FederatedData(train, iid(600, 10, rng=np.random.default_rng(0)), test)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_dropped_clients_send_nothing():
    reported = []
    result = simulate(
        model(),
        small(),
        rounds=4,
        clients_per_round=6,
        scenario=Scenario(dropout=0.5),
        on_client=lambda u: reported.append(u.client_id),
    )
    dropped = [set(r.dropped) for r in result.history.records[1:]]
    assert sum(map(len, dropped)) > 0
    expected = [c for r in result.history.records[1:] for c in r.clients if c not in r.dropped]
    assert reported == expected


def update(delta):
    return ClientUpdate(3, {"w": torch.tensor(delta), "n": torch.tensor(2)}, 10, 1, 0.5, 0.5)


def test_update_attacks():
    s = Scenario(attack="sign_flip", malicious_fraction=0.1, attack_scale=10)
    flipped = attack_update(update([1.0, -2.0]), s, seed=0, round_=1)
    assert flipped.delta["w"].tolist() == [-10.0, 20.0] and flipped.delta["n"].item() == 2
    scaled = attack_update(update([1.0, -2.0]), Scenario(attack="scale", malicious_fraction=0.1, attack_scale=3), 0, 1)
    assert scaled.delta["w"].tolist() == [3.0, -6.0]
    noise = attack_update(
        ClientUpdate(0, {"w": torch.zeros(10_000)}, 1, 1, 0, 0),
        Scenario(attack="gaussian", malicious_fraction=0.1, attack_scale=2.0),
        0,
        1,
    )
    assert noise.delta["w"].std().item() == pytest.approx(2.0, rel=0.05)


def test_label_flip_poisons_training():
    honest = simulate(model(), small(), rounds=5, clients_per_round=10, client=ClientConfig(lr=0.1, batch_size=16))
    poisoned = simulate(
        model(),
        small(),
        rounds=5,
        clients_per_round=10,
        client=ClientConfig(lr=0.1, batch_size=16),
        scenario=Scenario(attack="label_flip", malicious_fraction=1.0),
    )
    assert honest.history.final.test_accuracy > 0.9
    assert poisoned.history.final.test_accuracy < 0.3
    assert poisoned.history.final.train_accuracy > 0.9  # they learn their flipped labels well


def test_sign_flip_attack_in_a_run():
    result = simulate(
        model(),
        small(),
        rounds=3,
        clients_per_round=10,
        client=ClientConfig(lr=0.1, batch_size=16),
        scenario=Scenario(attack="sign_flip", malicious_fraction=0.3, attack_scale=10),
    )
    assert result.history.final.test_accuracy < 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attack": "ddos"}, "unknown attack 'ddos'"),
        ({"malicious_fraction": 0.2}, "needs an attack"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"local_epochs_range": (3, 1)}, "low <= high"),
    ],
)
def test_scenario_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Scenario(**kwargs)


def test_epochs_dist_syntax():
    assert parse_epochs_dist("uniform:1:5") == (1, 5) and parse_epochs_dist(None) is None
    with pytest.raises(ConfigError, match="uniform:1:5"):
        parse_epochs_dist("normal(3)")
