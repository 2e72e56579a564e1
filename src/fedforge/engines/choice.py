"""Which engine trained a run's clients, and why: what `fedforge run` reports at its end."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineChoice:
    """The engine that actually trained the clients (`engine`), and why when it is not simply the
    one asked for (`reason`: auto's choice, or the vectorized engine falling back to sequential).

    `str()` is the console's form: "vectorized (fastmlp kernel)", "sequential (the vectorized
    engine cannot batch this model or task: task regression trains with a loop of its own)".
    """

    engine: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.engine} ({self.reason})" if self.reason else self.engine


__all__ = ["EngineChoice"]
