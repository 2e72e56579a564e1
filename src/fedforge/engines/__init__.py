"""Where clients run. Every engine has the same signature and gives the same updates."""

from __future__ import annotations

from ..errors import ConfigError
from .base import ClientTask, Engine
from .sequential import SequentialEngine

ENGINES = {"sequential": SequentialEngine}


def make_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r} (choose from: {', '.join(ENGINES)})")
    return ENGINES[name]()


__all__ = ["ENGINES", "ClientTask", "Engine", "SequentialEngine", "make_engine"]
