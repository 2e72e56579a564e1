"""What a server tells an enrolled client when it joins, and what the client accepts of it.

The server sends only the settings a client needs to train (SETTINGS, an explicit list): never
its tracking URIs (which may hold credentials), folders or paths. The client checks the welcome
key by key (CHECKS: one small function per key; keys it does not know are ignored) and imports
no code the server names unless its own operator allowed it (`References`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from .._imports import is_reference
from ..config import Config, checked_settings
from ..errors import ConfigError
from ..llm.settings import HF_PREFIX, is_hf_model
from .wire import MAX_INT

# The settings a client trains with: its data (the run's partition, for --partition-of), its
# model and task, and its optimizer (and clients_per_round, which Config checks against
# num_clients). Nothing else of the server's settings leaves the server.
SETTINGS = (
    "seed",
    "dataset",
    "synthetic_alpha",
    "synthetic_beta",
    "target",
    "num_clients",
    "clients_per_round",
    "partition",
    "alpha",
    "shards_per_client",
    "sigma",
    "client_test_fraction",
    "model",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "text_column",
    "label_column",
    "group_column",
    "instruction_column",
    "response_column",
    "prompt_template",
    "max_length",
    "truncation",
    "padding",
    "task",
    "optimizer",
    "keep_optimizer_state",
    "local_epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "personalized_eval",
    "eval_batch_size",
)


def welcome_header(config: Config) -> dict[str, Any]:
    """The welcome a server sends: the SETTINGS of `config` that are set; an hf: model, and a
    dataset of a file (csv:PATH, jsonl:PATH, ...), by the file's or folder's name alone (a path on
    the server's disk: each client loads its own copy)."""
    values = {k: getattr(config, k) for k in SETTINGS if getattr(config, k) is not None}
    if is_hf_model(config.model):
        values["model"] = HF_PREFIX + _name(config.model[len(HF_PREFIX) :])
    kind, colon, path = config.dataset.partition(":")
    if colon and path:
        values["dataset"] = f"{kind}:{_name(path)}"
    return {"config": values}


def _name(path: str) -> str:
    """The last part of a path (either slash), what a welcome may say of a file of the server's."""
    return PurePosixPath(path.replace("\\", "/")).name


# The most any task may ask, whatever the client's operator allows: a round's learning rate,
# and the run's rounds (a task names its round and the run's rounds, both bounded by it).
MAX_LR = 1e6
MAX_ROUNDS = 1_000_000


class Unacceptable(Exception):
    """A message from the server that this client refuses (the reason is safe to log)."""


@dataclass(frozen=True)
class ClientLimits:
    """The most a server may ask of this client: local epochs (the run's and a task's), optimizer
    steps in one task, batch size, and seconds of training for one task (past them the client
    leaves that round, sends nothing and waits for the next task); and the least it protects its
    updates with: `min_noise`, a floor on local differential privacy's noise multiplier (None:
    the client applies whatever clip and noise each task asks for)."""

    max_epochs: int = 1000
    max_steps: int = 1_000_000
    max_batch_size: int = 65_536
    max_round_seconds: float = 3600.0
    min_noise: float | None = None

    def __post_init__(self):
        for name in ("max_epochs", "max_steps", "max_batch_size"):
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= MAX_INT:
                raise ConfigError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.max_round_seconds, (int, float)) and 0 < self.max_round_seconds < math.inf):
            raise ConfigError(f"max-round-seconds must be a number > 0, got {self.max_round_seconds!r}")
        if self.min_noise is not None and not (type(self.min_noise) in (int, float) and 0 < self.min_noise <= 1e6):
            raise ConfigError(f"dp-min-noise must be a number in (0, 1e6], got {self.min_noise!r}")

    def check_privacy(self, task_id: int, clip: float | None, noise_multiplier: float, secure: bool) -> None:
        """Unacceptable when task `task_id` would have this client's update leave with less noise
        than its floor: a noise multiplier below it, no clip bound (nothing to scale the noise to),
        or a secure aggregation round (the client clips and masks its update, it adds no noise)."""
        floor = self.min_noise
        if floor is None:
            return
        if secure:
            raise Unacceptable(
                f"task {task_id} opens a secure aggregation round, in which this client adds no "
                f"noise of its own (--dp-min-noise {floor:g})"
            )
        if clip is None:
            raise Unacceptable(
                f"task {task_id} asks for no clip bound, and this client's --dp-min-noise {floor:g} needs one"
            )
        if noise_multiplier < floor:
            raise Unacceptable(
                f"task {task_id} asks for noise multiplier {noise_multiplier!r}, below this "
                f"client's --dp-min-noise {floor:g}"
            )

    def check_config(self, config: Config) -> None:
        if config.local_epochs > self.max_epochs:
            raise Unacceptable(
                f"local_epochs {config.local_epochs} is above this client's --max-epochs {self.max_epochs}"
            )
        if config.batch_size > self.max_batch_size:
            raise Unacceptable(
                f"batch_size {config.batch_size} is above this client's --max-batch-size {self.max_batch_size}"
            )


@dataclass(frozen=True)
class References:
    """The code a client may import because its operator named it: `model` and `task` (its own,
    from `--model`/`--task`: they replace the server's), and `allow`, references the server may
    name (`--allow`). `own_model`/`own_task`: the client's app brings its own, so the server's
    reference for it is a name only, never imported."""

    model: str | None = None
    task: str | None = None
    allow: frozenset[str] = frozenset()
    own_model: bool = False
    own_task: bool = False

    def check(self, what: str, server_name: str) -> str:
        """The name this client uses for `what` ("model" or "task") when the server names
        `server_name`; Unacceptable when that is code this client may not import."""
        mine = self.model if what == "model" else self.task
        if mine is not None:
            return mine
        if what == "model" and is_hf_model(server_name) and not self.own_model:
            raise Unacceptable(
                f"the server trains model {server_name}, a pretrained transformer: give --model hf:PATH, "
                "this client's copy of the same model (its adapters are what travel)"
            )
        if (
            is_reference(server_name)
            and server_name not in self.allow
            and not (self.own_model if what == "model" else self.own_task)
        ):
            raise Unacceptable(
                f"the server names {what} {server_name!r}, code this client does not import "
                f"(to run it, give --allow {server_name}, or --{what} with your own)"
            )
        return server_name

    def importable(self, name: str) -> bool:
        return not is_reference(name) or name in self.allow or name in (self.model, self.task)


@dataclass(frozen=True)
class Welcome:
    """A checked welcome: the run's settings (its model and task those this client trains,
    or, where its app brings its own and may not import the server's, the defaults) and the
    names the server gave."""

    config: Config
    server_model: str
    server_task: str


def _check_config(values: Any, references: References) -> dict[str, Any]:
    """The "config" entry: the run's settings, as Welcome's config, server_model and server_task."""
    if not isinstance(values, dict):
        raise Unacceptable("its settings are not an object")
    values = {k: v for k, v in values.items() if k in SETTINGS}  # an older server sends more: unused
    try:
        values = checked_settings(values, "server settings")
        names = {}
        for what in ("model", "task"):
            name = values.get(what, getattr(Config, what))
            if not isinstance(name, str):
                raise Unacceptable(f"{what} {name!r} is not a name")
            used = references.check(what, name)
            names[f"server_{what}"], values[what] = name, used if references.importable(used) else getattr(Config, what)
        return {"config": Config.from_dict(values, source="server settings"), **names}
    except ConfigError as e:
        raise Unacceptable(str(e)) from None


# One function per key of the welcome: (its value, the client's References) -> Welcome's fields it
# gives. A key not listed here is ignored; "config" must be there.
CHECKS: Mapping[str, Callable[[Any, References], dict[str, Any]]] = {"config": _check_config}


def check_welcome(header: dict, references: References) -> Welcome:
    """The Welcome in `header`, each key checked by its function in CHECKS; Unacceptable with
    the reason when anything is off."""
    if "config" not in header:
        raise Unacceptable("the welcome holds no settings")
    fields: dict[str, Any] = {}
    for key, check in CHECKS.items():
        if key in header:
            fields.update(check(header[key], references))
    return Welcome(**fields)


__all__ = [
    "CHECKS",
    "MAX_LR",
    "MAX_ROUNDS",
    "SETTINGS",
    "ClientLimits",
    "References",
    "Unacceptable",
    "Welcome",
    "check_welcome",
    "welcome_header",
]
