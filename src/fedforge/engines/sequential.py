"""The reference engine: one client after another, in this process."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..client import train_client
from ..contract import ClientConfig, ClientUpdate, State
from .base import ClientTask, Engine


class SequentialEngine(Engine):
    """Trains the clients one at a time on a single scratch copy of the model."""

    name = "sequential"

    def __init__(self) -> None:
        self._scratch: tuple[nn.Module, nn.Module] | None = None

    def _module(self, model: nn.Module) -> nn.Module:
        # One copy reused for every client of every round: no deepcopy per client.
        if self._scratch is None or self._scratch[0] is not model:
            self._scratch = (model, copy.deepcopy(model))
        return self._scratch[1]

    def run(
        self, model: nn.Module, global_state: State, tasks: Sequence[ClientTask], config: ClientConfig
    ) -> Iterator[ClientUpdate]:
        module = self._module(model)
        for task in tasks:
            yield train_client(
                module,
                global_state,
                task.data,
                config,
                client_id=task.client_id,
                generator=torch.Generator().manual_seed(task.seed),
                plan=task.plan,
                optimizer_state=task.optimizer_state,
                client_state=task.client_state,
            )
