"""Server state, the strategy interface, and the pieces strategies share."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from ..algorithms import ClientAlgorithm
from ..client import ClientPlan, ClientUpdate, State
from ..errors import ConfigError
from ..reductions import Update, cast_like
from .state import StrategyState

if TYPE_CHECKING:
    from ..privacy.run import PrivacyRunState


@dataclass(frozen=True)
class RunInfo:
    """Facts of the run that some strategies need, handed to `Strategy.init` explicitly (the
    Python API and the command line give the same ones).

    Attributes:
        num_clients: all clients of the run, N (SCAFFOLD's server control averages over them).
        client_lr: the clients' learning rate (SCAFFOLD's control scale; q-FedAvg's L = 1 / lr).
        client_momentum: the clients' SGD momentum (FedNova's normalizer).
    """

    num_clients: int
    client_lr: float
    client_momentum: float = 0.0

    def __post_init__(self):
        if self.num_clients < 1 or not self.client_lr > 0 or not 0 <= self.client_momentum < 1:
            raise ConfigError(f"run facts out of range: {self}")


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries from one round to the next.

    `params` is the global model's full state (parameters and buffers); `strategy_state` the
    strategy's own (`strategies.state`: FedAvgM's momentum, the adaptive moments, SCAFFOLD's
    controls; None for a strategy without any); `run` the facts of the run it was initialised
    with; `privacy` the privacy stage's (the accountant, the clip bound), in a run with
    differential privacy.
    """

    params: State
    round: int = 0
    strategy_state: StrategyState | None = None
    run: RunInfo | None = None
    privacy: PrivacyRunState | None = None

    def unchanged(self) -> ServerState:
        """The state after a round in which no update arrived: same model, next round."""
        return replace(self, round=self.round + 1)

    def next(self, params: State, strategy_state: StrategyState | None = None) -> ServerState:
        """The state of the next round: new `params`, and new `strategy_state` when given."""
        kept = self.strategy_state if strategy_state is None else strategy_state
        return replace(self, params=params, round=self.round + 1, strategy_state=kept)

    def run_info(self, strategy: str) -> RunInfo:
        if self.run is None:
            raise ConfigError(f"{strategy} needs the run's facts: start from strategy.init(params, run=RunInfo(...))")
        return self.run


@runtime_checkable
class Strategy(Protocol):
    name: str

    def init(self, params: State, run: RunInfo) -> ServerState:
        """The server state before round 1 of a run with facts `run`."""

    def plan(self, state: ServerState, client_id: int) -> ClientPlan:
        """What selected client `client_id` is asked to do this round (its algorithm's `inputs`)."""

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        """The next state from this round's updates (an iterable, consumed once)."""


@runtime_checkable
class LinearStrategy(Strategy, Protocol):
    """A strategy whose `aggregate` depends on the round's updates only through their
    example-weighted mean delta (and on whether any arrived): `aggregate(state, updates)` is
    `apply_mean(state, weighted mean delta)`. An engine may then hand it partial sums of several
    clients (`reductions.PartialSum`) instead of every update, e.g. one per Ray worker, and the
    privacy stage and secure aggregation, which produce only a mean, can serve it. FedAvg and the
    server-optimizer family are linear; checked with `isinstance(strategy, LinearStrategy)`.
    """

    def aggregate(self, state: ServerState, updates: Iterable[Update]) -> ServerState:
        """The next state from this round's updates or partial sums (an iterable, consumed once)."""

    def apply_mean(self, state: ServerState, mean: State) -> ServerState:
        """The next state from the round's mean delta, aggregated elsewhere (the privacy stage)."""


NO_PLAN = ClientPlan()


class StrategyBase:
    """`init` that copies the model, `plan` that asks nothing special, and no client algorithm of
    its own (`client_algorithm`: the clients run the run's, plain training by default).

    A strategy with `apply_mean` is a `LinearStrategy`. Those that look at each update (robust
    aggregators, SCAFFOLD's controls, q-FedAvg's losses, FedNova's step counts) are not, and say
    why in `needs_each_update`: the reason given when something that serves linear strategies
    only (differential privacy, secure aggregation) refuses them (`check_linear`).
    """

    needs_each_update = "it looks at each update, not only at their weighted mean"
    # Why it cannot run with personal or frozen entries (None: it can), e.g. a robust aggregator.
    needs_every_entry: ClassVar[str | None] = None

    def init(self, params: State, run: RunInfo) -> ServerState:
        return ServerState({k: v.detach().clone() for k, v in params.items()}, run=run)

    def plan(self, state: ServerState, client_id: int) -> ClientPlan:
        return NO_PLAN

    def client_algorithm(self) -> ClientAlgorithm | None:
        """What its clients must do (FedProx's proximal term, SCAFFOLD's controls); None: whatever
        the run's client algorithm is (`ClientConfig.algorithm`)."""
        return None


def client_algorithm(strategy: Strategy, configured: ClientAlgorithm) -> ClientAlgorithm:
    """The client algorithm of a run of `strategy` whose clients are configured with `configured`:
    the strategy's own when it has one (with the configured roles), else the configured one."""
    own = getattr(strategy, "client_algorithm", None)
    mine = own() if callable(own) else None
    if mine is None:
        return configured
    if type(configured) is not ClientAlgorithm:
        raise ConfigError(
            f"strategy {strategy.name} brings its own client algorithm ({mine.name}); "
            f"it cannot run with algorithm {configured.name}"
        )
    return mine.with_roles(configured.roles)


def step_params(params: State, step: State, lr: float = 1.0) -> State:
    """params + lr * step for float entries; integer entries (buffers) take the step as it is."""
    return {k: v + lr * step[k] if v.is_floating_point() else v + cast_like(step[k], v) for k, v in params.items()}


def check_server_lr(server_lr: float) -> None:
    if not server_lr > 0:
        raise ConfigError(f"server_lr must be > 0, got {server_lr}")


def float_keys(state: State) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]
