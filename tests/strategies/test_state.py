"""The strategies' typed server state: what each strategy keeps, and its checkpoint layout."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fedforge.errors import ConfigError
from fedforge.strategies import STRATEGIES, Controls, Dynamic, Moments, Momentum, RunInfo, StrategyState, make_strategy

PARAMS = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
RUN = RunInfo(num_clients=4, client_lr=0.1)


def test_each_strategy_keeps_its_own_kind_of_state():
    kinds = {name: type(make_strategy(name).init(PARAMS, RUN).strategy_state) for name in STRATEGIES}
    assert kinds["fedavgm"] is Momentum
    assert kinds["fedadam"] is kinds["fedadagrad"] is kinds["fedyogi"] is Moments
    assert kinds["scaffold"] is Controls
    assert {name for name, kind in kinds.items() if kind is type(None)} == {
        "fedavg",
        "fedprox",
        "fednova",
        "qfedavg",
        "median",
        "trimmed_mean",
        "krum",
        "multikrum",
    }
    # Momentum starts at zero, one tensor per float entry (integer buffers take the plain mean).
    velocity = make_strategy("fedavgm").init(PARAMS, RUN).strategy_state.velocity
    assert velocity.keys() == {"w"} and velocity["w"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "state",
    [
        Momentum({"w": torch.ones(2)}),
        Moments({"w": torch.zeros(2)}, {"w": torch.ones(2)}),
        Controls({"w": torch.zeros(2)}),
        Dynamic({"w": torch.ones(2)}),
    ],
)
def test_a_state_reads_back_from_its_table_by_its_field_names(state):
    table = state.to_dict()
    assert all(isinstance(k, str) for k in table)
    back = StrategyState.from_dict(table)
    assert type(back) is type(state) and back.to_dict().keys() == table.keys()


def test_an_empty_table_is_no_state_and_an_unknown_one_is_refused():
    assert StrategyState.from_dict({}) is None
    with pytest.raises(ConfigError, match=r"^its strategy state holds m, velocity: no kind of state$"):
        StrategyState.from_dict({"velocity": {}, "m": {}})


def test_scaffold_keeps_its_control_in_its_typed_state_and_sends_it():
    strategy = make_strategy("scaffold")
    state = strategy.init({"w": torch.zeros(1)}, RUN)
    assert isinstance(state.strategy_state, Controls)
    plan = strategy.plan(state, 2)
    assert plan.inputs["w"].tolist() == [0.0]


def test_a_state_of_ones_own_with_the_same_fields_does_not_hide_momentum():
    @dataclass(frozen=True)
    class Mine(StrategyState):
        velocity: dict

    table = Momentum({"w": torch.ones(2)}).to_dict()
    assert Momentum({"w": torch.ones(2)}).kind() == "fedforge.strategies.state.Momentum"
    assert type(StrategyState.from_dict(table, "fedforge.strategies.state.Momentum")) is Momentum
    assert type(StrategyState.from_dict(table, Mine(velocity={}).kind())) is Mine
    # A table written before kinds were stored: its field names are all it has to tell.
    with pytest.raises(ConfigError, match=r"^its strategy state holds velocity: more than one kind of state$"):
        StrategyState.from_dict(table)


def test_a_state_whose_kind_is_unknown_or_not_its_fields_is_refused():
    with pytest.raises(ConfigError, match=r"^its strategy state is a mine.Gone, which is not defined here"):
        StrategyState.from_dict({"velocity": {}}, "mine.Gone")
    with pytest.raises(
        ConfigError, match=r"^its strategy state, a fedforge.strategies.state.Momentum, holds m, v, not velocity$"
    ):
        StrategyState.from_dict({"m": {}, "v": {}}, "fedforge.strategies.state.Momentum")
