"""The strategies' own server state, one small frozen dataclass per kind.

`ServerState.strategy_state` holds one of these (None for a strategy without state of its own,
FedAvg's family). A checkpoint stores `to_dict()`, a table of its fields by name, beside `kind()`,
its class's qualified name, and reads it back with `StrategyState.from_dict`, which finds the class
by that name. Checkpoints written before the kind was stored have only the table: their kind is
the one class with exactly those field names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..contract import State
from ..errors import ConfigError


class StrategyState:
    """Base of a strategy's own state: a frozen dataclass whose fields are tensors, tables of
    tensors or numbers (what a checkpoint can hold)."""

    def to_dict(self) -> dict[str, Any]:
        """Its fields by name, the values as they are (the checkpoint's layout)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def kind(self) -> str:
        """Its class's qualified name, e.g. "fedforge.strategies.state.Momentum" (stored beside `to_dict()`)."""
        return _name(type(self))

    @staticmethod
    def from_dict(values: Mapping[str, Any], kind: str | None = None) -> StrategyState | None:
        """The state of class `kind` (a `kind()`) with these fields; without `kind` (a checkpoint
        written before kinds were stored), the one class with exactly these field names. None for an
        empty table."""
        if not values:
            return None
        names = set(values)
        held = ", ".join(sorted(map(str, names)))
        if kind is not None:
            cls = next((c for c in _kinds(StrategyState) if _name(c) == kind), None)
            if cls is None:
                raise ConfigError(f"its strategy state is a {kind}, which is not defined here (import its module)")
            fields = {f.name for f in dataclasses.fields(cls)}
            if names != fields:
                raise ConfigError(f"its strategy state, a {kind}, holds {held}, not {', '.join(sorted(fields))}")
            return cls(**values)
        kinds = [cls for cls in _kinds(StrategyState) if {f.name for f in dataclasses.fields(cls)} == names]
        if len(kinds) != 1:
            found = "no" if not kinds else "more than one"
            raise ConfigError(f"its strategy state holds {held}: {found} kind of state")
        return kinds[0](**values)


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _kinds(cls: type) -> list[type]:
    """The dataclasses among `cls`'s subclasses, at any depth."""
    found: list[type] = []
    subclasses: list[type] = cls.__subclasses__()
    for sub in subclasses:
        if dataclasses.is_dataclass(sub):
            found.append(sub)
        found.extend(_kinds(sub))
    return found


@dataclass(frozen=True)
class Momentum(StrategyState):
    """FedAvgM's server momentum: v, one tensor per float entry of the model."""

    velocity: State


@dataclass(frozen=True)
class Moments(StrategyState):
    """FedAdagrad's, FedAdam's and FedYogi's first and second moments m and v (Reddi et al. 2021)."""

    m: State
    v: State


@dataclass(frozen=True)
class Controls(StrategyState):
    """SCAFFOLD's server control variate c (each client's c_i is in that client's own state)."""

    control: State


@dataclass(frozen=True)
class Dynamic(StrategyState):
    """FedDyn's server state h, one tensor per float entry of the model (Acar et al. 2021)."""

    h: State


__all__ = ["Controls", "Dynamic", "Moments", "Momentum", "StrategyState"]
