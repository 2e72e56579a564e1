"""Per-round configuration: a function of the round gives its clients' config (a learning-rate schedule)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_run
from test_simulation import make_model, small_problem

from fedforge import ClientConfig, History, simulate
from fedforge.engines import SequentialEngine, VectorizedEngine
from fedforge.errors import ConfigError
from fedforge.schedules import Cosine, Exponential, Step
from fedforge.strategies import FedAvg, Scaffold
from fedforge.tasks import CLASSIFICATION

BASE = ClientConfig(batch_size=16, lr=0.1)


def run(rounds=4, engine=None, client=BASE, **kwargs):
    return simulate(
        make_model(),
        small_problem(partition="dirichlet"),
        rounds=rounds,
        clients_per_round=3,
        client=client,
        engine=engine,
        seed=3,
        **kwargs,
    )


def recording_task(seen):
    """A task with a training loop of its own that notes what config each client trained with."""

    def train(module, batches, config):
        seen.append((config.round, config.rounds, config.lr, config.local_epochs))
        optimizer = torch.optim.SGD(module.parameters(), lr=config.lr)
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(module(x), y).backward()
            optimizer.step()
        return None

    return dataclasses.replace(CLASSIFICATION, name="recording", train=train)


def test_an_own_training_loop_sees_the_round_and_its_lr():
    seen: list = []
    schedule = Step(step_size=2, gamma=0.5)
    result = run(
        client=ClientConfig(batch_size=16, lr=0.8, task=recording_task(seen)), round_config=schedule.round_config
    )
    # Three clients a round, each told the round, the run's rounds and the round's lr.
    expected = [(r, 4, lr, 1) for r, lr in zip(range(1, 5), [0.8, 0.8, 0.4, 0.4], strict=True) for _ in range(3)]
    assert seen == expected
    assert result.history.column("lr") == [None, 0.8, 0.8, 0.4, 0.4]
    assert History.from_json(result.history.to_json()).column("lr") == [None, 0.8, 0.8, 0.4, 0.4]
    assert "lr" in result.history.to_csv().splitlines()[0].split(",")


def test_without_a_round_config_the_round_still_reaches_the_clients():
    seen: list = []
    result = run(rounds=2, client=ClientConfig(batch_size=16, lr=0.1, task=recording_task(seen)))
    assert seen == [(1, 2, 0.1, 1)] * 3 + [(2, 2, 0.1, 1)] * 3
    assert result.history.column("lr") == [None, None, None]  # nothing scheduled: no lr recorded


def test_a_round_config_may_change_any_hyperparameter():
    steps: list = []

    def more_epochs(r, config):
        return dataclasses.replace(config, local_epochs=r)

    run(rounds=3, round_config=more_epochs, on_client=lambda u: steps.append((u.client_id, u.num_steps)))
    plain: list = []
    run(rounds=3, on_client=lambda u: plain.append((u.client_id, u.num_steps)))
    assert [s for _, s in steps[3:6]] == [2 * s for _, s in plain[3:6]]
    assert [s for _, s in steps[6:]] == [3 * s for _, s in plain[6:]]


def test_the_schedule_changes_the_result():
    plain, scheduled = run(), run(round_config=Exponential(gamma=0.5).round_config)
    assert plain.history.column("clients") == scheduled.history.column("clients")
    assert not torch.equal(plain.state.params["0.weight"], scheduled.state.params["0.weight"])


@pytest.mark.parametrize("schedule", [Exponential(gamma=0.7), Cosine(warmup=1, min_lr=0.01)])
def test_sequential_equals_vectorized_with_a_schedule(schedule):
    sequential = run(engine=SequentialEngine(), round_config=schedule.round_config)
    vectorized = run(engine=VectorizedEngine(), round_config=schedule.round_config)
    assert_same_run(sequential, vectorized)
    assert vectorized.history.column("lr")[1:] == [schedule(r, 4, 0.1) for r in range(1, 5)]


def test_resume_mid_run_equals_the_uninterrupted_run():
    schedule = Cosine(warmup=2, min_lr=0.001).round_config
    whole = run(rounds=5, round_config=schedule)
    saved = []

    class Stop(Exception):
        pass

    def stop_after_two(record, state):
        saved.append((record, state))
        if record.round == 2:
            raise Stop

    with pytest.raises(Stop):
        run(rounds=5, round_config=schedule, on_round=stop_after_two)
    records, state = [r for r, _ in saved], saved[-1][1]
    resumed = run(rounds=5, round_config=schedule, resume=(state, records))
    assert resumed.history.column("lr") == whole.history.column("lr")
    assert resumed.history.column("clients") == whole.history.column("clients")
    for name, value in whole.state.params.items():
        torch.testing.assert_close(resumed.state.params[name], value, rtol=0, atol=0)


def test_the_strategy_aggregates_with_the_rounds_lr_and_the_state_keeps_the_runs():
    seen = []

    class Watching(FedAvg):
        def aggregate(self, state, updates):
            seen.append(state.run.client_lr)
            return super().aggregate(state, updates)

    result = run(rounds=3, strategy=Watching(), round_config=Step(step_size=1, gamma=0.5).round_config)
    assert seen == [0.1, 0.05, 0.025]
    assert result.state.run.client_lr == 0.1  # the run's facts, as a checkpoint holds them


def test_scaffold_with_a_schedule_scales_its_controls_by_the_rounds_lr():
    # A constant schedule that names the lr the base config does not: SCAFFOLD must use the round's.
    def half(r, config):
        return dataclasses.replace(config, lr=0.05)

    scheduled = run(rounds=2, strategy=Scaffold(), round_config=half)
    plain = run(rounds=2, strategy=Scaffold(), client=ClientConfig(batch_size=16, lr=0.05))
    for name, value in plain.state.params.items():
        torch.testing.assert_close(scheduled.state.params[name], value, rtol=0, atol=0)
    a, b = plain.state.strategy_state, scheduled.state.strategy_state
    torch.testing.assert_close(b.control, a.control, rtol=0, atol=0)


def test_a_round_config_may_not_change_the_round():
    with pytest.raises(ConfigError, match="round_config changed the round of round 1 to 2"):
        run(round_config=lambda r, config: dataclasses.replace(config, round=r + 1))
    with pytest.raises(TypeError, match="must return a ClientConfig, got float"):
        run(round_config=lambda r, config: 0.1)


def test_a_schedule_out_of_range_for_the_run_is_refused_before_training():
    with pytest.raises(ConfigError, match="warmup must be < rounds=4"):
        run(round_config=Cosine(warmup=4).round_config)
