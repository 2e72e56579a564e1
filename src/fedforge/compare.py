"""Several runs of one experiment side by side: same data, partition, seed and selected clients.

Every run is the base Config with a few settings changed (`compare`, the command line's), or
`simulate`'s settings with a few changed, on one's own model and FederatedData
(`compare_simulations`); since every random choice derives from the seed, runs that share it
share the partition and the clients selected each round. Both report each finished round as it
comes (`RoundDone`), and give the same table, plot and CSV (`write_comparison`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import queue
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._io import atomic_write
from .config import Config, read_toml
from .contract import ClientConfig
from .errors import ConfigError, DivergenceError
from .history import History, RoundRecord
from .report import X_AXES, headline, personalized, pyplot, save_figure, x_label
from .strategies import strategy_options
from .strategies.settings import own_options
from .tasks import Task
from .tracking import Tracker

if TYPE_CHECKING:
    from .simulation import FederatedData


@dataclass(frozen=True)
class ComparedRun:
    """One run of a comparison: its label, settings (a Config from `compare`; None from
    `compare_simulations`, which gives its `task`), history and wall time."""

    label: str
    config: Config | None
    history: History
    wall_seconds: float
    diverged: str | None = None  # why training stopped early, if it did
    task: Task | None = None  # what it trained, when no Config says

    @property
    def _task(self) -> Task:
        if self.task is not None:
            return self.task
        if self.config is None:
            raise ConfigError(f"run {self.label!r}: give its Config or its task")
        return self.config.client_config().task

    @property
    def metric(self) -> str:
        """The task's primary metric (accuracy, r2, perplexity, ...): what the comparison shows."""
        return self._task.primary

    def _better(self, a: float, b: float) -> bool:
        return a >= b if self._task.higher_is_better else a <= b

    @property
    def final(self) -> float | None:
        return self.history.final.metric(f"test_{self.metric}")

    @property
    def best(self) -> float | None:
        values = [v for v in self.history.column(f"test_{self.metric}") if v is not None]
        return (max if self._task.higher_is_better else min)(values) if values else None

    @property
    def personalized(self) -> float | None:
        """The primary metric's last personalized evaluation (the clients' own models on their own
        held-out data, `personalized_<metric>` in the history), or None if no round had one."""
        key = f"personalized_{self.metric}"
        return next((r.metrics[key] for r in reversed(self.history.records) if key in r.metrics), None)

    def rounds_to(self, target: float) -> int | None:
        """The first round whose test metric reached `target` (at least, or at most for a metric
        that is better lower), or None."""
        reached = self._reached(target)
        return reached.round if reached is not None else None

    def time_to(self, target: float) -> float | None:
        """The virtual time (seconds since the start, device profiles) by which the test metric first
        reached `target`, or None (not reached, or a run without the virtual clock)."""
        reached = self._reached(target)
        return reached.metrics.get("virtual_time") if reached is not None else None

    @property
    def clocked(self) -> bool:
        """Whether the run kept the virtual clock (device profiles): its records have virtual_time."""
        return "virtual_time" in self.history.final.metrics

    def _reached(self, target: float) -> RoundRecord | None:
        return next(
            (
                r
                for r in self.history.records
                if (v := r.metric(f"test_{self.metric}")) is not None and self._better(v, target)
            ),
            None,
        )


@dataclass(frozen=True)
class RoundDone:
    """One finished round of one run of a comparison (round 0: the initial model's evaluation)."""

    label: str
    record: RoundRecord
    rounds: int  # the run's last round
    metric: str  # its task's primary metric

    def line(self) -> str:
        """The console's progress line, e.g. "fedprox: round 3/10  test accuracy 0.7123  1.52 s"."""
        round_ = self.record.round
        parts = [f"{self.label}: " + ("initial model" if round_ == 0 else f"round {round_}/{self.rounds}")]
        parts.append(headline(self.record, self.metric))
        if (own := personalized(self.record, self.metric)) is not None:
            parts.append(own)
        if round_ and "virtual_time" in self.record.metrics:
            parts.append(f"virtual time {self.record.metrics['virtual_time']:.4g} s")
        if round_:
            parts.append(f"{self.record.seconds:.2f} s")
        return "  ".join(parts)


def variants_from_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Named runs from a TOML file of tables: [fedprox] strategy = "fedprox" ..."""
    tables = read_toml(path)
    for label, overrides in tables.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: {label!r} must be a table of settings, like [{label}]")
        for key, value in overrides.items():
            if isinstance(value, dict):  # TOML reads [lr0.1] as table "1" inside table "lr0"
                raise ConfigError(
                    f"{path}: [{label}.{key}] is read as a table inside {label!r}; quote a label that "
                    f'holds a dot: ["{label}.{key}"]'
                )
    return tables


def _variant(base: dict[str, Any], label: str, overrides: dict[str, Any]) -> Config:
    shared = base.get("strategy_option", ())
    if shared and "strategy_option" not in overrides:  # each run takes those its strategy declares
        takes = strategy_options(overrides.get("strategy", base.get("strategy", Config.strategy)))
        base = {**base, "strategy_option": [e for e in shared if e.partition("=")[0].strip() in takes]}
    return Config.from_dict({**base, **overrides, "name": label}, source=f"run {label!r}")


def _check_shared_options(base: dict[str, Any], configs: Sequence[Config]) -> None:
    """A ConfigError for a shared strategy_option that no run's strategy declares (a typo, not
    an option that only some of the runs use)."""
    for key in own_options(base.get("strategy_option", ())):
        if not any(key in strategy_options(config.strategy) for config in configs):
            raise ConfigError(f"strategy_option {key}: no run's strategy takes it")


def _base_values(base: Config | Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    values = {k: v for k, v in (base.items() if isinstance(base, Mapping) else base.__dict__.items()) if v is not None}
    return {**values, "out_dir": str(out_dir)}


def variant_configs(
    base: Config | Mapping[str, Any], variants: dict[str, dict[str, Any]], *, out_dir: str | os.PathLike
) -> dict[str, Config]:
    """Each variant's whole settings (base + its overrides, as `compare` runs it), checked."""
    values = _base_values(base, out_dir)
    configs = {label: _variant(values, label, overrides) for label, overrides in variants.items()}
    _check_shared_options(values, list(configs.values()))
    return configs


def _resumable(config: Config) -> bool:
    assert config.name is not None, "a comparison names each of its runs"
    return (Path(config.out_dir) / config.name / "checkpoint.pt").exists()


def _run_one(
    base: dict[str, Any],
    label: str,
    overrides: dict[str, Any],
    threads: int,
    resume: bool,
    trackers: Sequence[Tracker] = (),
    on_round: Callable[[RoundDone], None] | None = None,
):
    """Run one variant; a run that diverges is reported with the rounds it completed.

    With `resume`, a variant that already has a checkpoint continues from it (a finished one
    runs no round); its wall time counts the rounds done before. `on_round` is told of each
    round it finishes (in a worker process: a queue's `put`, which the parent reads).
    """
    from .experiment import load_checkpoint, run_experiment

    torch.set_num_threads(threads)
    config = _variant(base, label, overrides)
    resume = resume and _resumable(config)
    earlier = 0.0
    if resume:
        earlier = sum(r.seconds for r in load_checkpoint(Path(config.out_dir) / label, "cpu").history.records)
    metric = config.client_config().task.primary

    def done(record: RoundRecord) -> None:
        if on_round is not None:
            on_round(RoundDone(label, record, config.rounds, metric))

    started = time.perf_counter()
    try:
        history = run_experiment(
            config, progress=False, verbose=False, resume=resume, trackers=trackers, on_round=done
        ).history.to_json()
        diverged = None
    except DivergenceError as e:  # e.g. FedAvg under attack: the collapse is the result
        history = (Path(config.out_dir) / label / "history.json").read_text()
        diverged = str(e)
    return label, history, earlier + time.perf_counter() - started, diverged


def compare(
    base: Config | Mapping[str, Any],
    variants: dict[str, dict[str, Any]],
    *,
    out_dir: str | os.PathLike,
    jobs: int = 1,
    resume: bool = False,
    trackers: Sequence[Tracker] = (),
    on_round: Callable[[RoundDone], None] | None = None,
) -> list[ComparedRun]:
    """Run every variant (base settings + its overrides) and return them in the given order.

    `base` may be a Config, or settings that only each variant completes (a noise multiplier
    shared by runs that each turn differential privacy on): every variant is checked as a whole.

    Each run writes its usual outputs to `out_dir/<label>/`. With jobs > 1 the runs go to
    that many worker processes, each with its share of the CPU threads. With `resume`, runs
    that `out_dir` already holds continue from their last completed round (a comparison cut
    short, or one run at a time in separate sessions); their settings must be the variant's.
    Every run is tracked by each of `trackers` (frozen values: they travel to the worker processes),
    as its own tracked run named after its label. `on_round` is told of every round each run
    finishes, as it finishes (in this process, also when the runs are in worker processes).
    """
    from .experiment import check_resumable

    if not variants:
        raise ConfigError("nothing to compare: give --strategies or --runs")
    base_values = _base_values(base, out_dir)
    configs = variant_configs(base_values, variants, out_dir=out_dir)  # check everything before running anything
    for label, config in configs.items():
        if resume and _resumable(config):
            check_resumable(Path(out_dir) / label, config)
    for tracker in trackers:  # here, once: not by worker processes racing to make the same MLflow store
        tracker.prepare()
    if jobs == 1:
        results = [
            _run_one(base_values, label, o, torch.get_num_threads(), resume, trackers, on_round)
            for label, o in variants.items()
        ]
    else:
        results = _in_workers(base_values, variants, jobs, resume, trackers, on_round)
    return [
        ComparedRun(label, _variant(base_values, label, variants[label]), History.from_json(history), wall, diverged)
        for label, history, wall, diverged in results
    ]


def _in_workers(
    base_values: dict[str, Any],
    variants: dict[str, dict[str, Any]],
    jobs: int,
    resume: bool,
    trackers: Sequence[Tracker],
    on_round: Callable[[RoundDone], None] | None,
) -> list:
    """`_run_one` of every variant in `jobs` worker processes, each with its share of the CPU threads."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = get_context("spawn")
    with contextlib.ExitStack() as stack:
        # The workers put each finished round on a queue that this process hands on to `on_round`.
        rounds = stack.enter_context(context.Manager()).Queue() if on_round is not None else None
        pool = stack.enter_context(ProcessPoolExecutor(max_workers=jobs, mp_context=context))
        report = rounds.put if rounds is not None else None
        futures = [
            pool.submit(_run_one, base_values, label, o, threads, resume, trackers, report)
            for label, o in variants.items()
        ]
        return _gather(futures, rounds, on_round)


def _gather(futures: list[Future], rounds: Any, on_round: Callable[[RoundDone], None] | None) -> list:
    """The futures' results in order; meanwhile each round the workers put on `rounds` goes to `on_round`."""
    if rounds is not None and on_round is not None:
        while not all(f.done() for f in futures):
            with contextlib.suppress(queue.Empty):  # none this while: look at the futures again
                on_round(rounds.get(timeout=0.2))
        while not rounds.empty():
            on_round(rounds.get())
    return [f.result() for f in futures]


def compare_simulations(
    model: nn.Module,
    data: FederatedData,
    runs: Mapping[str, Mapping[str, Any]],
    *,
    on_round: Callable[[RoundDone], None] | None = None,
    **shared: Any,
) -> list[ComparedRun]:
    """Run `simulate(model, data, **shared, **runs[label])` for every label: a comparison on one's
    own model and FederatedData, as `fedforge compare` makes one from a Config.

    Runs with the same `seed` share the clients selected each round and each client's batches, so
    they differ only by what their settings change. Each starts from `model`'s weights (which
    `simulate` leaves unchanged). A run that diverges is reported with the rounds it completed.
    The list, in the given order, is what `comparison_table`, `plot_comparison` and
    `write_comparison` take: the command line's table, plot and CSV. For example::

        runs = compare_simulations(
            model, data, {"fedavg": {}, "fedprox": {"strategy": make_strategy("fedprox", proximal_mu=0.1)}},
            rounds=10, clients_per_round=5, client=ClientConfig(optimizer="adam"), seed=0,
        )
        print(write_comparison(runs, "runs/mine", target=None, title="mine"))

    `on_round` is told of every round each run finishes (progress: `RoundDone.line()`).
    """
    if not runs:
        raise ConfigError("nothing to compare: give at least one run")
    for label, overrides in runs.items():
        if "on_round" in {**shared, **overrides}:
            raise ConfigError(f"run {label!r}: on_round is compare_simulations' own (it is given a RoundDone)")
    return [_simulate_one(model, data, label, {**shared, **overrides}, on_round) for label, overrides in runs.items()]


def _simulate_one(
    model: nn.Module,
    data: FederatedData,
    label: str,
    settings: dict[str, Any],
    on_round: Callable[[RoundDone], None] | None,
) -> ComparedRun:
    """One run of `compare_simulations`; a divergence ends it with the rounds it completed."""
    from .simulation import simulate

    task = settings.get("client", ClientConfig()).task
    records: list[RoundRecord] = []

    def done(record: RoundRecord, _state: Any) -> None:
        records.append(record)
        if on_round is not None:
            on_round(RoundDone(label, record, settings.get("rounds", 0), task.primary))

    started = time.perf_counter()
    diverged = None
    try:
        simulate(model, data, on_round=done, **settings)
    except DivergenceError as e:  # the collapse is the result
        diverged = str(e)
    return ComparedRun(label, None, History(records), time.perf_counter() - started, diverged, task)


def comparison_table(runs: list[ComparedRun], target: float | None = None) -> str:
    """A Markdown table: final and best test metric (the task's primary), its final personalized
    evaluation where any run has one, rounds to `target` (and virtual time to it, and in all, where
    any run has the virtual clock), wall time."""
    metric = runs[0].metric.replace("_", " ")
    personalized = any(run.personalized is not None for run in runs)
    clocked = any(run.clocked for run in runs)
    head = ["run", f"final {metric}", f"best {metric}"] + ([f"final personalized {metric}"] if personalized else [])
    head += [f"rounds to {target:.4g}"] if target else []
    head += ([f"virtual s to {target:.4g}"] if target else []) + ["virtual s"] if clocked else []
    head += ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def number(value):
        return f"{value:.4f}" if value is not None else "n/a"

    for run in runs:
        final = number(run.final)
        if run.diverged:
            final += f" (diverged in round {run.history.final.round + 1})"
        row = [run.label, final, number(run.best)] + ([number(run.personalized)] if personalized else [])
        if target:
            reached = run.rounds_to(target)
            row.append(str(reached) if reached is not None else "not reached")
        if clocked and target:
            seconds = run.time_to(target)
            row.append(f"{seconds:.4g}" if seconds is not None else "not reached" if run.clocked else "n/a")
        if clocked:
            row.append(f"{run.history.final.metrics['virtual_time']:.4g}" if run.clocked else "n/a")
        row.append(f"{run.wall_seconds:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_comparison(runs: list[ComparedRun], path: str | os.PathLike, *, title: str = "", x: str = "round") -> None:
    """The test metric (the task's primary) and training loss per round, one line per run (and a dashed
    one for a run's personalized evaluation, where it has one). `x`: "round", or "virtual_time" (runs
    with device profiles: the virtual seconds by the end of each round)."""
    plt = pyplot()
    if x not in X_AXES:
        raise ConfigError(f"x-axis must be one of {', '.join(X_AXES)}, got {x!r}")
    if x == "virtual_time" and (unclocked := [run.label for run in runs if not run.clocked]):
        raise ConfigError(f"run {unclocked[0]!r} has no virtual time: give it device profiles, or plot by round")

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        records = run.history.records
        # Evaluated records only: an asynchronous run evaluates every eval_every steps.
        tested = [r for r in records if r.metric(f"test_{run.metric}") is not None]
        [line] = acc_ax.plot(
            [r.metric(x) for r in tested], [r.metric(f"test_{run.metric}") for r in tested], label=run.label
        )
        own = [
            (r.metric(x), r.metrics[f"personalized_{run.metric}"])
            for r in records
            if f"personalized_{run.metric}" in r.metrics
        ]
        if own:  # the clients' own models, where evaluated: dashed, in the run's colour
            acc_ax.plot(
                *zip(*own, strict=True), linestyle="--", color=line.get_color(), label=f"{run.label}, personalized"
            )
        # The global model's loss on the training data when measured, else the clients' own.
        key = "global_train_loss" if records[-1].global_train_loss is not None else "train_loss"
        points = [(r.metric(x), getattr(r, key)) for r in records if getattr(r, key) is not None]
        loss_ax.plot(*zip(*points, strict=True), label=run.label)
    loss_name = (
        "global model on training data"
        if runs[0].history.final.global_train_loss is not None
        else "clients' training loss"
    )
    metric = f"test {runs[0].metric.replace('_', ' ')}"
    acc_ax.set(xlabel=x_label(x), ylabel=metric, title=metric)
    loss_ax.set(xlabel=x_label(x), ylabel="loss", title=f"training loss ({loss_name})", yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def write_comparison(
    runs: list[ComparedRun],
    out_dir: str | os.PathLike,
    *,
    target: float | None = None,
    title: str | None = None,
    x: str = "round",
) -> str:
    """comparison.md, comparison.csv and comparison.png in `out_dir`; returns the table. `target`:
    report the round (and the virtual time, for runs with device profiles) each run first reaches
    it; `title`: the plot's (default: the folder's name); `x`: the plot's x-axis, round or virtual_time."""
    out_dir = Path(out_dir)
    if x == "virtual_time" and (unclocked := [run.label for run in runs if not run.clocked]):
        raise ConfigError(f"run {unclocked[0]!r} has no virtual time: give it device profiles, or plot by round")
    table = comparison_table(runs, target)
    with atomic_write(out_dir / "comparison.md") as f:
        f.write(table + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    metric = f"test_{runs[0].metric}"
    columns = ["test_accuracy", metric] if metric != "test_accuracy" else [metric]
    if any(run.personalized is not None for run in runs):
        columns.append(f"personalized_{runs[0].metric}")
    clock = ["virtual_time"] if any(run.clocked for run in runs) else []
    writer.writerow(["run", "round", *columns, "test_loss", "train_loss", "global_train_loss", "seconds", *clock])
    for run in runs:
        for r in run.history.records:
            writer.writerow(
                [
                    run.label,
                    r.round,
                    *(r.metric(c) for c in columns),
                    r.test_loss,
                    r.train_loss,
                    r.global_train_loss,
                    r.seconds,
                    *(r.metric(c) for c in clock),
                ]
            )
    with atomic_write(out_dir / "comparison.csv") as f:
        f.write(buffer.getvalue())
    plot_comparison(runs, out_dir / "comparison.png", title=title if title is not None else out_dir.name, x=x)
    return table
