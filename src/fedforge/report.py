"""A run's outputs on disk (history, model, plots) and console tables and lines."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from ._io import atomic_write
from .history import History, RoundRecord


def write_history(run_dir: str | os.PathLike, history: History) -> None:
    run_dir = Path(run_dir)
    with atomic_write(run_dir / "history.json") as f:
        f.write(history.to_json())
    with atomic_write(run_dir / "history.csv") as f:
        f.write(history.to_csv())


def write_model(run_dir: str | os.PathLike, state: dict[str, torch.Tensor]) -> None:
    """Save the global model's `state_dict` (on the CPU) as `model.pt`."""
    with atomic_write(Path(run_dir) / "model.pt", "wb") as f:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, f)


# What a plot's x-axis may show: the round, or the virtual seconds since the start (device profiles).
X_AXES = ("round", "virtual_time")


def x_label(x: str) -> str:
    return "virtual time (s)" if x == "virtual_time" else "round"


def plot_history(
    history: History,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    metric: str = "accuracy",
    x: str = "round",
) -> None:
    """The task's test `metric` (accuracy for classification) and loss per round, side by side, as a PNG;
    beside the test metric its personalized evaluation where the rounds have one, with the p10 to p90
    band across the clients. `x`: "round", or "virtual_time" (a run with device profiles: the
    virtual seconds by the end of each round)."""
    plt = pyplot()

    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    at = {r.round: r.metric(x) for r in history.records}  # each round's place on the x-axis
    rounds = [at[r] for r in history.column("round")]
    private = any("epsilon" in r.metrics for r in history.records)
    fig, axes = plt.subplots(1, 3 if private else 2, figsize=(15 if private else 10, 4))
    acc_ax, loss_ax = axes[0], axes[1]
    if private:  # differential privacy: the epsilon spent by the end of each round
        axes[2].plot(rounds, history.column("epsilon"), marker="o", color="tab:red", label="epsilon spent")
        axes[2].set(xlabel=x_label(x), ylabel="epsilon", title="privacy spent")
    acc_ax.plot(*_evaluated(rounds, history.column(f"test_{metric}")), marker="o", label="test")
    own = f"personalized_{metric}"  # the clients' own models on their own held-out data, where evaluated
    measured = [r for r in history.records if own in r.metrics]
    if measured:
        [line] = acc_ax.plot(
            [at[r.round] for r in measured], [r.metrics[own] for r in measured], marker="s", label="personalized"
        )
        band = [r for r in measured if f"{own}_p10" in r.metrics and f"{own}_p90" in r.metrics]
        if band:  # the spread across the clients
            acc_ax.fill_between(
                [at[r.round] for r in band],
                [r.metrics[f"{own}_p10"] for r in band],
                [r.metrics[f"{own}_p90"] for r in band],
                color=line.get_color(),
                alpha=0.2,
                label="personalized, p10 to p90 of clients",
            )
    loss_ax.plot(*_evaluated(rounds, history.column("test_loss")), marker="o", label="test")
    train = [(at[r.round], r.train_loss) for r in history.records if r.train_loss is not None]
    if train:
        loss_ax.plot(*zip(*train, strict=True), marker=".", linestyle="--", label="train (clients)")
    acc_ax.set(
        xlabel=x_label(x), ylabel=metric, title=f"{metric}: test and personalized" if measured else f"test {metric}"
    )
    loss_ax.set(xlabel=x_label(x), ylabel="loss", title="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def _evaluated(xs: list, ys: list) -> tuple[list, list]:
    """The points of the rounds evaluated (an asynchronous run evaluates every eval_every steps)."""
    kept = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib figure as PNG, atomically, and free it."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getvalue())


def headline(record: RoundRecord, metric: str) -> str:
    """The task's main test metric of a round, e.g. "test accuracy 0.7649" or "test r2 0.4512"; its
    federated evaluation's where it has no test metric (a deployment server without test data)."""
    for where in ("test", "federated"):
        if (value := record.metric(f"{where}_{metric}")) is not None:
            return f"{where} {metric.replace('_', ' ')} {value:.4f}"
    return f"test {metric} n/a"


def personalized(record: RoundRecord, metric: str) -> str | None:
    """The round's personalized evaluation of `metric` (the clients' own models on their own
    held-out data), e.g. "personalized accuracy 0.8512 (p10 0.712, p90 0.95)"; None without one."""
    key = f"personalized_{metric}"
    if key not in record.metrics:
        return None
    spread = [f"p{q} {record.metrics[f'{key}_p{q}']:.3g}" for q in (10, 90) if f"{key}_p{q}" in record.metrics]
    text = f"personalized {metric.replace('_', ' ')} {record.metrics[key]:.4f}"
    return f"{text} ({', '.join(spread)})" if spread else text


def round_line(record: RoundRecord, rounds: int, *, metric: str = "accuracy") -> str:
    """One console line per round, in the spirit of the tutorial's; `metric`: the task's primary,
    whose personalized evaluation it shows."""
    head = "initial model" if record.round == 0 else f"round {record.round}/{rounds}"
    parts = [f"{head:<14}"]
    if record.test_accuracy is not None:
        parts.append(f"test accuracy {record.test_accuracy:.4f}")
    if record.test_loss is not None:
        parts.append(f"test loss {record.test_loss:.4f}")
    parts += [
        f"{name.replace('_', ' ')} {value:.4g}" for name, value in record.metrics.items() if name.startswith("test_")
    ]
    if record.train_loss is not None:
        parts.append(f"train loss {record.train_loss:.4f}")
    if record.federated_accuracy is not None:
        parts.append(f"federated accuracy {record.federated_accuracy:.4f}")
    if (line := personalized(record, metric)) is not None:
        parts.append(line)
    if "epsilon" in record.metrics:
        parts.append(f"epsilon {record.metrics['epsilon']:.3f}")
    if "lr" in record.metrics:  # a learning-rate schedule's
        parts.append(f"lr {record.metrics['lr']:.4g}")
    if record.round and "virtual_time" in record.metrics:  # device profiles: the virtual clock
        parts.append(f"virtual time {record.metrics['virtual_time']:.4g} s")
    if "staleness_max" in record.metrics:  # an asynchronous server step's updates
        parts.append(f"staleness {record.metrics['staleness_mean']:.3g} (max {record.metrics['staleness_max']:.0f})")
    if record.round:
        parts.append(f"{record.seconds:.2f} s")
    return "  ".join(parts)


def partition_table(histogram: np.ndarray) -> str:
    """Rows: client, total, then the count of each label."""
    num_classes = histogram.shape[1]
    header = f"{'client':>6} {'examples':>8}  " + " ".join(f"{k:>5}" for k in range(num_classes))
    lines = [header]
    for client, row in enumerate(histogram):
        lines.append(f"{client:>6} {int(row.sum()):>8}  " + " ".join(f"{int(v):>5}" for v in row))
    sizes = histogram.sum(1)
    lines.append(
        f"{len(sizes)} clients, {int(sizes.sum())} examples; size min {sizes.min()}, "
        f"median {int(np.median(sizes))}, max {sizes.max()}"
    )
    return "\n".join(lines)


def plot_partition(histogram: np.ndarray, path: str | os.PathLike, *, title: str = "") -> None:
    """Stacked bars: one per client, one colour per label."""
    plt = pyplot()

    num_clients, num_classes = histogram.shape
    fig, ax = plt.subplots(figsize=(max(6, min(20, num_clients * 0.4)), 4))
    bottom = np.zeros(num_clients)
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    for k in range(num_classes):
        ax.bar(range(num_clients), histogram[:, k], bottom=bottom, color=cmap(k % cmap.N), label=str(k), width=0.85)
        bottom += histogram[:, k]
    ax.set(xlabel="client", ylabel="examples", title=title)
    ax.legend(title="label", ncol=2, fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    save_figure(fig, path)
