import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedforge.client import ClientUpdate
from fedforge.strategies import FedAvg, RunningMean, ServerState, fedavg


def update(cid, n, **delta):
    return ClientUpdate(client_id=cid, delta=delta, num_examples=n, num_steps=1, train_loss=0.0, train_accuracy=0.0)


def test_weighted_by_examples_hand_computed():
    state = ServerState({"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(10)})
    updates = [
        update(0, 100, w=torch.tensor([1.0, 0.0]), steps=torch.tensor(4)),
        update(1, 300, w=torch.tensor([-1.0, 4.0]), steps=torch.tensor(7)),
    ]
    new = fedavg(state, updates)
    # w: 2 + ... mean delta = (100*[1,0] + 300*[-1,4]) / 400 = [-0.5, 3.0]
    torch.testing.assert_close(new.params["w"], torch.tensor([0.5, 5.0]))
    # steps: (100*4 + 300*7)/400 = 6.25 -> 6, kept an integer
    assert new.params["steps"].dtype == torch.int64 and new.params["steps"].item() == 16
    assert new.round == 1


def test_unweighted_would_differ():
    """The tutorial's unweighted mean gives 0.0 here; FedAvg must give 0.8."""
    state = ServerState({"w": torch.tensor(0.0)})
    new = fedavg(state, [update(0, 900, w=torch.tensor(1.0)), update(1, 100, w=torch.tensor(-1.0))])
    torch.testing.assert_close(new.params["w"], torch.tensor(0.8))


def test_equals_weighted_mean_of_client_models():
    torch.manual_seed(0)
    global_w = torch.randn(5, 3)
    client_models = [torch.randn(5, 3) for _ in range(3)]
    sizes = [10, 250, 40]
    updates = [update(i, n, w=m - global_w) for i, (m, n) in enumerate(zip(client_models, sizes, strict=True))]
    expected = sum(n * m for m, n in zip(client_models, sizes, strict=True)) / sum(sizes)
    torch.testing.assert_close(fedavg(ServerState({"w": global_w}), updates).params["w"], expected)


def test_server_lr_scales_the_step_but_not_integer_buffers():
    state = ServerState({"w": torch.tensor([1.0]), "count": torch.tensor(0)})
    new = FedAvg(server_lr=0.5).aggregate(state, [update(0, 1, w=torch.tensor([2.0]), count=torch.tensor(4))])
    torch.testing.assert_close(new.params["w"], torch.tensor([2.0]))
    assert new.params["count"].item() == 4


def test_no_updates_keeps_the_model():
    state = ServerState({"w": torch.tensor([1.0])})
    new = fedavg(state, [])
    assert torch.equal(new.params["w"], state.params["w"]) and new.round == 1


def test_updates_are_consumed_one_at_a_time():
    """The strategy folds a generator: it never needs the whole list."""
    alive = []

    def stream():
        for i in range(5):
            alive.append(i)
            yield update(i, 1, w=torch.full((2,), float(i)))

    new = fedavg(ServerState({"w": torch.zeros(2)}), stream())
    torch.testing.assert_close(new.params["w"], torch.full((2,), 2.0))
    assert alive == list(range(5))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 10_000), st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3)),
        min_size=1,
        max_size=8,
    )
)
def test_running_mean_equals_direct_weighted_mean(clients):
    acc = RunningMean()
    for n, values in clients:
        acc.add({"w": torch.tensor(values, dtype=torch.float64)}, n)
    weights = torch.tensor([n for n, _ in clients], dtype=torch.float64)
    values = torch.tensor([v for _, v in clients], dtype=torch.float64)
    expected = (weights[:, None] * values).sum(0) / weights.sum()
    torch.testing.assert_close(acc.mean({"w": expected})["w"], expected)


def test_mismatched_entries_are_refused():
    acc = RunningMean()
    acc.add({"w": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match="differ"):
        acc.add({"v": torch.zeros(1)}, 1)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi"])
def test_apply_mean_is_aggregate_given_the_mean(name):
    """The privacy stage hands a strategy its (noised) mean: the same step as aggregating updates
    whose example-weighted mean that is."""
    import fedforge as ff
    from fedforge.reductions import weighted_mean_delta

    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)}
    updates = [
        ff.ClientUpdate(
            i, {k: torch.randn(v.shape, generator=g) for k, v in params.items()}, 10 * (i + 1), 1, 0.5, None
        )
        for i in range(3)
    ]
    strategy = ff.make_strategy(name)
    state = strategy.init(params, ff.RunInfo(num_clients=3, client_lr=0.1))
    for _ in range(2):  # twice: the server optimizer's state carries over
        mean, _ = weighted_mean_delta(updates, state.params)
        expected, state = strategy.aggregate(state, updates), strategy.apply_mean(state, mean)
        for k in params:
            torch.testing.assert_close(state.params[k], expected.params[k])
