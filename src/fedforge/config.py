"""An experiment's settings: one frozen dataclass, read from TOML and overridden by flags.

Each field is both a config-file key (`local_epochs = 2`) and a CLI flag (`--local-epochs 2`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .client import ClientConfig
from .data.bundled import BUNDLED
from .data.datasets import DATASETS
from .data.partition import PARTITIONS
from .data.tabular import parse_source
from .engines import ENGINES, IN_PROCESS_ENGINES
from .engines.ray import check_options as check_ray_options
from .errors import ConfigError
from .models import MODELS, model_factory
from .privacy.accountant import METHODS
from .privacy.mechanism import MODES
from .privacy.run import SAMPLINGS, DifferentialPrivacy
from .scenarios import ATTACKS, Scenario, parse_epochs_dist
from .strategies import STRATEGIES, make_strategy
from .tasks import OPTIMIZERS, TASKS, make_task


def _opt(default, help: str, choices: typing.Iterable[str] | None = None):
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


@dataclass(frozen=True)
class Config:
    """Settings of one experiment. Defaults are the tutorial's experiment."""

    name: str | None = _opt(None, "run name: outputs go to OUT_DIR/NAME (default: dataset-model-strategy-time)")
    out_dir: str = _opt("runs", "folder that holds the run folders")
    seed: int = _opt(0, "seed of every random choice (partition, init, selection, batches)")
    dataset: str = _opt(
        "mnist",
        "dataset (synthetic: FedProx's synthetic(alpha, beta), one client per device; "
        "digits, diabetes: scikit-learn's, offline; shakespeare: LEAF's next-character task, with "
        "--task language-model --model char-lstm), or csv:PATH, parquet:PATH (a table) or hf:PATH "
        "(a Hugging Face dataset: a save_to_disk folder or Parquet), each with --target",
        (*DATASETS, "synthetic", *BUNDLED, "shakespeare"),
    )
    synthetic_alpha: float = _opt(1.0, "synthetic: how much the devices' models differ")
    synthetic_beta: float = _opt(1.0, "synthetic: how much the devices' data differ")
    data_dir: str | None = _opt(None, "folder with the dataset files (searched first)")
    download: bool = _opt(True, "download the dataset when it is not found")
    target: str | None = _opt(None, "csv:, parquet:, hf: datasets: the column to predict (the others are inputs)")
    num_clients: int = _opt(10, "number of clients the training set is split across")
    partition: str = _opt("iid", "how the data is split across clients (synthetic: always by device)", PARTITIONS)
    alpha: float = _opt(0.5, "Dirichlet concentration for partition=dirichlet (smaller: more skew)")
    shards_per_client: int = _opt(2, "shards per client for partition=shards")
    sigma: float = _opt(1.0, "lognormal sigma of client sizes for partition=quantity")
    client_test_fraction: float = _opt(0.0, "fraction of each client's data held out for federated evaluation")
    model: str = _opt(
        "mlp",
        "model: a built-in, or package.module:factory, a function (input_shape, num_classes) "
        "-> torch.nn.Module of your own",
        MODELS,
    )
    task: str = _opt(
        "classification",
        "what clients learn: classification (cross-entropy; accuracy), regression "
        "(MSE; mse, mae, r2), language-model (next-token cross-entropy; perplexity), or "
        "package.module:object, a fedforge.Task of your own",
        TASKS,
    )
    optimizer: str = _opt(
        "sgd",
        "client optimizer: sgd (lr, momentum, weight_decay), adam or adamw (lr, "
        "weight_decay), fresh each round unless keep_optimizer_state",
        OPTIMIZERS,
    )
    keep_optimizer_state: bool = _opt(
        False, "keep each client's optimizer state (momentum, Adam's moments) from one of its rounds to its next"
    )
    rounds: int = _opt(5, "number of federated rounds")
    clients_per_round: int | float = _opt(5, "clients selected per round: a count, or a fraction like 0.1")
    local_epochs: int = _opt(1, "local epochs per round")
    batch_size: int = _opt(32, "local batch size")
    lr: float = _opt(0.01, "client SGD learning rate")
    momentum: float = _opt(0.0, "client SGD momentum")
    weight_decay: float = _opt(0.0, "client SGD weight decay")
    strategy: str = _opt("fedavg", "server strategy", STRATEGIES)
    server_lr: float | None = _opt(
        None, "server learning rate (default: the strategy's: 1.0, or 0.01 for fedadagrad, fedadam and fedyogi)"
    )
    server_momentum: float = _opt(0.9, "fedavgm: server momentum")
    beta1: float = _opt(0.9, "fedadagrad/fedadam/fedyogi: first-moment decay")
    beta2: float = _opt(0.99, "fedadam/fedyogi: second-moment decay")
    tau: float = _opt(1e-3, "fedadagrad/fedadam/fedyogi: adaptivity")
    proximal_mu: float = _opt(0.01, "fedprox: proximal term mu")
    q: float = _opt(1.0, "qfedavg: fairness q (0 is FedAvg)")
    trim_beta: float = _opt(0.1, "trimmed_mean: share trimmed at each end")
    krum_f: int = _opt(1, "krum/multikrum: number of Byzantine clients tolerated")
    multikrum_m: int = _opt(0, "multikrum: updates averaged (0: clients per round - krum_f)")
    sampling: str = _opt(
        "fixed",
        "client sampling: fixed (clients_per_round each round) or poisson (each client "
        "joins with probability clients_per_round / num_clients; what DP accounting assumes)",
        SAMPLINGS,
    )
    dp: str | None = _opt(
        None,
        "differential privacy: client (clients clip, the server adds noise), central (the "
        "server clips and noises) or local (each client noises its own update)",
        MODES,
    )
    clip: float = _opt(1.0, "dp: the bound C on each client's update norm (the first C with adaptive_clip)")
    noise_multiplier: float | None = _opt(None, "dp: noise std over C (default: calibrated for target_epsilon)")
    target_epsilon: float | None = _opt(None, "dp: the privacy budget; the run stops before a round would pass it")
    delta: float = _opt(1e-5, "dp: delta of the (epsilon, delta) guarantee; < 1/num_clients")
    adaptive_clip: bool = _opt(False, "dp: C follows clip_quantile of the update norms (Andrew et al. 2021)")
    clip_quantile: float = _opt(0.5, "dp, adaptive_clip: the share of updates meant to be left unclipped")
    clip_lr: float = _opt(0.2, "dp, adaptive_clip: step of the geometric update of C")
    accountant: str | None = _opt(
        None,
        "dp: pld or rdp (default: pld; rdp for fixed-size sampling, the only analysis dp-accounting has for it)",
        METHODS,
    )
    local_epochs_dist: str | None = _opt(None, "per-client local epochs each round, e.g. uniform:1:5")
    straggler_fraction: float = _opt(0.0, "share of selected clients that do only part of their work")
    drop_stragglers: bool = _opt(False, "stragglers send nothing instead of their partial work")
    dropout: float = _opt(0.0, "probability that a selected client never reports")
    attack: str | None = _opt(None, "what malicious clients do", ATTACKS)
    malicious_fraction: float = _opt(0.0, "share of clients that are malicious")
    attack_scale: float = _opt(1.0, "scale of the attack (sign_flip, scale: factor; gaussian: std)")
    engine: str = _opt(
        "auto",
        "where clients run (auto: vectorized for dense models, e.g. Linear/ReLU, and "
        "on CUDA; sequential for convolutions on the CPU, recurrent layers and what vectorized "
        "cannot batch)",
        ENGINES,
    )
    max_memory: str = _opt(
        "auto", "working memory for clients trained together (vectorized engine; auto: 64MiB on the CPU, 1GiB on CUDA)"
    )
    ray_address: str | None = _opt(
        None,
        "engine ray: the cluster to join, host:port of its head (`ray start "
        "--head`) or ray://host:port (default: a new local Ray)",
    )
    ray_workers: int = _opt(2, "engine ray: long-lived workers (Ray actors), each loading the data once")
    ray_cpus_per_worker: float = _opt(1.0, "engine ray: CPUs Ray reserves for each worker (fractions allowed)")
    ray_gpus_per_worker: float = _opt(
        0.0, "engine ray: GPUs reserved for each worker (fractions allowed; above 0 it trains on CUDA)"
    )
    ray_engine: str = _opt(
        "auto", "engine ray: the in-process engine each worker trains its clients with", IN_PROCESS_ENGINES
    )
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N (auto: cuda when available)")
    eval_batch_size: int = _opt(1024, "batch size for evaluation (does not change results)")
    eval_train: bool = _opt(False, "also evaluate the global model on all training data every round")
    tensorboard: str | None = _opt(None, "log to TensorBoard in this folder (a run's in FOLDER/NAME; --tensorboard)")
    mlflow: str | None = _opt(
        None, 'log to MLflow, in the store at this URI; "default": sqlite:///OUT_DIR/mlflow.db (--mlflow [URI])'
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            value = getattr(self, f.name)
            if f.name == "model":
                model_factory(value)  # a built-in, or a user's factory that can be imported
            elif f.name == "task":
                make_task(value)  # a built-in, or a user's Task that can be imported
            elif f.name == "dataset":
                _check_dataset(value, choices)
            elif choices and value is not None and value not in choices:
                raise ConfigError(f"unknown {f.name} {value!r} (choose from: {', '.join(choices)})")
        if parse_source(self.dataset):
            if not self.target:
                raise ConfigError(f"dataset {self.dataset!r} needs a target, the column to predict (--target COLUMN)")
        elif self.target is not None:
            raise ConfigError(
                f"target {self.target!r} is for csv:, parquet: and hf: datasets only, not {self.dataset!r}"
            )
        positive = ("num_clients", "rounds", "shards_per_client", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        if not 0 <= self.client_test_fraction < 1:
            raise ConfigError(f"client_test_fraction must be in [0, 1), got {self.client_test_fraction}")
        if self.dataset == "shakespeare" and self.task in TASKS and self.task != "language-model":
            raise ConfigError(
                f"dataset shakespeare is next-character prediction: it needs task language-model, got {self.task!r}"
            )
        self.strategy_object()  # validates the strategy's hyperparameters
        self.scenario()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.name is not None and not re.fullmatch(r"[\w.-]+", self.name):
            raise ConfigError(f"name may hold letters, digits, '.', '-' and '_' only, got {self.name!r}")
        if isinstance(self.clients_per_round, float):
            if not 0 < self.clients_per_round <= 1:
                raise ConfigError(f"clients_per_round as a fraction must be in (0, 1], got {self.clients_per_round}")
        elif not 1 <= self.clients_per_round <= self.num_clients:
            raise ConfigError(
                f"clients_per_round must be between 1 and num_clients={self.num_clients}, got {self.clients_per_round}"
            )
        self.client_config()  # validates the client hyperparameters
        privacy = self.privacy()
        if privacy is not None:
            privacy.check(self.strategy_object(), self.num_clients)
        elif self.target_epsilon is not None or self.noise_multiplier is not None:
            raise ConfigError(
                "target_epsilon and noise_multiplier are for differential privacy: add --dp client (or central, local)"
            )
        self.max_memory_bytes()
        check_ray_options(self.ray_workers, self.ray_cpus_per_worker, self.ray_gpus_per_worker, self.ray_engine)

    def strategy_object(self):
        """The strategy, built from its hyperparameters in this config (server_lr, q, trim_beta, ...)."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return make_strategy(self.strategy, **options)

    def privacy(self) -> DifferentialPrivacy | None:
        """The run's differential privacy settings, or None without --dp."""
        if self.dp is None:
            return None
        return DifferentialPrivacy(
            mode=self.dp,
            clip=self.clip,
            noise_multiplier=self.noise_multiplier,
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            adaptive=self.adaptive_clip,
            target_quantile=self.clip_quantile,
            clip_lr=self.clip_lr,
            accountant=self.accountant,
        )

    def scenario(self) -> Scenario:
        return Scenario(
            local_epochs_range=parse_epochs_dist(self.local_epochs_dist),
            straggler_fraction=self.straggler_fraction,
            drop_stragglers=self.drop_stragglers,
            dropout=self.dropout,
            attack=self.attack,
            malicious_fraction=self.malicious_fraction,
            attack_scale=self.attack_scale,
        )

    def max_memory_bytes(self) -> int | None:
        """The vectorized engine's budget; None for auto (its default for the device)."""
        return None if self.max_memory == "auto" else parse_bytes(self.max_memory, "max_memory")

    def client_config(self) -> ClientConfig:
        return ClientConfig(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            task=_kept(make_task(self.task, optimizer=self.optimizer), self.keep_optimizer_state),
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
        """The fully resolved settings as TOML (unset optional values are left out)."""
        return tomli_w.dumps({k: v for k, v in dataclasses.asdict(self).items() if v is not None})

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


def _kept(task, keep: bool):
    """`task`, keeping its clients' optimizer state between rounds if `keep` (or if it does already)."""
    return dataclasses.replace(task, keep_optimizer_state=True) if keep and not task.keep_optimizer_state else task


def _check_dataset(name: str, choices: tuple[str, ...]) -> None:
    source = parse_source(name)
    if source is None and name not in choices:
        raise ConfigError(
            f"unknown dataset {name!r} (choose from: {', '.join(choices)}, or csv:PATH, parquet:PATH, hf:PATH)"
        )
    if source is not None and not source[1]:
        raise ConfigError(f"dataset {name!r} names no file: give {source[0]}:PATH")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str, name: str) -> int:
    """Bytes from a size like "512MiB", "2GB" or "1000000"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{name} must be auto or a size like 512MiB or 2GB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


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
    values = checked_settings(read_toml(path), str(path)) if path is not None else {}
    return {**values, **checked_settings(overrides or {}, "command line")}


def checked_settings(values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` with unknown keys and wrongly typed values refused, ints widened for float keys."""
    types_ = field_types()
    out = {}
    for key, value in values.items():
        if key not in types_:
            close = difflib.get_close_matches(key, types_, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        accepted = _accepted(types_[key])
        if (isinstance(value, bool) and bool not in accepted) or not isinstance(value, accepted):
            names = " or ".join(sorted({t.__name__ for t in accepted}))
            raise ConfigError(f"{source}: {key} must be {names}, got {value!r}")
        out[key] = float(value) if types_[key] is float and isinstance(value, int) else value
    return out


def field_types() -> dict[str, Any]:
    """Each setting's annotated type (used to check TOML values and to build CLI flags)."""
    return typing.get_type_hints(Config)


def _accepted(tp) -> tuple[type, ...]:
    """The Python types a value may have for a field annotated `tp`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(t for arg in typing.get_args(tp) for t in _accepted(arg))
    if tp is float:
        return (float, int)
    if tp is type(None):
        return ()
    return (tp,)
