"""A deployment client's own code: its data, and the task and model it trains.

`fedforge client --app package.module:object` runs it: `object` is a ClientApp. The server
needs none of it beyond the model it aggregates and evaluates (its `--model`, `--task`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._imports import load_instance
from .errors import ConfigError
from .tasks import Task


@dataclass(frozen=True)
class ClientApp:
    """What a client of a deployment brings.

    Attributes:
        data: (client_id, config) -> this client's training data: anything `Task.data` takes
            (a tuple or dict of tensors or arrays, a torch.utils.data.Dataset, a TensorData).
            `config` is the settings the server sends its clients (a fedforge.Config of
            network/welcome.py's SETTINGS; a model or task the server names that this client
            does not import is left at its default there).
        task: the task the client trains (default: the server's `--task`); its own training
            loop, loss, metrics and optimizer run here. Its loop (`Task.train(module, batches,
            config)`) is given each round's ClientConfig: the round in `config.round`, the run's
            rounds in `config.rounds`, and the lr, local epochs, momentum and weight decay the server
            sends for that round.
        model: a factory (input_shape, num_classes) -> nn.Module (default: the server's
            `--model`); its state must have the names and shapes of the server's model, whose
            weights it receives every round (its shared entries; the client's own model gives the
            frozen ones, and the personal ones before its first round).
        validation: (client_id, config) -> this client's held-out data (as `data`), or None:
            what it evaluates its personal model on after each round's training, when its
            algorithm personalizes (FedPer, FedRep, Ditto, FedBN; or --personalized-eval on), and
            reports to the server (`personalized_<metric>` in the run's history); and what it
            evaluates the global model on when the server asks (federated evaluation:
            `federated_<metric>`, `fedforge server --no-server-eval`). Default: none,
            except for --partition-of, whose held-out rows are its share of the run's
            client_test_fraction.
        evaluate: (module, data) -> {name: number}: how this client evaluates its personal
            model, or the global model (`module`, loaded with it), on its held-out data (`data`,
            as the task prepares it), instead of the task's loss and metrics.
    """

    data: Callable[[int, Any], Any]
    task: Task | None = None
    model: Callable[[tuple[int, ...], int], nn.Module] | None = None
    validation: Callable[[int, Any], Any] | None = None
    evaluate: Callable[[nn.Module, Any], Mapping[str, float]] | None = None

    def __post_init__(self):
        if not callable(self.data):
            raise ConfigError(f"ClientApp.data must be a function (client_id, config) -> data, got {self.data!r}")
        if self.task is not None and not isinstance(self.task, Task):
            raise ConfigError(f"ClientApp.task must be a fedforge.Task, got {type(self.task).__name__}")
        if self.model is not None and not callable(self.model):
            raise ConfigError("ClientApp.model must be a factory (input_shape, num_classes) -> nn.Module")
        if self.validation is not None and not callable(self.validation):
            raise ConfigError("ClientApp.validation must be a function (client_id, config) -> held-out data")
        if self.evaluate is not None and not callable(self.evaluate):
            raise ConfigError("ClientApp.evaluate must be a function (module, data) -> {name: number}")


def load_app(name: str) -> ClientApp:
    """The ClientApp `package.module:object` (or a function of no arguments returning one)."""
    return load_instance(name, "client app", ClientApp)


__all__ = ["ClientApp", "load_app"]
