"""What an engine is: it runs the selected clients' local training, wherever that happens."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from ..contract import ClientConfig, ClientPlan, OptimizerState, State
from ..data.datasets import TensorData
from ..reductions import Update


@dataclass(frozen=True)
class ClientTask:
    """One selected client of one round: its id, its training data, its batch-order seed, and
    what it is asked to do beyond the run's ClientConfig (`plan`).

    When `source` is given, `data` is `source[start:start + len(data)]`: engines that train
    many clients at once gather their batches from `source` directly instead of copying.
    `optimizer_state` is where the client's optimizer left off in its last round, when its task
    keeps it (`Task.keep_optimizer_state`; None: fresh); engines never change it in place.
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


class RoundFailed(Exception):
    """Too few clients reported this round; the round loop retries it with a new selection."""


class Engine(Protocol):
    """Runs the selected clients' training.

    An engine whose `run` only hands the work to workers elsewhere and returns at once may say so
    with a class attribute `works_ahead = True` (the Ray engine does): the round loop then begins
    each next round (its selection and tasks, and `run`) before it evaluates and records the round
    just aggregated, so that the workers train while the server evaluates. An error `run` raises
    then surfaces when that round's updates are read, after the round before is recorded.
    """

    name: str

    def run(
        self, model: nn.Module, global_state: State, tasks: Sequence[ClientTask], config: ClientConfig
    ) -> Iterator[Update]:
        """Train each task's client from `global_state`; yield updates as they complete.

        Updates are yielded one by one so the server can fold each into a running sum.
        """
        ...


class RoundWatcher:
    """What an engine tells an onlooker (the server's dashboard) as a round goes: the clients a
    task went to, each update that arrived, each one refused and why. Does nothing itself."""

    def task(self, task_id: int, client_ids: Sequence[int]) -> None:
        """A new task (a round, or a retry of one) was sent to `client_ids`."""

    def arrived(self, task_id: int, client_id: int) -> None:
        """`client_id`'s update for `task_id` passed its checks."""

    def refused(self, task_id: int, client_id: int, reason: str) -> None:
        """`client_id`'s answer to `task_id` was refused, for `reason`."""
