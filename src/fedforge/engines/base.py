"""What an engine is: it runs the selected clients' local training, wherever that happens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..contract import ClientConfig, ClientPlan, ClientState, OptimizerState, State
from ..data.datasets import TensorData
from ..evaluation import Evaluation
from ..reductions import Update


@dataclass(frozen=True)
class ClientTask:
    """One selected client of one round: its id, its training data, its batch-order seed, and
    what it is asked to do beyond the run's ClientConfig (`plan`).

    When `source` is given, `data` is `source[start:start + len(data)]`: engines that train
    many clients at once gather their batches from `source` directly instead of copying.
    `optimizer_state` is where the client's optimizer left off in its last round, when its task
    keeps it (`Task.keep_optimizer_state`; None: fresh); engines never change it in place.
    `client_state` is what the client kept from its last round (`algorithms.ClientState`; None:
    its first round, or an algorithm that keeps nothing); engines never change it in place.
    `counted` is the last round in which the client's update counted (0: none yet), the round
    whose state `client_state` is: the network engine tells the client (its state is on its disk).

    `evaluate` asks the client, under personalized evaluation and of an engine whose clients
    evaluate (`Engine.clients_evaluate`), to evaluate its personal model on its own held-out
    examples (`FederatedData.client_test`) in batches of this many, in `ClientUpdate.personalized`.
    `summable` says that the round loop needs this client's update only as part of the round's
    weighted mean (the strategy is linear, and no later stage transforms the update on its own):
    an engine may then send it folded with others into one `PartialSum` (the Ray engine does,
    one per worker; `VectorizedEngine(combine=True)` sums each chunk of them in one pass, in
    Ray's workers and in `fedforge run` when no tracker asks for each client); other engines, and
    the vectorized engine by default, hand back each update.
    """

    client_id: int
    data: TensorData
    seed: int
    source: TensorData | None = None
    start: int = 0
    plan: ClientPlan = ClientPlan()
    optimizer_state: OptimizerState | None = None
    summable: bool = False
    client_state: ClientState | None = None
    counted: int = 0

    evaluate: int | None = None


class RoundFailed(Exception):
    """Too few clients reported this round; the round loop retries it with a new selection."""


@dataclass(frozen=True)
class Traffic:
    """The message bytes an engine has received from clients (`bytes_up`) and sent to them
    (`bytes_down`) so far, in all rounds."""

    bytes_up: int = 0
    bytes_down: int = 0

    def since(self, before: Traffic) -> dict[str, int]:
        """The bytes moved since `before`, as a round's record names them."""
        return {"bytes_up": self.bytes_up - before.bytes_up, "bytes_down": self.bytes_down - before.bytes_down}


class Engine(ABC):
    """Runs the selected clients' training; the base of every engine, with what an engine can do
    declared (and defaulted) here, so that the round loop reads it rather than probing for it.

    A subclass names itself (`name`, a class attribute) and implements `run`. Capabilities (class
    attributes; a subclass overrides what it does differently):

    - `works_ahead`: `run` only hands the work to workers elsewhere and returns at once (the Ray
      engine). The round loop then begins each next round (its selection and tasks, and `run`)
      before it evaluates and records the round just aggregated, so that the workers train while
      the server evaluates. An error `run` raises then surfaces when that round's updates are
      read, after the round before is recorded.
    - `clients_privatize`: under differential privacy the clients clip (and noise) their own
      updates before they reach the engine (the network engine's clients do); otherwise the round
      loop does it for them, as a stage after the engine.
    - `clients_evaluate`: under personalized evaluation each client evaluates its personal model
      on its own held-out examples and its update reports the result (`ClientUpdate.personalized`:
      the network engine's clients, whose personal entries never reach the server); otherwise the
      round loop evaluates each client's personal model itself.
    - `keeps_client_state`: the engine keeps what each client keeps between its rounds (its client
      state and its kept optimizer state) where the client trains (the Ray engine: on the worker
      that holds it), so that the round loop holds none of it: tasks come without it, updates
      bring none back. The round loop hands the engine a run's states at its start (`restore`:
      none, or a resumed run's), tells it after each round which clients' updates counted
      (`commit`: only those clients' states move on, as in the round loop), and asks for every
      client's state only to write a checkpoint and at the run's end (`gather`).
    - `clients_evaluate_global`: the clients evaluate each round's global model on their own
      held-out examples (`evaluate_global`: a deployment's federated evaluation, whose server holds
      none of their data); otherwise the round loop evaluates it on the clients' held-out examples
      it holds (`FederatedData.client_test`).

    `traffic()` says how many message bytes the engine moved (None: it sends no messages), and
    `close()` releases what it holds (the Ray engine's workers).
    """

    name: str
    works_ahead: bool = False
    clients_privatize: bool = False
    clients_evaluate: bool = False
    keeps_client_state: bool = False
    clients_evaluate_global: bool = False

    @abstractmethod
    def run(
        self, model: nn.Module, global_state: State, tasks: Sequence[ClientTask], config: ClientConfig
    ) -> Iterator[Update]:
        """Train each task's client from `global_state`; yield updates as they complete.

        Updates are yielded one by one so the server can fold each into a running sum.
        """

    def traffic(self) -> Traffic | None:
        """The message bytes moved so far; None for an engine that sends none (the in-process ones)."""
        return None

    def restore(self, optimizer_states: Mapping[int, OptimizerState], client_states: Mapping[int, ClientState]) -> None:
        """A run starts from these states (none: a fresh run), and the engine forgets any others
        (`keeps_client_state`; nothing to do otherwise)."""
        return None

    def commit(self, round: int, client_ids: Collection[int]) -> None:
        """Round `round` counted with these clients' updates: their new states, from their last
        `run`, are now the ones they keep (`keeps_client_state`; nothing to do otherwise)."""
        return None

    def gather(self) -> tuple[dict[int, OptimizerState], dict[int, ClientState]]:
        """Every client's kept optimizer state and client state, by client id, as the last
        `commit` left them (`keeps_client_state`; none otherwise)."""
        return {}, {}

    def evaluate_global(self, model: nn.Module, global_state: State, config: ClientConfig, r: int) -> Evaluation | None:
        """The global model after round `r` (its shared entries `global_state`) evaluated by the
        clients on their held-out examples, pooled; None when none reported. Called only where
        `clients_evaluate_global`."""
        raise NotImplementedError(f"engine {self.name} does not have its clients evaluate the global model")

    def close(self) -> None:
        """Release what the engine holds; nothing by default."""
        return None


class _Adopted(Engine):
    """A user's engine that does not subclass Engine (an object with `name` and `run`, as engines
    were written before the base class), with the capabilities its class declares as attributes,
    its `traffic()` (or, as engines counted before, its `bytes_up` and `bytes_down`) and its `close()`."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.name = getattr(engine, "name", type(engine).__name__)
        # Read once here, so that the round loop never probes an engine.
        self.works_ahead = bool(getattr(engine, "works_ahead", False))
        self.clients_privatize = bool(getattr(engine, "clients_privatize", False))
        self.clients_evaluate = bool(getattr(engine, "clients_evaluate", False))
        traffic = getattr(engine, "traffic", None)
        counts = hasattr(engine, "bytes_up")
        self._traffic: Callable[[], Traffic | None] | None = (
            traffic if callable(traffic) else (lambda: Traffic(engine.bytes_up, engine.bytes_down)) if counts else None
        )
        close = getattr(engine, "close", None)
        self._close: Callable[[], object] | None = close if callable(close) else None

    def run(
        self, model: nn.Module, global_state: State, tasks: Sequence[ClientTask], config: ClientConfig
    ) -> Iterator[Update]:
        return self.engine.run(model, global_state, tasks, config)

    def traffic(self) -> Traffic | None:
        return self._traffic() if self._traffic is not None else None

    def close(self) -> None:
        if self._close is not None:
            self._close()


def as_engine(engine: Any) -> Engine:
    """`engine` itself when it is an Engine; else (any object with a `run` of Engine's signature)
    adopted as one, with the `works_ahead` and `clients_privatize` its class declares, and its
    `traffic()` and `close()` when it has them."""
    if isinstance(engine, Engine):
        return engine
    if not callable(getattr(engine, "run", None)):
        raise TypeError(f"an engine needs a run(model, global_state, tasks, config) method, got {engine!r}")
    return _Adopted(engine)


class RoundWatcher:
    """What an engine tells an onlooker (the server's dashboard) as a round goes: the clients a
    task went to, each update that arrived, each one refused and why. Does nothing itself."""

    def task(self, task_id: int, client_ids: Sequence[int]) -> None:
        """A new task (a round, or a retry of one) was sent to `client_ids`."""

    def arrived(self, task_id: int, client_id: int) -> None:
        """`client_id`'s update for `task_id` passed its checks."""

    def refused(self, task_id: int, client_id: int, reason: str) -> None:
        """`client_id`'s answer to `task_id` was refused, for `reason`."""
