"""What a run measured, round by round."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, fields


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


@dataclass
class History:
    records: list[RoundRecord]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def final(self) -> RoundRecord:
        return self.records[-1]

    def column(self, name: str) -> list:
        return [getattr(r, name) for r in self.records]

    def to_json(self) -> str:
        """Strict JSON: a non-finite number (a diverged loss) is written as null."""
        rows = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(r).items()}
                for r in self.records]
        return json.dumps({"rounds": rows}, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> History:
        rows = json.loads(text)["rounds"]
        return cls([RoundRecord(**{**row, "clients": tuple(row["clients"]), "dropped": tuple(row.get("dropped", ()))})
                    for row in rows])

    def to_csv(self) -> str:
        out = io.StringIO()
        names = [f.name for f in fields(RoundRecord)]
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        for r in self.records:
            row = [getattr(r, n) for n in names]
            row[names.index("clients")] = " ".join(map(str, r.clients))
            row[names.index("dropped")] = " ".join(map(str, r.dropped))
            writer.writerow("" if v is None else v for v in row)
        return out.getvalue()
