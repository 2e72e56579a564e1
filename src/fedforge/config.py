"""An experiment's settings: frozen groups by owner, read from TOML and overridden by flags.

Each group (data, client, strategy, privacy, scenario, engine, tracking) lives next to the code
that uses it and checks its own values; `Config` is all of them at once, with flat fields
(`config.local_epochs`) and the run's own (name, rounds, ...). Each field is both a config-file
key (`local_epochs = 2`, at the top or in its group's table `[client]`) and a CLI flag
(`--local-epochs 2`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import tomli_w
import torch

from ._imports import load_object
from ._options import check_choices, checked, field_types, flatten, of_group, option
from .client import ClientSettings
from .data.settings import DataSettings
from .data.sources import Request
from .data.tables import parse_source
from .devices import DeviceSettings
from .engines.settings import EngineSettings, parse_bytes
from .errors import ConfigError
from .llm.settings import TEXT_TASKS, LlmSettings, TextSettings, is_hf_model
from .llm.text import load_requested, text_options
from .privacy.run import SAMPLINGS
from .privacy.settings import PrivacySettings
from .scenarios import Scenario, ScenarioSettings
from .schedules import parse_schedule
from .staleness import AsyncSettings
from .strategies import LINEAR_STRATEGIES, STRATEGIES
from .strategies.settings import StrategySettings, option_entry
from .tasks import TARGETS, TASKS, make_task
from .tracking import TrackingSettings

G = TypeVar("G")


@dataclass(frozen=True)
class RunSettings:
    """The run itself: its name and folder, seed, rounds, selection and evaluation (TOML: flat keys)."""

    name: str | None = option(None, "run name: outputs go to OUT_DIR/NAME (default: dataset-model-strategy-time)")
    out_dir: str = option("runs", "folder that holds the run folders")
    seed: int = option(0, "seed of every random choice (partition, init, selection, batches)")
    rounds: int = option(5, "number of federated rounds")
    clients_per_round: int | float = option(5, "clients selected per round: a count, or a fraction like 0.1")
    sampling: str = option(
        "fixed",
        "client sampling: fixed (clients_per_round each round) or poisson (each client "
        "joins with probability clients_per_round / num_clients; what DP accounting assumes)",
        SAMPLINGS,
    )
    eval_batch_size: int = option(1024, "batch size for evaluation (does not change results)")
    eval_train: bool = option(False, "also evaluate the global model on all training data every round")
    personalized_eval: str = option(
        "auto",
        "each client that trains evaluates its own model on its held-out examples (client_test_fraction): "
        "the round's personalized_accuracy and its p10/p50/p90 (auto: for an algorithm that keeps a model "
        "on each client)",
        ("auto", "on", "off"),
    )
    evaluate_fn: str | None = option(
        None,
        "an evaluation of your own on the server every round: package.module:function, called with the "
        "model (global weights loaded, eval mode) and the round, returning numbers by name, recorded as eval_NAME",
        metavar="MODULE:FUNCTION",
    )
    quiet: bool = option(False, "no progress bars (shown only on a terminal: the run's clients, a dataset's download)")
    checkpoint_key_file: str | None = option(
        None,
        "sign the run's checkpoints with the secret in FILE (HMAC-SHA256; kept outside the run folder), "
        "and resume only a checkpoint signed with it",
        metavar="FILE",
    )

    def __post_init__(self):
        check_choices(self, RunSettings)
        if self.evaluate_fn is not None and not callable(load_object(self.evaluate_fn, "evaluate_fn")):
            raise ConfigError(f"evaluate_fn {self.evaluate_fn!r} is not a function (model, round) -> numbers by name")
        for name in ("rounds", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.name is not None and not re.fullmatch(r"[\w.-]+", self.name):
            raise ConfigError(f"name may hold letters, digits, '.', '-' and '_' only, got {self.name!r}")
        if isinstance(self.clients_per_round, float) and not 0 < self.clients_per_round <= 1:
            raise ConfigError(f"clients_per_round as a fraction must be in (0, 1], got {self.clients_per_round}")


# The groups in the order of their keys (in --help, in a run's config.toml); each TOML table's name.
GROUPS: dict[str, type] = {
    "run": RunSettings,
    "data": DataSettings,
    "client": ClientSettings,
    "llm": LlmSettings,
    "text": TextSettings,
    "strategy": StrategySettings,
    "privacy": PrivacySettings,
    "scenario": ScenarioSettings,
    "devices": DeviceSettings,
    "asynchronous": AsyncSettings,
    "engine": EngineSettings,
    "tracking": TrackingSettings,
}
# Settings of one command, not of the run: a resumed run is given them again (its checkpoint key
# above all: one who resumes a signed run shows the key; and the leave to run a model's own code,
# which a run folder's config.toml must not grant).
INVOCATION_KEYS = ("quiet", "checkpoint_key_file", "trust_remote_code")
# `strategy = "fedprox"` at the top is `name = "fedprox"` in the table [strategy].
ALIASES = {"strategy.name": "strategy"}


# Fields are collected from the last base to the first: the groups' order is GROUPS'.
@dataclass(frozen=True)
class Config(
    TrackingSettings,
    EngineSettings,
    AsyncSettings,
    DeviceSettings,
    ScenarioSettings,
    PrivacySettings,
    StrategySettings,
    TextSettings,
    LlmSettings,
    ClientSettings,
    DataSettings,
    RunSettings,
):
    """Settings of one experiment, every group's flat. Defaults are the tutorial's experiment."""

    def __post_init__(self):
        for group in GROUPS.values():
            group.__post_init__(self)  # each group checks its own fields
        self._check_across_groups()

    def _check_across_groups(self) -> None:
        """What no group can check alone: the task a dataset needs, the clients a round
        selects, the strategy and client count differential privacy needs, over-selection's sampling."""
        if self.dataset == "shakespeare" and self.task in TASKS and self.task != "language-model":
            raise ConfigError(
                f"dataset shakespeare is next-character prediction: it needs task language-model, got {self.task!r}"
            )
        if not isinstance(self.clients_per_round, float) and not 1 <= self.clients_per_round <= self.num_clients:
            raise ConfigError(
                f"clients_per_round must be between 1 and num_clients={self.num_clients}, got {self.clients_per_round}"
            )
        if not is_hf_model(self.model) and (changed := self.group(LlmSettings).changed()):
            raise ConfigError(f"{changed[0]} is a setting of hf: models (--model hf:PATH), not of {self.model!r}")
        self._check_text()
        if self.precision == "bf16" and not _cuda(self.device):
            raise ConfigError(
                f"precision bf16 is for CUDA (device {self.device!r} is the CPU here, where hf: models train in "
                "float32: leave --precision out)"
            )
        privacy = self.privacy()
        if privacy is not None:
            privacy.check(self.strategy_object(), self.num_clients)
        if self.over_select > 0 and (self.sampling != "fixed" or privacy is not None):
            raise ConfigError("over_select needs sampling fixed and no differential privacy (docs/time.md)")
        self._check_asynchronous(privacy is not None)
        parse_schedule(self.lr_schedule).check(self.lr, self.rounds)

    def _check_asynchronous(self, private: bool) -> None:
        """What asynchronous aggregation cannot run with, in one line (docs/time.md says why);
        the round loop checks the rest (state kept on the clients) when it starts."""
        if self.aggregation == "sync":
            return
        what = f"aggregation {self.aggregation}"
        if private:
            raise ConfigError(f"{what} with differential privacy is not supported yet (docs/time.md)")
        if self.sampling != "fixed":
            raise ConfigError(f"{what} samples clients as slots free up: it needs sampling fixed")
        if self.round_deadline is not None or self.over_select > 0:
            raise ConfigError(f"round_deadline and over_select are for synchronous rounds, not {what}")
        if self.scenario() != Scenario():
            raise ConfigError(f"{what} with a scenario is not supported yet: the devices' speeds make the stragglers")
        for name in ("buffer_size", "concurrency"):
            value = getattr(self, name)
            if value is not None and value > self.num_clients:
                raise ConfigError(f"{name}={value} is more than num_clients={self.num_clients}")
        if self.aggregation == "fedbuff" and self.strategy not in LINEAR_STRATEGIES:
            raise ConfigError(
                f"aggregation fedbuff steps with the strategy's server optimizer from a buffer's weighted mean: "
                f"strategy {self.strategy} cannot ({', '.join(LINEAR_STRATEGIES)} can)"
            )
        if self.aggregation == "fedasync" and (self.strategy != "fedavg" or self.server_lr not in (None, 1)):
            raise ConfigError(
                "aggregation fedasync mixes each client's model into the global one (async_alpha): it has no "
                "server optimizer: use strategy fedavg with server_lr 1"
            )

    @property
    def clocked(self) -> bool:
        """Whether the run keeps a virtual clock: it has device profiles, or aggregates
        asynchronously (on default ones)."""
        return self.profiled or self.aggregation != "sync"

    @property
    def reads_text(self) -> bool:
        """Whether the dataset is text tokenized with the model's tokenizer (`fedforge.llm.text`): a
        text task on jsonl:, csv:, hf: (without --target: with one they are read as tokens) or
        shakespeare-text."""
        kind = self.dataset.partition(":")[0]
        if kind == "shakespeare-text":
            return True
        return self.task in TEXT_TASKS and self.target is None and kind in ("jsonl", "csv", "hf")

    def _check_text(self) -> None:
        """The task, model and target that text data need, and text settings only with text data."""
        text_options(self.group(TextSettings))  # the columns' pairing, the template
        kind = self.dataset.partition(":")[0]
        if kind in ("jsonl", "shakespeare-text") or self.reads_text:
            if self.task not in TEXT_TASKS:
                raise ConfigError(
                    f"dataset {self.dataset} is text: train it with --task {' or '.join(TEXT_TASKS)}, not {self.task!r}"
                )
            if not is_hf_model(self.model):
                raise ConfigError(
                    f"dataset {self.dataset} is text, tokenized with the model's tokenizer: give --model hf:PATH"
                )
            if self.target is not None:
                raise ConfigError(
                    f"dataset {self.dataset} is text: its columns are --text-column and friends, not --target"
                )
            if kind == "shakespeare-text" and self.task != "causal-lm":
                raise ConfigError(
                    f"dataset {self.dataset} is plain text: train it with --task causal-lm, not {self.task!r}"
                )
        elif parse_source(self.dataset) and not self.target:
            raise ConfigError(
                f"dataset {self.dataset!r} needs a target, the column to predict (--target COLUMN), or, for text, "
                f"--task {' or '.join(TEXT_TASKS)} with --model hf:PATH"
            )
        elif changed := self.group(TextSettings).changed():
            raise ConfigError(
                f"{changed[0]} is a setting of text data (jsonl:, csv:, hf: with --task "
                f"{' or '.join(TEXT_TASKS)}; shakespeare-text), not of dataset {self.dataset!r}"
            )

    def group(self, cls: type[G]) -> G:
        """The settings of one group (DataSettings, StrategySettings, ...) as its own object."""
        return typing.cast(G, of_group(self, cls))

    def data_request(self, *, progress: bool = True) -> Request:
        """How `data.load` loads this run's dataset. A file dataset's target column is prepared
        for the built-in task whose targets this run's task trains on; text is tokenized for the
        text task with the model's tokenizer."""
        base = Request(data_dir=self.data_dir, download=self.download, progress=progress, seed=self.seed)
        if self.reads_text:
            text = functools.partial(
                load_requested,
                task=self.task,
                model=self.model,
                options=text_options(self.group(TextSettings)),
                trust_remote_code=self.trust_remote_code,
            )
            return dataclasses.replace(base, text=text)
        task = make_task(self.task)
        if parse_source(self.dataset) and task.targets is None:
            raise ConfigError(
                f"task {task.name}: dataset {self.dataset} needs to know how to prepare its target "
                f"column for it: give the task targets='classes', 'numbers' or 'tokens'"
            )
        return dataclasses.replace(
            base,
            target=self.target,
            task=TARGETS[task.targets] if task.targets is not None else "classification",
            num_clients=self.num_clients,
            synthetic_alpha=self.synthetic_alpha,
            synthetic_beta=self.synthetic_beta,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> Config:
        """Build a Config, checking every key and value type; `source` names where they came from."""
        return cls(**checked_settings(values, source))

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
        """Settings from the TOML file at `path` (if any), then `overrides` on top."""
        return cls(**settings(path, overrides))

    def to_toml(self) -> str:
        """The fully resolved settings as TOML, flat (unset optional values are left out, and
        INVOCATION_KEYS: a run's config.toml does not make its resume quiet, nor give it the key)."""
        values = dataclasses.asdict(self).items()
        return tomli_w.dumps({k: v for k, v in values if v is not None and k not in INVOCATION_KEYS})

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


def _cuda(device: str) -> bool:
    """Whether `device` ("auto", "cpu", "cuda", "cuda:N") is a CUDA device here."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None


def settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings in the TOML file at `path` (if any) with `overrides` on top, each checked
    (known key, right type), not yet as a whole (`Config(**settings(...))` does that)."""
    values = {}
    if path is not None:
        values = checked_settings(flatten(own_strategy_keys(read_toml(path)), GROUPS, str(path), ALIASES), str(path))
    return {**values, **checked_settings(overrides or {}, "command line")}


def own_strategy_keys(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with the keys of its [strategy] that are no setting (a strategy of one's own's
    options: `fraction = 0.25`) moved into [strategy]'s strategy_option (`"fraction=0.25"`), which
    make_strategy checks against the options the strategy declares. Under a built-in's name they
    stay: an unknown key there is refused as in any table."""
    table = document.get("strategy")
    if not isinstance(table, dict) or table.get("name") in STRATEGIES:
        return document
    known = {f.name for f in dataclasses.fields(StrategySettings)} | {"name"}
    own = [option_entry(k, v) for k, v in table.items() if k not in known]
    if not own:
        return document
    kept = {k: v for k, v in table.items() if k in known}
    kept["strategy_option"] = [*kept.get("strategy_option", []), *own]
    return {**document, "strategy": kept}


def checked_settings(values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` (flat keys) with unknown keys and wrongly typed values refused, ints widened for float keys."""
    return checked(values, config_types(), source)


def config_types() -> dict[str, Any]:
    """Each setting's annotated type (used to check TOML values and to build CLI flags)."""
    return field_types(Config)


__all__ = [
    "ALIASES",
    "GROUPS",
    "INVOCATION_KEYS",
    "Config",
    "LlmSettings",
    "RunSettings",
    "checked_settings",
    "own_strategy_keys",
    "parse_bytes",
    "read_toml",
    "settings",
]
