"""Where clients run. Every engine has the same signature and gives the same updates."""

from __future__ import annotations

from .. import fastmlp
from ..errors import ConfigError
from .base import ClientTask, Engine
from .sequential import SequentialEngine
from .vectorized import DEFAULT_MAX_MEMORY, VectorizedEngine

ENGINES = ("auto", "sequential", "vectorized")


class AutoEngine:
    """The faster engine for each model, measured on this project's machines.

    Linear/ReLU models go to the vectorized engine's batched kernel (2x the sequential engine
    on the tutorial's experiment); other models go to the vectorized engine on CUDA, where
    `vmap` batches them well, and to the sequential engine on the CPU, where a `vmap`ped
    convolution is slower than one client at a time (76 s vs 51 s per round on NIID-Bench's CNN).
    """

    name = "auto"

    def __init__(self, *, max_memory: int | None = None):
        self.vectorized = VectorizedEngine(max_memory=max_memory)
        self.sequential = SequentialEngine()

    def choose(self, model, tasks, config=None) -> Engine:
        if config is not None and not config.task.is_tutorial_classification:
            return self.sequential  # the batched kernels train classification with SGD only
        layout = fastmlp.mlp_layout(model)
        if layout is not None and tasks and layout.inputs(tasks[0].data.rows(0, 1).x) is not None:
            return self.vectorized
        on_cuda = any(p.is_cuda for p in model.parameters())
        return self.vectorized if on_cuda else self.sequential

    def run(self, model, global_state, tasks, config):
        return self.choose(model, tasks, config).run(model, global_state, tasks, config)


def make_engine(name: str, *, max_memory: int | None = None) -> Engine:
    """The engine called `name`: "sequential", "vectorized", or "auto" (see AutoEngine)."""
    if name == "sequential":
        return SequentialEngine()
    if name == "vectorized":
        return VectorizedEngine(max_memory=max_memory)
    if name == "auto":
        return AutoEngine(max_memory=max_memory)
    raise ConfigError(f"unknown engine {name!r} (choose from: {', '.join(ENGINES)})")


__all__ = ["DEFAULT_MAX_MEMORY", "ENGINES", "AutoEngine", "ClientTask", "Engine", "SequentialEngine", "VectorizedEngine", "make_engine"]
