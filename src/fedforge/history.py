"""What a run measured, round by round."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields

import numpy as np

# The RoundRecord's numeric fields; record.metrics holds the rest (test_r2, epsilon, bytes_up, ...).
NUMBERS = (
    "test_loss",
    "test_accuracy",
    "train_loss",
    "train_accuracy",
    "federated_loss",
    "federated_accuracy",
    "global_train_loss",
    "seconds",
    "train_seconds",
)

# The percentiles across clients that a personalized evaluation reports beside each mean.
PERCENTILES = (10, 50, 90)


@dataclass(frozen=True)
class RoundRecord:
    """One round's measurements; round 0 is the initial model, before any training."""

    round: int
    clients: tuple[int, ...]
    test_loss: float | None
    test_accuracy: float | None
    train_loss: float | None = None
    train_accuracy: float | None = None
    federated_loss: float | None = None
    federated_accuracy: float | None = None
    global_train_loss: float | None = None  # the global model on all training data (eval_train)
    seconds: float = 0.0  # the whole round
    train_seconds: float = 0.0  # selection, client training and aggregation (no evaluation)
    dropped: tuple[int, ...] = ()  # selected clients that never reported (dropout, dropped stragglers)
    metrics: dict[str, float] = field(default_factory=dict)  # the task's other metrics: train_mae, test_r2, ...

    def metric(self, name: str) -> float | None:
        """A field (test_accuracy) or one of the task's metrics (test_r2) by name."""
        return self.metrics[name] if name in self.metrics else getattr(self, name, None)


@dataclass
class History:
    records: list[RoundRecord]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def final(self) -> RoundRecord:
        return self.records[-1]

    def column(self, name: str) -> list:
        return [r.metric(name) for r in self.records]

    def to_json(self) -> str:
        """Strict JSON: a non-finite number (a diverged loss) is written as null."""

        def strict(value):
            if isinstance(value, dict):
                return {k: strict(v) for k, v in value.items()}
            return None if isinstance(value, float) and not math.isfinite(value) else value

        rows = [strict(asdict(r)) for r in self.records]
        return json.dumps({"rounds": rows}, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> History:
        rows = json.loads(text)["rounds"]
        return cls(
            [
                RoundRecord(**{**row, "clients": tuple(row["clients"]), "dropped": tuple(row.get("dropped", ()))})
                for row in rows
            ]
        )

    def to_csv(self) -> str:
        """One row per round: the record's fields, then a column per task metric."""
        out = io.StringIO()
        names = [f.name for f in fields(RoundRecord) if f.name != "metrics"]
        extra = sorted({name for r in self.records for name in r.metrics})
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names + extra)
        for r in self.records:
            row = [getattr(r, n) for n in names] + [r.metrics.get(n) for n in extra]
            row[names.index("clients")] = " ".join(map(str, r.clients))
            row[names.index("dropped")] = " ".join(map(str, r.dropped))
            writer.writerow("" if v is None else v for v in row)
        return out.getvalue()


def personalized_summary(results: Iterable[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """A round's personalized evaluation, for `RoundRecord.metrics`, from each evaluated client's
    (metrics of its personal model on its own held-out data, number of those examples).

    For each metric name (loss, accuracy, ...), in the order the clients first give them:
    `personalized_<name>`, the example-weighted mean over the clients that report it, then
    `personalized_<name>_p10`, `_p50` and `_p90`, its percentiles across those clients (numpy's
    linear interpolation; each client counts once, whatever its size). No clients: {}.

    Raises:
        ValueError: a client with num_examples <= 0 (it has nothing to be evaluated on).
    """
    values: dict[str, list[float]] = {}
    weights: dict[str, list[int]] = {}
    for metrics, num_examples in results:
        if num_examples <= 0:
            raise ValueError(f"a personalized evaluation needs examples: a client reported num_examples={num_examples}")
        for name, value in metrics.items():
            values.setdefault(name, []).append(float(value))
            weights.setdefault(name, []).append(num_examples)
    summary = {}
    for name, column in values.items():
        summary[f"personalized_{name}"] = float(np.average(column, weights=weights[name]))
        for q, value in zip(PERCENTILES, np.percentile(column, PERCENTILES), strict=True):
            summary[f"personalized_{name}_p{q}"] = float(value)
    return summary
