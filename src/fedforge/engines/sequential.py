"""The reference engine: one client after another, in this process."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..algorithms import FROZEN
from ..client import train_client
from ..contract import ClientConfig, ClientUpdate, State
from .base import ClientTask, Engine


class SequentialEngine(Engine):
    """Trains the clients one at a time on a single scratch copy of the model.

    The scratch shares the model's frozen parameters (a pretrained base under adapters) when the
    task trains with fedforge's loop, which never writes them: the base is held once and never
    copied into the scratch (`client.load_state` skips a tensor that already is the module's)."""

    name = "sequential"

    def __init__(self) -> None:
        self._scratch: tuple[nn.Module, frozenset[str], nn.Module] | None = None

    def _module(self, model: nn.Module, config: ClientConfig) -> nn.Module:
        # One copy reused for every client of every round: no deepcopy per client.
        roles = config.algorithm.roles.assign(model) if config.task.train is None else None
        frozen = frozenset(n for n, r in roles.roles.items() if r == FROZEN) if roles is not None else frozenset()
        if self._scratch is None or self._scratch[0] is not model or self._scratch[1] != frozen:
            # A task's own loop gets the module to do as it likes (even .to() it): then nothing is shared.
            shared = {id(p): p for n, p in model.named_parameters(remove_duplicate=False) if n in frozen}
            self._scratch = (model, frozen, copy.deepcopy(model, memo=shared))
        return self._scratch[2]

    def run(
        self, model: nn.Module, global_state: State, tasks: Sequence[ClientTask], config: ClientConfig
    ) -> Iterator[ClientUpdate]:
        module = self._module(model, config)
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
