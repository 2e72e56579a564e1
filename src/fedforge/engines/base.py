"""What an engine is: it runs the selected clients' local training, wherever that happens."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from ..client import ClientConfig, ClientPlan, ClientUpdate, State
from ..data.datasets import TensorData


@dataclass(frozen=True)
class ClientTask:
    """One selected client of one round: its id, its training data, its batch-order seed, and
    what it is asked to do beyond the run's ClientConfig (`plan`).

    When `source` is given, `data` is `source[start:start + len(data)]`: engines that train
    many clients at once gather their batches from `source` directly instead of copying.
    """

    client_id: int
    data: TensorData
    seed: int
    source: TensorData | None = None
    start: int = 0
    plan: ClientPlan = ClientPlan()


class RoundFailed(Exception):
    """Too few clients reported this round; the round loop retries it with a new selection."""


class Engine(Protocol):
    name: str

    def run(
        self, model: nn.Module, global_state: State, tasks: Sequence[ClientTask], config: ClientConfig
    ) -> Iterator[ClientUpdate]:
        """Train each task's client from `global_state`; yield updates as they complete.

        Updates are yielded one by one so the server can fold each into a running sum.
        """
        ...
