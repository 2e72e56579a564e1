"""Several runs of one experiment side by side: same data, partition, seed and selected clients.

Every run is the base Config with a few settings changed; since every random choice derives
from the seed, runs that share it share the partition and the clients selected each round.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write
from .config import Config, read_toml
from .errors import ConfigError, DivergenceError
from .history import History
from .report import pyplot, save_figure
from .tracking import Tracker


@dataclass(frozen=True)
class ComparedRun:
    label: str
    config: Config
    history: History
    wall_seconds: float
    diverged: str | None = None  # why training stopped early, if it did

    @property
    def metric(self) -> str:
        """The task's primary metric (accuracy, r2, perplexity, ...): what the comparison shows."""
        return self.config.client_config().task.primary

    def _better(self, a: float, b: float) -> bool:
        return a >= b if self.config.client_config().task.higher_is_better else a <= b

    @property
    def final(self) -> float | None:
        return self.history.final.metric(f"test_{self.metric}")

    @property
    def best(self) -> float | None:
        values = [v for v in self.history.column(f"test_{self.metric}") if v is not None]
        return (max if self.config.client_config().task.higher_is_better else min)(values) if values else None

    def rounds_to(self, target: float) -> int | None:
        """The first round whose test metric reached `target` (at least, or at most for a metric
        that is better lower), or None."""
        return next(
            (
                r.round
                for r in self.history.records
                if (v := r.metric(f"test_{self.metric}")) is not None and self._better(v, target)
            ),
            None,
        )


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
    return Config.from_dict({**base, **overrides, "name": label}, source=f"run {label!r}")


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
):
    """Run one variant; a run that diverges is reported with the rounds it completed.

    With `resume`, a variant that already has a checkpoint continues from it (a finished one
    runs no round); its wall time counts the rounds done before.
    """
    from .experiment import load_checkpoint, run_experiment

    torch.set_num_threads(threads)
    config = _variant(base, label, overrides)
    resume = resume and _resumable(config)
    earlier = 0.0
    if resume:
        earlier = sum(r.seconds for r in load_checkpoint(Path(config.out_dir) / label, "cpu").history.records)
    started = time.perf_counter()
    try:
        history = run_experiment(
            config, progress=False, verbose=False, resume=resume, trackers=trackers
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
) -> list[ComparedRun]:
    """Run every variant (base settings + its overrides) and return them in the given order.

    `base` may be a Config, or settings that only each variant completes (a noise multiplier
    shared by runs that each turn differential privacy on): every variant is checked as a whole.

    Each run writes its usual outputs to `out_dir/<label>/`. With jobs > 1 the runs go to
    that many worker processes, each with its share of the CPU threads. With `resume`, runs
    that `out_dir` already holds continue from their last completed round (a comparison cut
    short, or one run at a time in separate sessions); their settings must be the variant's.
    Every run is tracked by each of `trackers` (frozen values: they travel to the worker processes),
    as its own tracked run named after its label.
    """
    from .experiment import check_resumable

    if not variants:
        raise ConfigError("nothing to compare: give --strategies or --runs")
    base_values = {
        k: v for k, v in (base.items() if isinstance(base, Mapping) else base.__dict__.items()) if v is not None
    }
    base_values["out_dir"] = str(out_dir)
    for label, overrides in variants.items():  # validate everything before running anything
        config = _variant(base_values, label, overrides)
        if resume and _resumable(config):
            check_resumable(Path(out_dir) / label, config)
    for tracker in trackers:  # here, once: not by worker processes racing to make the same MLflow store
        tracker.prepare()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1:
        results = [
            _run_one(base_values, label, o, torch.get_num_threads(), resume, trackers) for label, o in variants.items()
        ]
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = [
                pool.submit(_run_one, base_values, label, o, threads, resume, trackers) for label, o in variants.items()
            ]
            results = [f.result() for f in futures]
    return [
        ComparedRun(label, _variant(base_values, label, variants[label]), History.from_json(history), wall, diverged)
        for label, history, wall, diverged in results
    ]


def comparison_table(runs: list[ComparedRun], target: float | None = None) -> str:
    """A Markdown table: final and best test metric (the task's primary), rounds to `target`, wall time."""
    metric = runs[0].metric.replace("_", " ")
    head = ["run", f"final {metric}", f"best {metric}"] + ([f"rounds to {target:.4g}"] if target else []) + ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def number(value):
        return f"{value:.4f}" if value is not None else "n/a"

    for run in runs:
        final = number(run.final)
        if run.diverged:
            final += f" (diverged in round {run.history.final.round + 1})"
        row = [run.label, final, number(run.best)]
        if target:
            reached = run.rounds_to(target)
            row.append(str(reached) if reached is not None else "not reached")
        row.append(f"{run.wall_seconds:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_comparison(runs: list[ComparedRun], path: str | os.PathLike, *, title: str = "") -> None:
    """The test metric (the task's primary) and training loss per round, one line per run."""
    plt = pyplot()

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        records = run.history.records
        acc_ax.plot([r.round for r in records], [r.metric(f"test_{run.metric}") for r in records], label=run.label)
        # The global model's loss on the training data when measured, else the clients' own.
        key = "global_train_loss" if records[-1].global_train_loss is not None else "train_loss"
        points = [(r.round, getattr(r, key)) for r in records if getattr(r, key) is not None]
        loss_ax.plot(*zip(*points, strict=True), label=run.label)
    loss_name = (
        "global model on training data"
        if runs[0].history.final.global_train_loss is not None
        else "clients' training loss"
    )
    metric = f"test {runs[0].metric.replace('_', ' ')}"
    acc_ax.set(xlabel="round", ylabel=metric, title=metric)
    loss_ax.set(xlabel="round", ylabel="loss", title=f"training loss ({loss_name})", yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def write_comparison(runs: list[ComparedRun], out_dir: str | os.PathLike, *, target: float | None, title: str) -> str:
    """comparison.md, comparison.csv and comparison.png in `out_dir`; returns the table."""
    out_dir = Path(out_dir)
    table = comparison_table(runs, target)
    with atomic_write(out_dir / "comparison.md") as f:
        f.write(table + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    metric = f"test_{runs[0].metric}"
    columns = ["test_accuracy", metric] if metric != "test_accuracy" else [metric]
    writer.writerow(["run", "round", *columns, "test_loss", "train_loss", "global_train_loss", "seconds"])
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
                ]
            )
    with atomic_write(out_dir / "comparison.csv") as f:
        f.write(buffer.getvalue())
    plot_comparison(runs, out_dir / "comparison.png", title=title)
    return table
