"""Where clients run. Every engine has the same signature and gives the same updates."""

from __future__ import annotations

from ..errors import ConfigError
from .base import ClientTask, Engine
from .sequential import SequentialEngine
from .vectorized import DEFAULT_MAX_MEMORY, VectorizedEngine

ENGINES = ("auto", "sequential", "vectorized")


def make_engine(name: str, *, max_memory: int = DEFAULT_MAX_MEMORY) -> Engine:
    """The engine called `name`; "auto" is the fastest for the model (vectorized, which falls
    back to sequential by itself for models it cannot batch)."""
    if name == "sequential":
        return SequentialEngine()
    if name in ("auto", "vectorized"):
        return VectorizedEngine(max_memory=max_memory)
    raise ConfigError(f"unknown engine {name!r} (choose from: {', '.join(ENGINES)})")


__all__ = ["DEFAULT_MAX_MEMORY", "ENGINES", "ClientTask", "Engine", "SequentialEngine", "VectorizedEngine", "make_engine"]
