"""What asynchronous aggregation is configured with: FedBuff's and FedAsync's settings, and the
staleness functions that weight an update by how many versions old its start model is.

The event loop that runs them is `fedforge.asynchronous` (docs/time.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._options import option
from .errors import ConfigError

STALENESS = ("constant", "poly", "hinge")
AGGREGATIONS = ("sync", "fedbuff", "fedasync")


@dataclass(frozen=True)
class Staleness:
    """How much an update `s` versions stale counts, in (0, 1]: `constant` 1; `poly` (1 + s)^-a;
    `hinge` 1 while s <= b, then 1 / (a (s - b) + 1) (Xie et al. 2019's three)."""

    kind: str = "poly"
    a: float = 0.5
    b: float = 4.0

    def __call__(self, s: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.kind == "poly":
            return float((1 + s) ** -self.a)
        return 1.0 if s <= self.b else 1.0 / (self.a * (s - self.b) + 1)


def parse_staleness(text: str) -> Staleness:
    """ "constant", "poly" or "poly:a=0.5", "hinge:a=10,b=4"; a one-line ConfigError otherwise."""
    kind, _, rest = text.strip().partition(":")
    usage = f"staleness must be constant, poly:a=A or hinge:a=A,b=B, got {text!r}"
    if kind not in STALENESS:
        raise ConfigError(usage)
    params: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in ("a", "b") or key in params or (key == "b" and kind != "hinge"):
            raise ConfigError(usage)
        try:
            params[key] = float(value)
        except ValueError:
            raise ConfigError(usage) from None
        if not (math.isfinite(params[key]) and 0 <= params[key] <= 1e6):
            raise ConfigError(f"staleness: {key} must be a number in [0, 1e6], got {text!r}")
    if kind == "constant" and params:
        raise ConfigError(usage)
    default = Staleness()
    return Staleness(kind, params.get("a", 10.0 if kind == "hinge" else default.a), params.get("b", default.b))


@dataclass(frozen=True)
class FedBuff:
    """FedBuff (Nguyen et al. 2022): a server step after every `buffer_size` updates (default: the
    run's clients per round), at most `concurrency` clients training at once (default: twice the
    buffer), updates weighted by `staleness` (default 1/sqrt(1 + s)) and dropped when more than
    `max_staleness` versions stale (None: never); the run's strategy makes the step from the
    buffer's weighted mean delta. The run is evaluated every `eval_every` steps (and at the last)."""

    buffer_size: int | None = None
    concurrency: int | None = None
    staleness: str = "poly:a=0.5"
    max_staleness: int | None = None
    eval_every: int = 1
    name = "fedbuff"

    def __post_init__(self):
        _check_common(self.concurrency, self.staleness, self.max_staleness, self.eval_every)
        if self.buffer_size is not None and self.buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {self.buffer_size}")


@dataclass(frozen=True)
class FedAsync:
    """FedAsync (Xie et al. 2019): each update mixed in as it arrives, w <- (1 - a) w + a w_client
    with a = `alpha` x `staleness`(s); `concurrency` clients at once (default: the run's clients
    per round); `max_staleness`, `eval_every` as FedBuff's."""

    alpha: float = 0.6
    concurrency: int | None = None
    staleness: str = "poly:a=0.5"
    max_staleness: int | None = None
    eval_every: int = 1
    name = "fedasync"

    def __post_init__(self):
        _check_common(self.concurrency, self.staleness, self.max_staleness, self.eval_every)
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"async_alpha must be in (0, 1], got {self.alpha}")


Asynchronous = FedBuff | FedAsync


def _check_common(concurrency: int | None, staleness: str, max_staleness: int | None, eval_every: int) -> None:
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    parse_staleness(staleness)
    if max_staleness is not None and max_staleness < 0:
        raise ConfigError(f"max_staleness must be >= 0, got {max_staleness}")
    if eval_every < 1:
        raise ConfigError(f"eval_every must be >= 1, got {eval_every}")


@dataclass(frozen=True)
class AsyncSettings:
    """Asynchronous aggregation on the virtual clock (TOML: flat keys or the table [asynchronous])."""

    aggregation: str = option(
        "sync",
        "sync: rounds; fedbuff or fedasync: asynchronous aggregation on the virtual clock (docs/time.md)",
        AGGREGATIONS,
    )
    buffer_size: int | None = option(
        None, "fedbuff: updates a server step waits for, K (default: clients_per_round)", metavar="K"
    )
    concurrency: int | None = option(
        None,
        "clients training at once, M (default: fedbuff 2 x buffer_size, fedasync clients_per_round)",
        metavar="M",
    )
    staleness: str = option(
        "poly:a=0.5",
        "how an update s versions stale counts: constant, poly:a=A ((1+s)^-A) or hinge:a=A,b=B",
    )
    max_staleness: int | None = option(None, "drop updates more than S versions stale", metavar="S")
    async_alpha: float = option(0.6, "fedasync: the mixing weight alpha of an update of staleness 0")
    eval_every: int = option(1, "asynchronous: evaluate the global model every N server steps (and at the last)")

    def __post_init__(self):
        self.check_asynchronous()

    def check_asynchronous(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"unknown aggregation {self.aggregation!r} (choose from: {', '.join(AGGREGATIONS)})")
        self.asynchronous()
        if self.aggregation == "sync":
            changed = [
                name
                for name, default in (
                    ("buffer_size", None),
                    ("concurrency", None),
                    ("staleness", "poly:a=0.5"),
                    ("max_staleness", None),
                    ("async_alpha", 0.6),
                    ("eval_every", 1),
                )
                if getattr(self, name) != default
            ]
            if changed:
                raise ConfigError(
                    f"{changed[0]} is a setting of asynchronous runs: give --aggregation fedbuff or fedasync"
                )
        if self.aggregation == "fedasync" and self.buffer_size is not None:
            raise ConfigError("buffer_size is FedBuff's: FedAsync applies each update as it arrives")
        if self.aggregation == "fedbuff" and self.async_alpha != 0.6:
            raise ConfigError("async_alpha is FedAsync's: FedBuff weights its buffer by staleness only")

    def asynchronous(self) -> Asynchronous | None:
        """How the run aggregates asynchronously, for `simulate(asynchronous=)`; None: rounds."""
        if self.aggregation == "fedbuff":
            return FedBuff(self.buffer_size, self.concurrency, self.staleness, self.max_staleness, self.eval_every)
        if self.aggregation == "fedasync":
            return FedAsync(self.async_alpha, self.concurrency, self.staleness, self.max_staleness, self.eval_every)
        return None


__all__ = [
    "AGGREGATIONS",
    "STALENESS",
    "AsyncSettings",
    "Asynchronous",
    "FedAsync",
    "FedBuff",
    "Staleness",
    "parse_staleness",
]
