import numpy as np
import pytest
import torch
from helpers import assert_same_run, blobs
from torch import nn

from fedforge import ClientConfig, FederatedData, History, _seeding, select_clients, simulate
from fedforge.data import dirichlet, iid
from fedforge.errors import ConfigError


def test_selection_is_seeded_distinct_and_sorted():
    a = select_clients(100, 10, torch.Generator().manual_seed(1))
    b = select_clients(100, 10, torch.Generator().manual_seed(1))
    c = select_clients(100, 10, torch.Generator().manual_seed(2))
    assert a == b != c
    assert len(set(a)) == 10 and a == sorted(a) and all(0 <= i < 100 for i in a)


def test_selection_is_uniform():
    counts = np.zeros(10)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        counts[select_clients(10, 5, g)] += 1
    assert np.all(np.abs(counts / 2000 - 0.5) < 0.05)


@pytest.mark.parametrize(
    "seed, keys", [(0, (4, 1)), (2**40 + 3, (4, 2)), (2**63 - 1, (3, 9, 2)), (7, ()), (5, (2**33, 1, 2, 3))]
)
def test_seeds_derived_at_once_are_numpys_seed_sequence_ones(seed, keys):
    each = [*np.random.default_rng(seed % 1000).integers(0, 2**32, 40).tolist(), 0, 1, 2**32 - 1]
    expected = [
        (lambda s: (int(s[0]) << 31 ^ int(s[1])) & (2**63 - 1))(
            np.random.SeedSequence([seed, *keys, x]).generate_state(2, np.uint32)
        )
        for x in each
    ]
    assert _seeding.derive_seeds(seed, *keys, each=each) == expected
    assert [_seeding.derive_seed(seed, *keys, x) for x in each] == expected
    assert _seeding.derive_seeds(seed, *keys, each=[2**33, 3]) == [
        _seeding.derive_seed(seed, *keys, 2**33),
        _seeding.derive_seed(seed, *keys, 3),
    ]


def small_problem(num_clients=6, partition="iid", test_fraction=None):
    train, test = blobs(600, seed=1), blobs(200, seed=2)
    rng = np.random.default_rng(0)
    if partition == "iid":
        parts = iid(len(train), num_clients, rng=rng)
    else:
        parts = dirichlet(train.y.numpy(), num_clients, alpha=0.3, rng=rng)
    client_test = None
    if test_fraction:
        client_test = [p[: int(len(p) * test_fraction)] for p in parts]
        parts = [p[int(len(p) * test_fraction) :] for p in parts]
    return FederatedData(train, parts, test, client_test)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def run(seed, data=None, model_seed=0, **kwargs):
    return simulate(
        make_model(model_seed),
        data or small_problem(partition="dirichlet"),
        rounds=3,
        clients_per_round=3,
        client=ClientConfig(batch_size=16, lr=0.1),
        seed=seed,
        **kwargs,
    )


def test_same_seed_same_clients_and_identical_weights():
    a, b, c = run(seed=7), run(seed=7), run(seed=8)
    assert a.history.column("clients") == b.history.column("clients")
    assert a.history.column("clients") != c.history.column("clients")
    for name in a.state.params:
        assert torch.equal(a.state.params[name], b.state.params[name])


def test_history_has_initial_evaluation_and_every_round():
    result = run(seed=0)
    rounds = result.history.records
    assert [r.round for r in rounds] == [0, 1, 2, 3]
    assert rounds[0].clients == () and rounds[0].train_loss is None
    assert all(len(r.clients) == 3 for r in rounds[1:])
    assert rounds[-1].test_accuracy > rounds[0].test_accuracy
    assert rounds[-1].test_accuracy > 0.9  # separable blobs
    assert History.from_json(result.history.to_json()) == result.history


def test_model_passed_in_is_not_changed():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    simulate(model, small_problem(), rounds=1, clients_per_round=2, client=ClientConfig(lr=0.1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fraction_of_clients_and_callbacks():
    seen, rounds = [], []
    simulate(
        make_model(),
        small_problem(num_clients=10),
        rounds=2,
        clients_per_round=0.3,
        on_client=lambda u: seen.append(u.client_id),
        on_round=lambda r, s: rounds.append(r.round),
    )
    assert len(seen) == 6 and rounds == [0, 1, 2]


def test_federated_evaluation_on_client_holdout():
    result = simulate(
        make_model(),
        small_problem(test_fraction=0.2),
        rounds=2,
        clients_per_round=3,
        client=ClientConfig(lr=0.1, batch_size=16),
    )
    final = result.history.final
    assert final.federated_accuracy is not None and final.federated_accuracy > 0.8
    assert result.history.records[0].federated_loss > final.federated_loss


def test_batchnorm_model_runs_and_keeps_integer_buffer():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    result = simulate(model, small_problem(), rounds=2, clients_per_round=2, client=ClientConfig(batch_size=25))
    tracked = result.state.params["1.num_batches_tracked"]
    assert tracked.dtype == torch.long and tracked.item() == 2 * 4  # 2 rounds x 100 examples / 25


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rounds": 0}, "rounds must be >= 1"),
        ({"clients_per_round": 7}, "clients_per_round=7 is more than num_clients=6"),
        ({"clients_per_round": 0}, "clients_per_round must be >= 1"),
        ({"clients_per_round": 1.5}, "fraction must be in"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"rounds": 1, "clients_per_round": 2, **kwargs}
    with pytest.raises(ConfigError, match=message):
        simulate(make_model(), small_problem(), **args)


class EagerEngine:
    """An engine that trains when `run` is called (as one whose workers are elsewhere starts them):
    the round loop begins each next round before it evaluates and records the one just done."""

    name = "eager"
    works_ahead = True

    def __init__(self, fail=None):
        self.events, self.fail, self.round = [], fail or {}, 0

    def run(self, model, global_state, tasks, config):
        from fedforge.engines import SequentialEngine

        self.round += 1
        self.events.append(("run", self.round))
        if self.round in self.fail:
            raise self.fail.pop(self.round)
        return iter(list(SequentialEngine().run(model, global_state, tasks, config)))


def test_an_engine_that_works_ahead_starts_the_next_round_before_this_one_is_recorded():
    engine = EagerEngine()
    ahead = run(seed=3, engine=engine, on_round=lambda record, state: engine.events.append(("recorded", record.round)))
    assert_same_run(run(seed=3), ahead)
    assert engine.events == [
        ("recorded", 0),
        ("run", 1),
        ("run", 2),
        ("recorded", 1),
        ("run", 3),
        ("recorded", 2),
        ("recorded", 3),
    ]
    # Each round's seconds are its own: from the previous round's record to its own.
    assert all(r.seconds >= r.train_seconds > 0 for r in ahead.history.records[1:])


def test_an_error_of_a_round_begun_ahead_comes_after_the_round_before_is_recorded():
    from fedforge.engines.base import RoundFailed

    recorded = []
    engine = EagerEngine(fail={4: RuntimeError("worker lost"), 2: RoundFailed("too few")})  # by call
    with pytest.raises(RuntimeError, match="worker lost"):
        run(seed=3, engine=engine, on_round=lambda record, state: recorded.append(record.round))
    # Round 2's first attempt failed as it was begun (ahead, while round 1 was measured): it was
    # retried with a new selection; the error of round 3's (begun ahead) waited for round 2's record.
    assert recorded == [0, 1, 2]
