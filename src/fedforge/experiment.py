"""Glue from a Config to the library: data, partition, model, engine, strategy, outputs."""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ._imports import load_object
from ._io import atomic_write
from .asynchronous import simulate_async
from .checkpoint import (
    Checkpoint,
    ClientLayout,
    check_checkpoint,
    load_checkpoint,
    result_settings,
    save_checkpoint,
    setting_differences,
)
from .config import Config
from .data import Dataset, FederatedData, federate
from .data import load as load_named
from .data.tables import source_label
from .engines import Engine, EngineChoice, engine_choice, make_engine
from .errors import ConfigError
from .history import History, RoundRecord
from .llm.settings import LlmSettings
from .models import build_model, check_fits
from .reductions import PartialSum
from .report import headline, plot_history, round_line, write_history, write_model
from .schedules import parse_schedule
from .simulation import Kept, Progress, clients_per_round_count, simulate
from .strategies import RunInfo, ServerState, client_algorithm
from .tracking import Tracker, client_metrics


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def run_name(config: Config) -> str:
    """`config.name`, or dataset-model-strategy-time made fit for a folder (csv:data/heart.csv -> csv-heart,
    my_models:net -> my_models_net)."""
    if config.name:
        return config.name
    model, strategy = (re.sub(r"[^\w.-]", "_", name) for name in (config.model, config.strategy))
    return f"{source_label(config.dataset)}-{model}-{strategy}-{time.strftime('%Y%m%d-%H%M%S')}"


def load(config: Config, *, progress: bool = True) -> tuple[Dataset, FederatedData]:
    """The dataset `config` names, split across its clients."""
    dataset = load_named(config.dataset, config.data_request(progress=progress))
    return dataset, federate(dataset, config.data_split(), seed=config.seed)


def federated_data(config: Config) -> FederatedData:
    """The clients' data of the run `config` describes: what each Ray worker loads for itself."""
    return load(config, progress=False)[1]


def make_run_engine(config: Config, *, combine: bool = False) -> Engine:
    """The engine `config` names. The Ray engine's workers load the data themselves, from `config`
    (the same lookup as here, on their own node), so that no training data travels. `combine`: an
    in-process engine sums a chunk of clients in one pass when the round loop needs only their sum
    (`VectorizedEngine`; a Ray worker always does)."""
    if config.engine != "ray":
        return make_engine(config.engine, max_memory=config.max_memory_bytes(), combine=combine)
    from .engines.ray import RayEngine

    return RayEngine(
        functools.partial(federated_data, config),
        seed=config.seed,
        scenario=config.scenario(),
        workers=config.ray_workers,
        cpus_per_worker=config.ray_cpus_per_worker,
        gpus_per_worker=config.ray_gpus_per_worker,
        engine=config.ray_engine,
        max_memory=config.max_memory_bytes(),
        address=config.ray_address,
    )


@dataclass
class RunOutcome:
    """A finished run: its folder, history, final state, and the engine that trained its clients
    (`engine`: auto's pick, or the sequential engine the vectorized one fell back to, and why)."""

    run_dir: Path
    history: History
    state: ServerState | None
    engine: EngineChoice | None = None
    kept: Kept = field(default_factory=Kept)  # what its clients keep, and which of their updates counted


def check_output(config: Config) -> Path:
    """The run's folder `out_dir/name`, made if missing and checked writable (OutputError if not)."""
    assert config.name is not None, "a run is named (run_name) before its outputs are made"
    run_dir = Path(config.out_dir) / config.name
    with atomic_write(run_dir / ".write-check") as f:
        f.write("fedforge can write here\n")
    (run_dir / ".write-check").unlink()
    return run_dir


def check_resumable(run_dir: str | Path, config: Config) -> None:
    """Raise ConfigError unless the run in `run_dir` was made with `config`'s settings
    (EXECUTION_KEYS aside: a run may be continued on another engine or for more rounds)."""
    saved = Config.load(Path(run_dir) / "config.toml")
    if differences := setting_differences(result_settings(saved), config):
        raise ConfigError(f"cannot resume {run_dir}: it was run with other settings ({'; '.join(differences)})")
    if saved.rounds != config.rounds and parse_schedule(config.lr_schedule).uses_rounds:
        raise ConfigError(
            f"cannot resume {run_dir} for {config.rounds} rounds: its lr_schedule {config.lr_schedule} spreads "
            f"over the run's {saved.rounds} rounds (resume it with --rounds {saved.rounds})"
        )


@dataclass(frozen=True)
class Prepared:
    """A run ready to start: its settings (named), folder, data, model, and with resume the
    checkpoint it continues from, checked whole (`prepare`)."""

    config: Config
    run_dir: Path
    data: FederatedData
    model: torch.nn.Module
    clients_per_round: int
    start: Checkpoint | None


def prepare(
    config: Config, *, resume: bool = False, progress: bool = True, checkpoint_key: bytes | None = None
) -> Prepared:
    """Everything a run needs before its first round: the data loaded, the model built, the
    output folder checked writable and, with `resume`, the checkpoint read and every value of it
    checked against this run (checkpoint.check_checkpoint), signed by `checkpoint_key` when given.
    The server calls it before it listens."""
    device = resolve_device(config.device)
    config = config.replace(name=run_name(config))
    run_dir = check_output(config)
    dataset, data = load(config, progress=progress)
    dataset, data = dataset.to(device), data.to(device)
    k = clients_per_round_count(config.clients_per_round, data.num_clients)
    model = build_model(
        config.model,
        dataset.input_shape,
        dataset.num_classes,
        seed=config.seed,
        task=config.client_config().task,
        llm=config.group(LlmSettings),
    )
    check_fits(model, dataset.train.x, config.model)
    start = None
    if resume and config.aggregation != "sync":
        raise ConfigError(f"resuming a run of aggregation {config.aggregation} is not supported yet (docs/time.md)")
    if resume:
        start = load_checkpoint(run_dir, device, key=checkpoint_key)
        run = RunInfo(num_clients=data.num_clients, client_lr=config.lr, client_momentum=config.momentum)
        strategy, client = config.strategy_object(), config.client_config()
        client = dataclasses.replace(client, algorithm=client_algorithm(strategy, client.algorithm))
        shared = client.algorithm.roles.assign(model).shared  # the server state holds these entries only
        entries = model.state_dict()
        fresh = strategy.init({n: entries[n].detach().to(device) for n in shared}, run)
        layout = ClientLayout.of(model, client)
        check_checkpoint(start, run_dir, config, fresh=fresh, clients_per_round=k, clients=layout)
    return Prepared(config, run_dir, data, model, k, start)


def run_experiment(
    config: Config,
    *,
    progress: bool = True,
    verbose: bool = True,
    engine=None,
    resume: bool = False,
    secure_noise: bool = False,
    trackers: Sequence[Tracker] = (),
    prepared: Prepared | None = None,
    checkpoint_key: bytes | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> RunOutcome:
    """Run `config` and write `config.toml`, `history.json/.csv`, `model.pt`, `accuracy.png` (against
    virtual time with device profiles) (and with `save_adapters` an hf: model's adapters in peft's format).

    History, model and a checkpoint are rewritten (atomically) after every round, so whatever
    stops the run (Ctrl-C, divergence, a crash) leaves the completed rounds on disk, and
    `resume=True` continues the run in `out_dir/name` from its last completed round. The plot
    is drawn at the end or on the way out. `engine` replaces the one `config` names (the
    server passes its network engine). `secure_noise`: differential privacy's noise from the OS's
    cryptographic source rather than the seed (the server's). `trackers` (TensorBoard, MLflow) are
    sent every round's record and the clients' training metrics, and the outputs at the end.
    `prepared`: `prepare(config, resume=resume)`'s result when the caller has it already.
    `checkpoint_key`: sign the checkpoints with it (HMAC-SHA256), and resume only one so signed:
    a secret kept outside the run folder, so that writing there is not enough to forge one.
    `on_round`: called with each round's record once it is saved (compare's progress lines).
    """
    for tracker in trackers:  # a missing library: say so before the data loads
        tracker.prepare()
    privacy = config.privacy()
    if privacy is not None and secure_noise:
        privacy = dataclasses.replace(privacy, secure_noise=True)
    prepared = prepared or prepare(config, resume=resume, progress=progress, checkpoint_key=checkpoint_key)
    config, run_dir, data, model, k = (
        prepared.config,
        prepared.run_dir,
        prepared.data,
        prepared.model,
        prepared.clients_per_round,
    )
    saved = prepared.start
    start = Progress(saved.state, saved.history.records, saved.kept or Kept()) if saved is not None else None
    with atomic_write(run_dir / "config.toml") as f:
        f.write(config.to_toml())

    primary = config.client_config().task.primary
    records: list[RoundRecord] = list(start.records) if start else []
    last: list[Progress] = [start] if start else []
    # Without trackers nothing here needs each client's update when the round loop sums them.
    run_engine = engine or make_run_engine(config, combine=not trackers)
    error: BaseException | None = None
    bar = tqdm(total=config.rounds * k, unit="client", disable=None if progress else True, leave=False)
    tracked = [tracker.start(config, run_dir) for tracker in trackers]
    clients: dict[int, dict[str, float]] = {}  # the round's clients' training metrics, for the trackers

    def recorded(progress: Progress) -> None:
        record, state = progress.records[-1], progress.state
        records.append(record)
        last[:] = [progress]
        # The checkpoint first: the outputs (history.json, model.pt) are never ahead of it, so a
        # resume never continues from before a round whose model was published.
        save_checkpoint(run_dir, state, History(records), config, key=checkpoint_key, kept=progress.kept)
        write_history(run_dir, History(records))
        write_model(run_dir, state.params)
        if config.save_adapters is not None:
            from .llm.models import save_adapters

            save_adapters(model, state.params, config.save_adapters)
        bar.set_postfix(round=record.round, test=headline(record, primary))
        if verbose:
            tqdm.write(round_line(record, config.rounds, metric=primary))
        # The record's selection only: clients of an attempt that failed and was retried are left out.
        for run in tracked:
            run.round(record, {c: clients[c] for c in record.clients if c in clients})
        clients.clear()
        if on_round is not None:
            on_round(record)

    def on_client(update) -> None:
        bar.update(len(update.client_ids) if isinstance(update, PartialSum) else 1)
        if tracked and (metrics := client_metrics(update)) is not None:
            clients[update.client_id] = metrics

    try:
        asynchronous = config.asynchronous()
        # Rounds, or on the virtual clock event by event (on default device profiles when none are given).
        train: Callable[..., object] = (
            simulate if asynchronous is None else functools.partial(simulate_async, asynchronous=asynchronous)
        )
        train(
            model,
            data,
            rounds=config.rounds,
            clients_per_round=k,
            client=config.client_config(),
            strategy=config.strategy_object(),
            scenario=config.scenario(),
            engine=run_engine,
            seed=config.seed,
            eval_batch_size=config.eval_batch_size,
            eval_train=config.eval_train,
            on_client=on_client,
            checkpoint=recorded,
            resume=start,
            privacy=privacy,
            sampling=config.sampling,
            round_config=config.round_config(),
            personalized_eval={"auto": None, "on": True, "off": False}[config.personalized_eval],
            evaluate_fn=load_object(config.evaluate_fn, "evaluate_fn") if config.evaluate_fn else None,
            devices=config.devices(),
        )
    except BaseException as e:
        error = e
        raise
    finally:
        bar.close()
        if engine is None:  # the Ray engine's workers hold their CPUs until closed
            run_engine.close()
        if records:
            x = "virtual_time" if config.clocked else "round"  # on the virtual clock: against virtual time
            plot_history(History(records), run_dir / "accuracy.png", title=config.name, metric=primary, x=x)
        for run in tracked:  # after the plot: it is one of their artifacts
            run.finish(error)
    return RunOutcome(
        run_dir,
        History(records),
        last[0].state if last else None,
        engine_choice(run_engine),
        last[0].kept if last else Kept(),
    )


__all__ = [
    "Prepared",
    "RunOutcome",
    "check_output",
    "federated_data",
    "load",
    "load_checkpoint",
    "make_run_engine",
    "prepare",
    "resolve_device",
    "run_experiment",
    "save_checkpoint",
]
