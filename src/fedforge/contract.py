"""The client contract: what a client is asked to do, and what it sends back.

Strategies, scenarios, engines, the round loop and the network all speak these types; the
training itself is `client.train_client`, and the optimizer rules are in `optim`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .algorithms import PLAIN, ClientAlgorithm, ClientState
from .errors import ConfigError
from .optim import LocalTerms, OptimizerState, Rule, State, rule_for
from .tasks import CLASSIFICATION, OPTIMIZERS, Task


@dataclass(frozen=True)
class ClientConfig:
    """Local training hyperparameters, shared by every client of a run, and the task they train
    (its loss, metrics and optimizer; the tutorial's classification with SGD by default).

    `optimizer` names the client optimizer, as `--optimizer` does: "sgd" (fedforge's, with
    momentum and weight_decay), "adam" or "adamw" (lr and weight_decay from here); the task then
    trains with it (`Task.with_optimizer`). None: the task's own (SGD for the built-in ones).

    `round` and `rounds` are the round a client trains in (counted from 1) and the run's number
    of rounds, set by the round loop for each round (0: unknown, outside a run), so that a task's
    own training loop (`Task.train`) sees them; a round configuration (`simulate(round_config=...)`,
    a learning-rate schedule) makes the round's config from the run's.

    `algorithm` is what the clients do beyond plain local training (`fedforge.algorithms`: the
    roles of the model's entries, the client's state, its loss terms and phases); the round loop
    sets the strategy's own (FedProx's, SCAFFOLD's, FedDyn's) when it has one.
    """

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    task: Task = CLASSIFICATION
    optimizer: str | None = None
    round: int = 0
    rounds: int = 0
    algorithm: ClientAlgorithm = PLAIN

    def __post_init__(self):
        if self.optimizer is not None:
            if self.optimizer not in OPTIMIZERS:
                raise ConfigError(f"unknown optimizer {self.optimizer!r} (choose from: {', '.join(OPTIMIZERS)})")
            # The task's own options stay when it names this optimizer already (replace() comes by again).
            if self.task.optimizer is not OPTIMIZERS[self.optimizer]:
                object.__setattr__(self, "task", self.task.with_optimizer(self.optimizer))
        if not isinstance(self.algorithm, ClientAlgorithm):
            raise ConfigError(f"algorithm must be a fedforge ClientAlgorithm, got {type(self.algorithm).__name__}")
        if self.local_epochs < 1:
            raise ConfigError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.round <= self.rounds:
            raise ConfigError(f"round must be in 0..rounds (0: unknown), got round {self.round} of {self.rounds}")
        if self.momentum and self.task.optimizer is not None:
            raise ConfigError(f"momentum is SGD's; {self.task.optimizer.__name__} takes its own options")
        if self.task.optimizer is not None:  # its options, checked once by the optimizer itself
            try:
                self.task.optimizer([torch.zeros(1, requires_grad=True)], **self.optimizer_options)
            except (TypeError, ValueError) as e:
                raise ConfigError(
                    f"task {self.task.name}: {self.task.optimizer.__name__}: {str(e).splitlines()[0]}"
                ) from None

    @property
    def optimizer_options(self) -> dict[str, Any]:
        """What the task's torch.optim optimizer is built with: lr and weight_decay from here, then
        the task's `optimizer_options`."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, **self.task.optimizer_options}

    @property
    def rule(self) -> Rule | None:
        """The optimizer rule the clients train with (`optim`), or None when the task's optimizer is
        one only torch.optim computes (it then runs as torch.optim, on the sequential engine)."""
        return rule_for(
            self.task.optimizer,
            self.task.optimizer_options,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )


@dataclass(frozen=True)
class ClientPlan:
    """What one selected client is asked to do this round, beyond the run's ClientConfig.

    Strategies send what their client algorithm needs (`inputs`: SCAFFOLD's server control);
    the simulation shapes the amount of work (heterogeneous epochs, stragglers).

    Attributes:
        epochs: local epochs for this client (None: the config's).
        max_steps: stop after this many optimizer steps (a straggler's partial work), in each phase.
        inputs: tensors by name for the client's algorithm (`ClientAlgorithm.terms`, `finish`),
            beyond the global model; None: none.
        clip, noise_multiplier: differential privacy done by the client (`fedforge.privacy`):
            clip the update's norm to `clip` before sending it and, under local DP, add noise
            of std noise_multiplier * clip from the client's own random source.
        measure_initial_loss: also report the global model's loss on the client's data
            before training (q-FedAvg needs it).
    """

    epochs: int | None = None
    max_steps: int | None = None
    inputs: State | None = None
    measure_initial_loss: bool = False
    clip: float | None = None
    noise_multiplier: float = 0.0

    def num_steps(self, num_examples: int, config: ClientConfig) -> int:
        epochs = self.epochs or config.local_epochs
        steps = epochs * math.ceil(num_examples / config.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def phase_steps(self, num_examples: int, config: ClientConfig) -> list[int]:
        """The optimizer steps of each of `config.algorithm`'s phases (each phase's own epochs
        where it names them, FedRep's head's), in their order."""
        return [phase.plan(self).num_steps(num_examples, config) for phase in config.algorithm.phases]


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back: the change to every shared state entry and how it was obtained.

    `delta` covers the shared parameters and buffers (e.g. BatchNorm statistics; all of them unless
    the algorithm's roles make some personal or frozen), each in its own dtype; `extras` are the
    tensors its algorithm sends beside it (SCAFFOLD's control-variate change).
    `metrics` are the task's training metrics by name (`loss` among them), measured on the
    examples seen while training; `train_accuracy` is the classification task's `accuracy`.
    `optimizer_state` is the client's optimizer state after training when its task keeps it
    between rounds (`Task.keep_optimizer_state`), else None: the round loop hands it back to
    the client's next task; strategies ignore it. `client_state` is what the client keeps until
    its next round (`algorithms.ClientState`: personal entries, its algorithm's state), None when
    it keeps nothing; it never leaves the client (a deployment client stores it on its disk).
    `personalized` holds the task's metrics of the client's personal model on its own held-out
    examples (personalized evaluation), and the number of those examples.
    """

    client_id: int
    delta: State
    num_examples: int
    num_steps: int
    train_loss: float
    train_accuracy: float | None
    initial_loss: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    optimizer_state: OptimizerState | None = None
    extras: State = field(default_factory=dict)
    client_state: ClientState | None = None
    personalized: tuple[Mapping[str, float], int] | None = None

    def training_metrics(self) -> Mapping[str, float | None]:
        """The training metrics by name: `metrics`, or loss and accuracy for an update without them."""
        return self.metrics or {"loss": self.train_loss, "accuracy": self.train_accuracy}


__all__ = ["ClientConfig", "ClientPlan", "ClientState", "ClientUpdate", "LocalTerms", "OptimizerState", "State"]
