"""Where clients run. Every engine has the same signature and gives the same updates."""

from __future__ import annotations

from torch import nn

from ..contract import ClientConfig
from ..errors import ConfigError
from .base import ClientTask, Engine, Traffic
from .choice import EngineChoice
from .sequential import SequentialEngine
from .vectorized import DEFAULT_MAX_MEMORY, VectorizedEngine, batched_kernel, unbatchable

IN_PROCESS_ENGINES = ("auto", "sequential", "vectorized")
ENGINES = (*IN_PROCESS_ENGINES, "ray")  # ray: the optional extra fedforge[ray] (engines/ray.py)

# Layers that a vmapped step computes as fast as one client at a time or faster on the CPU:
# dense and elementwise. Convolutions are slower vmapped there; recurrent layers have no
# batching rule, so vmap runs them client by client, slower still (see AutoEngine).
_DENSE = (
    nn.Linear,
    nn.Embedding,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Softplus,
)
_RECURRENT = (nn.RNNBase,)


class AutoEngine(Engine):
    """The faster engine for each model and task, measured on this project's machines.

    Measured on a shared 2-core CPU (torch 2.13, `benchmarks/engines.py` W1 and W4, three runs
    each; seconds of training per round, sequential vs vectorized):

    - the tutorial's classification with SGD on a Linear/ReLU stack: the vectorized engine's
      hand-derived kernel (0.20 vs 0.36 s per round on the tutorial's experiment, W1);
    - other tasks, or Adam/AdamW, on models of dense and elementwise layers (Linear, Embedding,
      activations): vectorized, through torch.func (tabular-mlp regression with Adam, 20
      clients a round: 1.8-2.4x faster; mlp classification with Adam: 1.7-2.3x;
      Embedding+Linear language model: 1.1-1.2x);
    - convolutional networks that `fastconv` stacks (Sequential nets of Conv2d, BatchNorm2d,
      pooling, activations, Flatten, Linear, and the built-in ResNet's blocks): vectorized, its
      fastconv kernel, when at least two clients fit in a chunk of its memory budget
      (`benchmarks/convnets.py`, NIID-Bench's CNN, three runs: 0.25-0.35 vs 0.47-0.71 s per
      round with 10 clients of 600 a round, 0.34-0.39 vs 0.57-0.86 s with 100 of 60);
      sequential when a chunk holds one client (the built-in `cnn` and `resnet8` at 64 MiB:
      nothing is stacked, and the vectorized engine's rounds were 0.9-1.1x the sequential
      engine's);
    - other convolutional models: sequential on the CPU, where a vmapped convolution (the
      torch.func path) is no faster than one client at a time (measured before fastconv: cnn
      with Adam, 4 clients a round: 0.8-1.04x) and holds every active client's activations;
    - recurrent layers (LSTM, GRU, RNN): sequential, on any device, as vmap has no batching
      rule for them and runs them client by client (char-lstm: 0.17-0.20x);
    - a model that says it batches well (`batches_well`: an `hf:` transformer, whose clients'
      adapters train over one frozen base; `benchmarks/fine_tuning.py`): vectorized;
    - on CUDA, everything else the vectorized engine can batch goes to it (not re-measured
      with the torch.func path: no GPU was at hand);
    - what the vectorized engine cannot batch (a task's own loop, optimizers other than SGD,
      Adam and AdamW): sequential, without the vectorized engine's notice.
    """

    name = "auto"

    def __init__(self, *, max_memory: int | None = None, combine: bool = False):
        self.vectorized = VectorizedEngine(max_memory=max_memory, combine=combine)
        self.sequential = SequentialEngine()
        self._choice: EngineChoice | None = None

    def choose(self, model: nn.Module, tasks, config: ClientConfig | None = None) -> Engine:
        engine, reason = self._decide(model, tasks, config or ClientConfig())
        if tasks:
            self._choice = EngineChoice(engine.name, reason)
        return engine

    def _decide(self, model: nn.Module, tasks, config: ClientConfig) -> tuple[Engine, str]:
        """The engine for this round's `tasks`, and why (for `choice`)."""
        if not tasks:
            return self.sequential, ""
        kernel = batched_kernel(model, tasks[0].data, config)
        if kernel == "fastmlp":
            return self.vectorized, ""
        if kernel == "fastconv":
            if self.vectorized.capacity(model, tasks, config) < 2:
                return self.sequential, "auto: one client per chunk of the vectorized engine's memory budget"
            return self.vectorized, ""
        if kernel is None:
            why = unbatchable(model, tasks[0].data, config)
            return self.sequential, f"the vectorized engine cannot batch this model or task: {why}"
        if recurrent := sorted({type(m).__name__ for m in model.modules() if isinstance(m, _RECURRENT)}):
            return self.sequential, f"{', '.join(recurrent)}: vmap has no batching rule for recurrent layers"
        if any(p.is_cuda for p in model.parameters()) or getattr(model, "batches_well", False):
            return self.vectorized, ""
        leaves = [m for m in model.modules() if next(m.children(), None) is None]
        other = sorted({type(m).__name__ for m in leaves if not isinstance(m, _DENSE)})
        if other:
            return self.sequential, f"auto: {', '.join(other)}: no faster batched than one client at a time on the CPU"
        return self.vectorized, ""

    @property
    def choice(self) -> EngineChoice | None:
        """What trained the last round's clients, and why (None before the first round): the
        vectorized engine's own account when auto picked it, as it may still fall back."""
        if self._choice is not None and self._choice.engine == self.vectorized.name:
            return self.vectorized.choice or self._choice
        return self._choice

    def run(self, model, global_state, tasks, config):
        return self.choose(model, tasks, config).run(model, global_state, tasks, config)


def engine_choice(engine: Engine) -> EngineChoice:
    """Which engine trained `engine`'s last round, and why: auto's and the vectorized engine's
    account (see their `choice`), else the engine itself."""
    if isinstance(engine, (AutoEngine, VectorizedEngine)) and engine.choice is not None:
        return engine.choice
    return EngineChoice(engine.name)


def make_engine(name: str, *, max_memory: int | None = None, combine: bool = False) -> Engine:
    """The in-process engine called `name`: "sequential", "vectorized", or "auto" (see AutoEngine).
    `combine`: see VectorizedEngine (the sequential engine hands back each update)."""
    if name == "sequential":
        return SequentialEngine()
    if name == "vectorized":
        return VectorizedEngine(max_memory=max_memory, combine=combine)
    if name == "auto":
        return AutoEngine(max_memory=max_memory, combine=combine)
    if name == "ray":  # its workers load the run's data themselves: it needs to know how
        raise ConfigError(
            "engine ray is built from the run's data loader: RayEngine(data, seed=...) "
            "(fedforge.engines.ray), or from a Config by fedforge.experiment.make_run_engine"
        )
    raise ConfigError(f"unknown engine {name!r} (choose from: {', '.join(ENGINES)})")


__all__ = [
    "DEFAULT_MAX_MEMORY",
    "ENGINES",
    "IN_PROCESS_ENGINES",
    "AutoEngine",
    "ClientTask",
    "Engine",
    "EngineChoice",
    "SequentialEngine",
    "Traffic",
    "VectorizedEngine",
    "engine_choice",
    "make_engine",
]
