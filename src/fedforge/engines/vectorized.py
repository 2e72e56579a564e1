"""Train the selected clients of a round together, as one batched computation.

Every client keeps its own batches (the same `epoch_orders` stream as the sequential engine),
its own parameters and its own optimizer state: they are stacked along a leading client
dimension, and the optimizer rules (`optim`) update the stack elementwise. Clients run
different numbers of local steps when their datasets differ in size; they are sorted by step
count, so the clients still training at step t are a prefix of the stack, and a step updates
the views `params[:active]` in place. Nothing is truncated: each client does exactly the steps
it does in the sequential engine, on the same examples.

Three kernels:

- Linear/ReLU stacks training the tutorial's classification with fedforge's SGD: the
  hand-derived `fastmlp` kernel (batched matrix products). A client's last, short batch is
  padded and its padding weighted 0, which is exact for this loss.
- Any other model and task: `torch.func` (`vmap` of `grad` of `functional_call`) with the task's
  own loss and metric sums, and SGD, Adam or AdamW (a model with a frozen base: its forward
  pass vmapped, its backward pass by autograd, which holds half the memory). A task's loss is a
  mean over its batch, so padding would change it: at each step the active clients are split
  into runs of equal batch size (the stack is sorted so that these are contiguous), one `vmap`
  per run, and a run of one client is computed unbatched.
- Convolutional networks `fastconv` can stack (Sequential nets of Conv2d, BatchNorm2d, pooling,
  activations, Flatten and Linear layers, the built-in ResNet's blocks): their forward pass
  for the run's clients at once (grouped convolutions), autograd for the backward pass, the
  runs as with `torch.func`.

Buffers (BatchNorm's running statistics and step count) are stacked like the parameters, each
client's updated by its own forward passes as the sequential engine's module updates its own;
the optimizer and the algorithm's terms see the trained parameters alone. Frozen parameters
(`algorithms.Roles`: a pretrained base under LoRA adapters, `requires_grad=False`) are the same
on every client and never change: they are never stacked or copied, but passed once, unbatched,
to every client's forward pass (closed over by `vmap`), so that x[c] @ W for the chunk's clients
c is one matrix product over all their rows, and memory holds the base once whatever the number
of clients (`capacity` leaves it out of a client's bytes). Operations `vmap`
cannot batch (e.g. random ones), a task's own training loop and optimizers other than the rules
fall back to the sequential engine, with a one-line notice.

Client algorithms (`fedforge.algorithms`) run batched as `client.train_client` runs them: each
client starts from its own personal entries (stacked), the parameters a phase does not train
(frozen ones excepted: see above) go with the buffers, each client's `terms` are stacked and its `loss_term` is
vmapped over the stack; the phases run one after another, each with its own schedule (a copy
phase, Ditto's, from each client's copy); `finish` is vmapped over the clients (client by client
where `vmap` cannot run it). `fastmlp` trains only an algorithm whose every phase trains every
parameter, with no loss term.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .. import fastconv, fastmlp
from ..algorithms import (
    FROZEN,
    PERSONAL,
    SHARED,
    ClientAlgorithm,
    ClientState,
    Phase,
    RoleMap,
    check_loss_term,
    nbytes,
    phase_seed,
)
from ..client import epoch_orders, finish_update, start_of_round
from ..contract import ClientConfig, ClientUpdate
from ..data.datasets import TensorData, call_model, concat, gather, leaves, model_args, tree_map
from ..evaluation import evaluate
from ..optim import LocalTerms, OptimizerState, State
from ..reductions import PartialSum, Update, example_weighted
from .base import ClientTask, Engine
from .choice import EngineChoice
from .sequential import SequentialEngine

log = logging.getLogger("fedforge")

# Bytes of working memory for the stacked clients of one chunk, when none is given. On the CPU,
# chunks small enough that the allocator hands one chunk's freed tensors to the next: a fresh
# mapping of hundreds of MB costs a page fault per 4 KiB, which made a round of 10,000 clients
# twice as slow with 1 GiB chunks (and its peak memory 2x) as with 64 MiB ones.
DEFAULT_MAX_MEMORY = {"cpu": 64 << 20, "cuda": 1 << 30}


@dataclass(frozen=True)
class Schedule:
    """Every batch of C clients, as row indices into one shared source.

    rows[c, t] are the B source rows of the batch client c (in stacked order) trains on at step
    t, its first sizes[c, t] real and the rest padding; weight[c, t] is 1 / sizes[c, t] for real
    rows and 0 for padding. At step t the first active[t] clients of the stack are still training.
    """

    rows: torch.Tensor  # (C, T, B) int64
    weight: torch.Tensor  # (C, T, B) float32
    sizes: np.ndarray  # (C, T) int64, 0 once a client is done
    active: list[int]  # (T,)
    stack_order: list[int]  # stack position -> index into the tasks
    steps: list[int]  # per task


def build_schedule(tasks: Sequence[ClientTask], starts: Sequence[int], config: ClientConfig) -> Schedule:
    """The batches each task's client would see in the sequential engine, stacked.

    The stack is sorted by step count (longest first), then by dataset size, so that clients
    whose batches have equal sizes at every step sit side by side.
    """
    B = config.batch_size
    steps = [task.plan.num_steps(len(task.data), config) for task in tasks]
    stack_order = sorted(range(len(tasks)), key=lambda i: (-steps[i], len(tasks[i].data)))
    T = max(steps)
    # In NumPy: a few small arrays per client, where each torch call would cost microseconds more.
    rows: np.ndarray = np.full((len(tasks), T * B), -1, dtype=np.int64)  # -1: padding, and the steps after the last
    for position, i in enumerate(stack_order):
        n, epochs = len(tasks[i].data), tasks[i].plan.epochs or config.local_epochs
        batches = math.ceil(n / B)
        padded = np.full((epochs, batches * B), -1, dtype=np.int64)
        padded[:, :n] = torch.stack(list(epoch_orders(n, epochs, torch.Generator().manual_seed(tasks[i].seed)))).numpy()
        padded = padded.reshape(-1)[: steps[i] * B]
        rows[position, : padded.size] = np.where(padded >= 0, padded + starts[i], -1)
    rows = rows.reshape(len(tasks), T, B)
    valid = rows >= 0
    sizes = valid.sum(2)
    weight = valid.astype(np.float32) / np.maximum(sizes, 1)[:, :, None].astype(np.float32)
    # Padding reads the client's first row (weighted 0): a real row, in its client's place.
    rows = np.where(valid, rows, np.asarray(starts, dtype=np.int64)[stack_order][:, None, None])
    by_steps = np.sort(steps)
    active = (len(steps) - np.searchsorted(by_steps, np.arange(T), side="right")).tolist()
    return Schedule(torch.from_numpy(rows), torch.from_numpy(weight), sizes, active, stack_order, steps)


def _shared_source(tasks: Sequence[ClientTask]) -> tuple[TensorData, list[int]]:
    """One tensor holding every task's data, and where each task's rows start in it."""
    source = tasks[0].source
    if source is not None and all(t.source is source for t in tasks):
        return source, [t.start for t in tasks]
    starts = np.concatenate([[0], np.cumsum([len(t.data) for t in tasks])[:-1]]).tolist()
    return concat([t.data for t in tasks]), starts


class _Unsupported(Exception):
    """The model cannot be trained by a batched kernel; the engine falls back."""


class VectorizedEngine(Engine):
    """Trains many clients at once; results equal the sequential engine's up to float32 round-off.

    Args:
        max_memory: bytes of working memory for one chunk of clients (stacked parameters,
            optimizer state, activations, batch schedule); None: DEFAULT_MAX_MEMORY for the
            data's device. Rounds with more clients are processed chunk by chunk, so memory
            does not grow with the number of clients per round.
        combine: hand a chunk whose clients are all `ClientTask.summable` back as one
            PartialSum, summed in one pass (what a Ray worker sends anyway); by default each
            client's update, which the round loop's per-client metrics and trackers see.

    `choice` says what trained the last round's clients: this engine and its kernel, or the
    sequential engine it fell back to and why (None before the first round).
    """

    name = "vectorized"

    def __init__(self, max_memory: int | None = None, *, combine: bool = False):
        if max_memory is not None and max_memory <= 0:
            raise ValueError(f"max_memory must be > 0, got {max_memory}")
        self.max_memory = max_memory
        self.combine = combine
        self._fallback: SequentialEngine | None = None
        # By model, weakly: a model's id may be a freed model's, whose measure it must not inherit.
        self._per_example_activations: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        self.choice: EngineChoice | None = None

    def run(
        self, model: nn.Module, global_state: State, tasks: Sequence[ClientTask], config: ClientConfig
    ) -> Iterator[Update]:
        if not tasks:
            return
        fallback = self._fallback
        if fallback is None:
            try:
                kernel = kernel_for(model, tasks[0].data, config)
                self.choice = EngineChoice(self.name, f"{_KERNEL_NAMES[kernel]} kernel")
            except _Unsupported as e:
                fallback = self._fall_back(e)
        if fallback is not None:
            yield from fallback.run(model, global_state, tasks, config)
            return
        size = self.chunk_size(model, tasks, config)
        for first in range(0, len(tasks), size):
            chunk = tasks[first : first + size]
            try:
                # Trains the whole chunk now; its updates (or their sum) are then handed out.
                trained = _train_chunk(kernel, model, global_state, chunk, config)
            except _Mixed:
                yield from SequentialEngine().run(model, global_state, chunk, config)
                continue
            except _Unsupported as e:
                yield from self._fall_back(e).run(model, global_state, tasks[first:], config)
                return
            summable = self.combine and all(t.summable and not t.plan.measure_initial_loss for t in chunk)
            combined = _combined(chunk, trained, global_state, config) if summable else None
            if combined is not None:
                yield combined
            else:
                yield from _updates(model, chunk, trained, global_state, config)

    def _fall_back(self, reason: Exception) -> SequentialEngine:
        """The engine that trains this model's clients from now on, the reason logged."""
        log.warning(
            "the vectorized engine cannot batch this model or task (%s); training its clients sequentially", reason
        )
        self._fallback = SequentialEngine()
        self.choice = EngineChoice("sequential", f"the vectorized engine cannot batch this model or task: {reason}")
        return self._fallback

    def chunk_size(self, model: nn.Module, tasks: Sequence[ClientTask], config: ClientConfig) -> int:
        """How many of `tasks`' clients are trained at once (at least one): see `capacity`."""
        return max(1, min(len(tasks), self.capacity(model, tasks, config)))

    def capacity(self, model: nn.Module, tasks: Sequence[ClientTask], config: ClientConfig) -> int:
        """How many clients like `tasks`' fit in `max_memory` at once (0 when not even one does).
        The frozen parameters are not counted: the clients share them, held once by the model."""
        state = model.state_dict()
        roles = config.algorithm.roles.assign(model)
        frozen = _frozen(model, roles, state)
        param_bytes = nbytes(state) - nbytes(frozen)
        rule = config.rule
        copies = 2 + (len(rule.slots) if rule is not None else 0)  # params, transient gradients, optimizer state
        copies += any(phase.copy for phase in config.algorithm.phases)  # Ditto's: the sent model beside the copy
        example = tasks[0].data.rows(0, 1).x
        activations = self._activation_bytes(model, example) + sum(
            t.numel() * t.element_size() for t in leaves(example)
        )
        steps = max(config.local_epochs * math.ceil(len(t.data) / config.batch_size) for t in tasks)
        schedule = steps * (12 * config.batch_size + 8)  # rows, weights, sizes
        # What a step keeps of its activations for the backward pass, and its transient ones: 3x
        # the forward pass's outputs under vmap(grad), half that differentiated outside vmap
        # (measured on a tiny Llama: 10.3 and 5.2 MiB a client at 8 sequences of 32 tokens).
        held = 1.5 if _by_autograd(model, tasks[0].data, config, roles, frozen, state) else 3
        per_client = copies * param_bytes + int(held * config.batch_size * activations) + schedule
        budget = self.max_memory or DEFAULT_MAX_MEMORY.get(tasks[0].data.device.type, DEFAULT_MAX_MEMORY["cuda"])
        return budget // per_client

    def _activation_bytes(self, model: nn.Module, example) -> int:
        """Bytes of every module output for one example, a batch of one (measured once per model)."""
        key = model
        if key not in self._per_example_activations:
            total = 0

            def hook(_module, _inputs, output):
                nonlocal total
                for t in output if isinstance(output, tuple) else (output,):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()

            handles = [m.register_forward_hook(hook) for m in model.modules()]
            training = model.training
            try:
                model.eval()  # touches no running statistics
                with torch.no_grad():
                    call_model(model, example)
            finally:
                model.train(training)
                for h in handles:
                    h.remove()
            self._per_example_activations[key] = total
        return self._per_example_activations[key]


def kernel_for(model: nn.Module, data: TensorData, config: ClientConfig) -> Callable:
    """The batched kernel that trains `model` on such data as `config` says; `_Unsupported` if none does."""
    task, rule = config.task, config.rule
    if task.train is not None:
        raise _Unsupported(f"task {task.name} trains with a loop of its own")
    if rule is None:
        assert task.optimizer is not None, "fedforge's SGD (optimizer None) always has a rule"
        options = f" with {dict(task.optimizer_options)}" if task.optimizer_options else ""
        raise _Unsupported(
            f"{task.optimizer.__name__}{options} is not one of fedforge's optimizer rules (sgd, adam, adamw)"
        )
    algorithm = config.algorithm
    roles = algorithm.roles.assign(model)
    # fastmlp's step trains every parameter, with no loss term (as in client.train_client).
    whole = all(len(roles.trained(phase.trains)) == len(roles.parameters) for phase in algorithm.phases)
    layout = fastmlp.mlp_layout(model) if whole and not algorithm.has_loss_term else None
    if task.is_tutorial_classification and layout is not None and layout.inputs(data.rows(0, 1).x) is not None:
        return _mlp_chunk
    if fastconv.convolutional(model) and fastconv.stacked_net(model) is not None:
        return _conv_chunk
    return _func_chunk


def _by_autograd(
    model: nn.Module, data: TensorData, config: ClientConfig, roles: RoleMap, frozen: State, state: State
) -> bool:
    """Whether `_func_chunk` differentiates the model outside `vmap` (a frozen base, and every
    other entry trained by every phase)."""
    if not frozen:
        return False
    try:
        if kernel_for(model, data, config) is not _func_chunk:
            return False
    except _Unsupported:
        return False
    stacked = set(state) - set(frozen)
    return all(stacked <= set(roles.trained(phase.trains)) for phase in config.algorithm.phases)


def batched_kernel(model: nn.Module, data: TensorData, config: ClientConfig) -> str | None:
    """Which kernel the engine trains `model` with: "fastmlp", "torch.func", or None when it falls
    back to the sequential engine from the start (an operation `vmap` refuses shows only when run)."""
    try:
        kernel = kernel_for(model, data, config)
    except _Unsupported:
        return None
    return _KERNEL_NAMES[kernel]


def unbatchable(model: nn.Module, data: TensorData, config: ClientConfig) -> str | None:
    """Why no batched kernel trains `model` on such data as `config` says (e.g. "task regression
    trains with a loop of its own"), or None when one does."""
    try:
        kernel_for(model, data, config)
    except _Unsupported as e:
        return str(e)
    return None


def _frozen(model: nn.Module, roles: RoleMap, state: State) -> State:
    """`state`'s frozen parameters (every name of a tied one): the same on every client and never
    changed, so the clients share one copy (a pretrained base under LoRA adapters). Frozen buffers
    are stacked like the others: a forward pass in training mode may update them (BatchNorm's
    running statistics)."""
    first: dict[int, str] = {}  # a tied parameter's names share its first name's tensor (functional_call asks)
    frozen = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if roles.roles.get(n) == FROZEN:
            frozen[n] = state[first.setdefault(id(p), n)]
    return frozen


def _stack(state: State, count: int) -> State:
    return {k: v.unsqueeze(0).repeat(count, *([1] * v.dim())) for k, v in state.items()}


def _stack_rows(base: State, rows: Sequence[State], order: Sequence[int]) -> State:
    """Each client's state stacked in `order`: client i's entries in `rows[i]`, `base`'s where it has none."""
    stacked = {}
    for k, v in base.items():
        if any(k in rows[i] for i in order):
            stacked[k] = torch.stack([rows[i].get(k, v) for i in order])
        else:
            stacked[k] = v.unsqueeze(0).repeat(len(order), *([1] * v.dim()))
    return stacked


def _stacked_terms(terms: Sequence[LocalTerms], order: Sequence[int], like: State) -> LocalTerms:
    """The clients' LocalTerms (tasks' order) as one: the decay they share, and each offset and
    correction of `like`'s names stacked in `order`, zero for a client without one (none where no
    client has one)."""
    decay = terms[0].decay
    if any(t.decay != decay for t in terms):
        raise _Mixed()

    def stacked(field: str) -> State | None:
        per_task = [getattr(t, field) or {} for t in terms]
        names = [k for k in like if any(k in p for p in per_task)]
        if not names:
            return None
        zeros = {k: torch.zeros_like(like[k]) for k in names}
        return {k: torch.stack([per_task[i].get(k, zeros[k]) for i in order]) for k in names}

    return LocalTerms(decay, stacked("offset"), stacked("correction"))


class _Mixed(Exception):
    """Clients of one chunk differ in their proximal term: they cannot share a batched step."""


def _pick(lo: int, hi: int, *, batched: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The stacked clients lo..hi as views; a single client unbatched (faster than a batch of
    one) unless `batched`."""
    return (lambda v: v[lo]) if hi - lo == 1 and not batched else (lambda v: v[lo:hi])


def _terms_view(terms: LocalTerms, pick) -> LocalTerms:
    return LocalTerms(
        terms.decay,
        *({k: pick(v) for k, v in term.items()} if term else None for term in (terms.offset, terms.correction)),
    )


@dataclass(frozen=True)
class _Clients:
    """A chunk's clients as their algorithm sees them at the start of the round (tasks' order):
    `personal`, the entries of the model each has of its own (none on its first round: the global
    state's, see `client.start_of_round`); `states`, what each kept; `inputs`, what the server sent."""

    roles: RoleMap
    personal: list[State]
    states: list[ClientState]
    inputs: list[State]

    @classmethod
    def of(cls, roles: RoleMap, algorithm: ClientAlgorithm, global_state: State, tasks: Sequence[ClientTask]):
        personal, states = [], []
        keeps_state = algorithm.keeps_state
        for task in tasks:
            kept = task.client_state
            if kept is None and keeps_state:
                _, kept = start_of_round(roles, algorithm, global_state, None)
            personal.append(kept.personal if kept is not None and roles.personal else {})
            states.append(kept or _NOTHING_KEPT)
        return cls(roles, personal, states, [task.plan.inputs or {} for task in tasks])

    def received(self, i: int, global_state: State) -> State:
        """The model client i starts its round from."""
        return {**global_state, **self.personal[i]} if self.personal[i] else global_state


_NOTHING_KEPT = ClientState()


@dataclass(frozen=True)
class _LossTerm:
    """A phase's loss term over the stacked clients: `fn(params, anchor, state, inputs)` is one
    client's scalar; `anchor` (each client's received values of the trained parameters) and `state`
    (its algorithm state) are stacked in the schedule's order, `inputs` too unless every client
    has the same (`inputs_dim` None)."""

    fn: Callable[[State, State, State, State], torch.Tensor]
    anchor: State
    state: State
    inputs: State
    inputs_dim: int | None

    def args(self, lo: int, hi: int, *, single: bool) -> tuple[State, State, State]:
        """The anchor, state and inputs of the run of clients lo..hi (one client's unbatched if `single`)."""
        pick = (lambda v: v[lo]) if single else (lambda v: v[lo:hi])
        inputs = self.inputs if self.inputs_dim is None else {k: pick(v) for k, v in self.inputs.items()}
        return {k: pick(v) for k, v in self.anchor.items()}, {k: pick(v) for k, v in self.state.items()}, inputs

    @property
    def in_dims(self) -> tuple[int, int, int | None]:
        return 0, 0, self.inputs_dim


def _same_inputs(inputs: Sequence[State]) -> bool:
    return all(x is inputs[0] for x in inputs)


def _stacked_states(states: Sequence[State], order: Sequence[int]) -> State:
    if not states[order[0]]:
        return {}
    return {k: torch.stack([states[i][k] for i in order]) for k in states[order[0]]}


@dataclass(frozen=True)
class _PhaseRun:
    """One phase of a chunk as a kernel trains it: the clients' batches (`schedule`, rows of
    `source`), where they start (`start`, stacked in the schedule's order; None: every one from
    `global_state`, the entries each client holds a row of), the frozen parameters (one copy for
    every client, never stacked), the parameters it trains, the clients' terms stacked, its loss
    term (None: none) and the optimizer states the clients carry in (schedule's order)."""

    index: int
    source: TensorData
    schedule: Schedule
    global_state: State
    frozen: State
    start: State | None
    trainable: list[str]
    terms: LocalTerms
    loss_term: _LossTerm | None
    carried: list[OptimizerState | None]


# A step: (t, active, params, optimizer state, terms) -> [(first, last + 1, {metric: per-client sums})].
Step = Callable[[int, int, State, OptimizerState, LocalTerms], list[tuple[int, int, dict[str, torch.Tensor]]]]


@dataclass
class _Trained:
    """A phase after its last step: stacked parameters and optimizer state, per-client metric sums."""

    params: State
    state: OptimizerState
    sums: dict[str, torch.Tensor]


def _run_steps(
    run: _PhaseRun, config: ClientConfig, step: Step, *, shared_start: bool = False, batched: bool = False
) -> _Trained:
    """Drive `step` over a phase's schedule, on views of the clients still training.

    The optimizer state and the terms cover the trained parameters alone. With `batched`, a single
    client's views keep their client dimension (the step's net takes stacked clients only).

    With `shared_start` (the step accepts shared params, see `fastmlp.sgd_step`) the first step
    starts every client from the one global state and stacks the clients' parameters and
    optimizer state itself (only when every client starts from it, its optimizer fresh).
    """
    rule = config.rule
    assert rule is not None, "kernel_for picks a kernel only for a rule"
    schedule, global_state, carried, terms = run.schedule, run.global_state, run.carried, run.terms
    C = len(schedule.stack_order)
    device = next(iter(global_state.values())).device
    trained_state = {k: global_state[k] for k in run.trainable}
    shared = (
        shared_start
        and run.start is None
        and C > 1
        and bool(schedule.active)
        and schedule.active[0] == C
        and all(s is None for s in carried)
    )
    if shared:  # the first step replaces these entries with the stacked clients'
        params = dict(global_state)
        state = OptimizerState(torch.zeros(C, dtype=torch.float64, device=device), {s: {} for s in rule.slots})
    else:
        params = run.start if run.start is not None else _stack(global_state, C)
        state = rule.stacked(carried, trained_state)
    sums: dict[str, torch.Tensor] = {}
    current: int | None = 0  # views, state_view, term_views: set at t = 0 (schedule.active[0] >= 1)
    for t, active in enumerate(schedule.active):
        if active != current:  # re-slice only when a client finishes
            current = active
            pick = _pick(0, active, batched=batched)
            term_views = _terms_view(terms, pick)
            if shared and t == 0:
                views, state_view = params, state
                current = None  # slice the stacked tensors the first step makes
            else:
                views, state_view = {k: pick(v) for k, v in params.items()}, state.view(pick)
        for lo, hi, batch_sums in step(t, active, views, state_view, term_views):
            for name, value in batch_sums.items():
                if name not in sums:
                    sums[name] = torch.zeros(C, dtype=value.dtype, device=value.device)
                sums[name][lo:hi] += value
    return _Trained(params, state, sums)


# A kernel: trains one phase of a chunk, and says each client's units of its metrics (schedule's order).
Kernel = Callable[[nn.Module, _PhaseRun, ClientConfig], tuple[_Trained, list]]


@dataclass
class _Chunk:
    """A trained chunk: the models the clients send (`trained.params`), their optimizer states
    (the first phase's) and metric sums, all stacked in `order` (position -> task index), each
    client's units of its metrics (by position), its steps (by task: the phases that train the
    model it sends), and what each client keeps and sends beside its update (`kept`, `extras`,
    by position; None: nothing)."""

    order: list[int]
    trained: _Trained
    units: list
    steps: list[int]
    clients: _Clients
    kept: list[ClientState | None] | None = None
    extras: list[State] | None = None


def _phase_tasks(tasks: Sequence[ClientTask], index: int, phase: Phase) -> Sequence[ClientTask]:
    """The chunk's tasks as phase `index` trains them: its batch seeds (`phase_seed`) and epochs."""
    if index == 0 and phase.epochs is None:
        return tasks
    return [
        replace(
            t,
            seed=phase_seed(t.seed, index),
            plan=phase.plan(t.plan),
        )
        for t in tasks
    ]


def _reordered(order: Sequence[int], into: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What moves rows stacked in `order` (position -> task index) to `into`'s; None when they agree."""
    if list(order) == list(into):
        return None
    position = {task_index: pos for pos, task_index in enumerate(order)}
    index = torch.tensor([position[i] for i in into])
    return lambda v: v[index.to(v.device)]


def _train_chunk(kernel: Kernel, model: nn.Module, global_state: State, tasks, config: ClientConfig) -> _Chunk:
    """The chunk's clients through their algorithm's phases one after another, each phase one
    batched computation (the order of `client.train_client`), then the algorithm's `finish`."""
    algorithm = config.algorithm
    roles = algorithm.roles.assign(model)
    clients = _Clients.of(roles, algorithm, global_state, tasks)
    frozen = _frozen(model, roles, global_state)
    rows_of = {k: v for k, v in global_state.items() if k not in frozen}  # each client's own
    source, starts = _shared_source(tasks)
    plain_terms = type(algorithm).terms is ClientAlgorithm.terms
    own: tuple[State, list[int]] | None = None  # the model the clients send, and its stack order
    copy: tuple[State, list[int]] | None = None
    kept_optimizer: tuple[OptimizerState, list[int]] | None = None
    counted: list[tuple[list[int], dict[str, torch.Tensor], list]] = []  # (order, sums, units) of sent phases
    steps = [0] * len(tasks)
    for index, phase in enumerate(algorithm.phases):
        phase_tasks = _phase_tasks(tasks, index, phase)
        schedule = build_schedule(phase_tasks, starts, config)
        order = schedule.stack_order
        trainable = roles.trained(phase.trains)
        like = {k: global_state[k] for k in trainable}
        start: State | None
        if phase.copy:
            rows = [{**p, **s.copy} for p, s in zip(clients.personal, clients.states, strict=True)]
            start = _stack_rows(rows_of, rows, order) if any(rows) else None
        elif own is None:
            start = _stack_rows(rows_of, clients.personal, order) if any(clients.personal) else None
        else:
            move = _reordered(own[1], order)
            start = own[0] if move is None else {k: move(v) for k, v in own[0].items()}
        terms, received = LocalTerms(0.0), []
        if not plain_terms or algorithm.has_loss_term:  # what each client received of the trained entries
            received = [{n: p.get(n, like[n]) for n in trainable} for p in clients.personal]
        if not plain_terms:
            per_task = [
                algorithm.terms(index, received[i], clients.states[i].algorithm, clients.inputs[i])
                for i in range(len(tasks))
            ]
            terms = _stacked_terms(per_task, order, like)
        run = _PhaseRun(
            index,
            source,
            schedule,
            rows_of,
            frozen,
            start,
            trainable,
            terms,
            _phase_loss_term(algorithm, index, received, clients, order),
            [tasks[i].optimizer_state for i in order] if index == 0 else [None] * len(order),
        )
        trained, units = kernel(model, run, config)
        if index == 0 and config.task.keep_optimizer_state:  # a kept optimizer state is the first phase's
            kept_optimizer = (trained.state, order)
        if phase.copy:
            copy = ({n: trained.params[n] for n in roles.names(SHARED, PERSONAL)}, order)
        else:
            own = (trained.params, order)
            counted.append((order, trained.sums, units))
            for i, n in enumerate(schedule.steps):
                steps[i] += n
        del trained, run, start
    assert own is not None, "every algorithm has a phase that trains the model it sends"
    params, order = own
    sums, units = _counted_sums(counted, order)
    optimizer_state = OptimizerState(torch.zeros(0), {})  # none: the task keeps none
    if kept_optimizer is not None:
        move = _reordered(kept_optimizer[1], order)
        optimizer_state = kept_optimizer[0] if move is None else kept_optimizer[0].view(move)
    chunk = _Chunk(order, _Trained(params, optimizer_state, sums), units, steps, clients)
    if algorithm.keeps_state or type(algorithm).finish is not ClientAlgorithm.finish:
        _finish(chunk, algorithm, global_state, copy, config)
    return chunk


def _counted_sums(
    counted: Sequence[tuple[list[int], dict[str, torch.Tensor], list]], order: Sequence[int]
) -> tuple[dict[str, torch.Tensor], list]:
    """The metric sums and units of the phases that train the sent model, added, in `order`."""
    sums: dict[str, torch.Tensor] = {}
    units: list = [0] * len(order)
    for phase_order, phase_sums, phase_units in counted:
        move = _reordered(phase_order, order)
        if move is not None:
            position = {task_index: pos for pos, task_index in enumerate(phase_order)}
            phase_sums = {k: move(v) for k, v in phase_sums.items()}
            phase_units = [phase_units[position[i]] for i in order]
        if len(counted) == 1:
            return phase_sums, phase_units
        sums = {**phase_sums, **{k: v + phase_sums[k] if k in phase_sums else v for k, v in sums.items()}}
        units = [a + b for a, b in zip(units, phase_units, strict=True)]
    return sums, units


def _phase_loss_term(
    algorithm: ClientAlgorithm, index: int, received: Sequence[State], clients: _Clients, order: Sequence[int]
) -> _LossTerm | None:
    """Phase `index`'s loss term over the clients stacked in `order` (None: the algorithm has none)."""
    if not algorithm.has_loss_term:
        return None

    def fn(params: State, anchor: State, state: State, inputs: State) -> torch.Tensor:
        return check_loss_term(algorithm.loss_term(index, params, anchor, state, inputs), algorithm)

    same = _same_inputs(clients.inputs)
    return _LossTerm(
        fn,
        _stacked_states(received, order),
        _stacked_states([s.algorithm for s in clients.states], order),
        clients.inputs[0] if same else _stacked_states(clients.inputs, order),
        None if same else 0,
    )


def _copied(finished: tuple[State, State]) -> tuple[State, State]:
    """A client's `finish`, its new state and extras copied (they may be views of the stacks, which
    `_updates` changes)."""
    state, extras = finished
    return {k: v.clone() for k, v in state.items()}, {k: v.clone() for k, v in extras.items()}


def _finish(
    chunk: _Chunk,
    algorithm: ClientAlgorithm,
    global_state: State,
    copy: tuple[State, list[int]] | None,
    config: ClientConfig,
) -> None:
    """Each client's `algorithm.finish` (its new state and extras) and what it keeps, into `chunk`:
    `finish` vmapped over the stacked clients, or client by client where `vmap` cannot run it. Kept
    rows are copied out of the stacks, which are freed with the chunk."""
    clients, order, params = chunk.clients, chunk.order, chunk.trained.params
    roles = clients.roles
    received = {n: global_state[n] for n in roles.shared}
    trained = {n: params[n] for n in roles.shared}
    states = [clients.states[i].algorithm for i in order]
    inputs = [clients.inputs[i] for i in order]
    device = next(iter(params.values())).device
    counts = torch.tensor([float(chunk.steps[i]) for i in order], dtype=torch.float64, device=device)
    finished: list[tuple[State, State]]
    if type(algorithm).finish is ClientAlgorithm.finish:
        finished = [(s, {}) for s in states]
    else:
        try:
            same = _same_inputs(inputs)
            new, extras = vmap(
                lambda t, s, x, k: algorithm.finish(received, t, s, x, k, config.lr),
                in_dims=(0, 0, None if same else 0, 0),
            )(
                trained,
                _stacked_states(states, range(len(order))),
                inputs[0] if same else _stacked_states(inputs, range(len(order))),
                counts,
            )
            finished = [
                ({k: v[pos].clone() for k, v in new.items()}, {k: v[pos].clone() for k, v in extras.items()})
                for pos in range(len(order))
            ]
        except Exception:  # any hook vmap cannot batch runs client by client
            finished = [
                _copied(
                    algorithm.finish(
                        received,
                        {n: v[pos] for n, v in trained.items()},
                        states[pos],
                        inputs[pos],
                        counts[pos].cpu(),
                        config.lr,
                    )
                )
                for pos in range(len(order))
            ]
    copies = None
    if copy is not None:
        move = _reordered(copy[1], order)
        copies = copy[0] if move is None else {k: move(v) for k, v in copy[0].items()}
    kept = []
    for pos, (algorithm_state, _) in enumerate(finished):
        state = ClientState(
            {n: params[n][pos].clone() for n in roles.personal},
            algorithm_state,
            {n: v[pos].clone() for n, v in copies.items()} if copies is not None else clients.states[order[pos]].copy,
        )
        kept.append(state if (state.personal or state.algorithm or state.copy) else None)
    chunk.kept = kept
    chunk.extras = [extras for _, extras in finished]


def _combined(
    tasks: Sequence[ClientTask], chunk: _Chunk, global_state: State, config: ClientConfig
) -> PartialSum | None:
    """The chunk's updates as the one PartialSum `combine_updates` would make of them, in one
    pass over the stacked parameters (a weighted sum of the rows, less the global state) instead of
    one per client for the deltas, one for the finite check and one per client for the sum.

    None when a client's loss or parameters are not finite: then the updates go one by one and the
    diverged client is named (a non-finite row makes the weighted sum non-finite).
    """
    # The round loop sums no client that keeps state: what it keeps must come back one by one.
    assert not config.algorithm.keeps_state, "a client that keeps state is never summable"
    params = {k: chunk.trained.params[k] for k in chunk.clients.roles.shared}
    if not all(v.is_floating_point() for v in params.values()):
        return None
    sums = {name: v.tolist() for name, v in chunk.trained.sums.items()}
    examples = [len(tasks[i].data) for i in chunk.order]
    total = sum(examples)
    metrics = example_weighted(
        (config.task.summarize({k: v[pos] for k, v in sums.items()}, chunk.units[pos]), n)
        for pos, n in enumerate(examples)
    )
    if not (total and math.isfinite(metrics.get("loss", math.nan))):
        return None
    device = next(iter(params.values())).device
    share = torch.tensor(examples, dtype=torch.float64, device=device).div_(total)
    mean = {}
    for k, v in params.items():
        row = (share.to(v.dtype) @ v.reshape(len(v), -1)).view_as(global_state[k]).sub_(global_state[k])
        if not torch.isfinite(row.sum()):
            return None
        mean[k] = row
    return PartialSum(mean, total, sum(chunk.steps), tuple(t.client_id for t in tasks), metrics=metrics)


def _updates(
    model: nn.Module, tasks: Sequence[ClientTask], chunk: _Chunk, global_state: State, config: ClientConfig
) -> Iterator[ClientUpdate]:
    """One ClientUpdate per task, in the tasks' order (the order the sequential engine yields).

    The stacked shared parameters become the stacked deltas in place; each update's delta is a
    view of its row, so no per-client copy is made and the chunk's memory is all there is. A kept
    optimizer state is copied out of the stack, which is then freed with the chunk.
    """
    trained, units = chunk.trained, chunk.units
    params = {k: trained.params[k] for k in chunk.clients.roles.shared}
    finite = torch.ones(len(tasks), dtype=torch.bool, device=next(iter(trained.params.values())).device)
    for k, v in params.items():
        v.sub_(global_state[k])
        if v.is_floating_point():
            finite &= torch.isfinite(v.flatten(1).sum(1))  # see client.all_finite
    finite_list = finite.tolist()
    sums = {name: v.tolist() for name, v in trained.sums.items()}
    position = {task_index: pos for pos, task_index in enumerate(chunk.order)}
    task = config.task
    for i, client in enumerate(tasks):
        pos = position[i]
        initial_loss = (
            evaluate(model, chunk.clients.received(i, global_state), client.data, task=task).loss
            if client.plan.measure_initial_loss
            else None
        )
        yield finish_update(
            client.client_id,
            {k: v[pos] for k, v in params.items()},
            num_examples=len(client.data),
            num_steps=chunk.steps[i],
            metrics=task.summarize({k: v[pos] for k, v in sums.items()}, units[pos]),
            config=config,
            finite=finite_list[pos],
            initial_loss=initial_loss,
            optimizer_state=trained.state.client(pos) if task.keep_optimizer_state else None,
            extras=chunk.extras[pos] if chunk.extras is not None else None,
            client_state=chunk.kept[pos] if chunk.kept is not None else None,
        )


def _mlp_chunk(model: nn.Module, run: _PhaseRun, config: ClientConfig) -> tuple[_Trained, list]:
    layout = fastmlp.mlp_layout(model)
    assert layout is not None, "kernel_for picks this kernel only for an MLP layout"
    source, schedule = run.source, run.schedule
    weight = schedule.weight
    if next(iter(run.global_state.values())).dtype == torch.float64:  # 1 / size in float64, as client.py's
        weight = (weight > 0) / torch.from_numpy(schedule.sizes).clamp(min=1)[..., None].double()
    rows, weight = schedule.rows.to(source.device), weight.to(source.device)
    inputs = layout.inputs(source.x)

    def step(t, active, views, state, terms):
        r, w = (rows[0, t], weight[0, t]) if active == 1 else (rows[:active, t], weight[:active, t])
        state.step.add_(1)
        loss, correct = fastmlp.sgd_step(
            layout,
            views,
            state.slots.get("momentum_buffer"),
            gather(inputs, r),
            gather(source.y, r),
            w,
            rule=config.rule,
            terms=terms,
        )
        return [(0, active, {"loss": loss, "accuracy": correct})]

    trained = _run_steps(run, config, step, shared_start=True)
    return trained, schedule.sizes.sum(1).tolist()


def _runs(sizes: np.ndarray) -> list[tuple[int, int]]:
    """The maximal runs lo..hi of equal values in `sizes`."""
    cuts = np.flatnonzero(sizes[1:] != sizes[:-1]) + 1
    bounds = [0, *cuts.tolist(), len(sizes)]
    return list(itertools.pairwise(bounds))


def _run_views(
    lo: int, hi: int, active: int, views: State, state: OptimizerState, terms: LocalTerms, *, batched: bool
) -> tuple[State, OptimizerState, LocalTerms]:
    """The parameters, optimizer state and terms of the run of clients lo..hi among the `active`
    ones (the step's own views when the run is all of them; see `_pick` for `batched`)."""
    if (lo, hi) == (0, active):
        return views, state, terms
    pick = _pick(lo, hi, batched=batched)
    return {k: pick(v) for k, v in views.items()}, state.view(pick), _terms_view(terms, pick)


def _count_units(units: list, lo: int, hi: int, y, task) -> None:
    """Add the units of each client lo..hi's targets (`y`, stacked in that order) to `units`."""
    for j in range(hi - lo):
        units[lo + j] += task.units(tree_map(operator.itemgetter(j), y))


def _func_chunk(model: nn.Module, run: _PhaseRun, config: ClientConfig) -> tuple[_Trained, list]:
    """vmap(grad(functional_call)) of the task's loss (plus the algorithm's loss term). Buffers
    (e.g. BatchNorm1d's running statistics) and the parameters the phase does not train are stacked
    like the trained ones and go with the buffers, updated in place by each client's forward pass;
    a model with such entries is vmapped even for one client (its views keep the client dimension).
    The frozen parameters are closed over, unbatched: `vmap` computes x[c] @ W for every client c
    as one matrix product over all the clients' rows, and W is held once.

    A model with frozen parameters and no such entries (a base under LoRA adapters) is
    differentiated outside `vmap` (`by_autograd`): the same gradients, to round-off, with half the
    memory of vmap(grad) on a transformer. An operation `vmap` batches only under `grad` (LSTM's,
    which `grad` decomposes) switches the chunk to vmap(grad) at its first step: the failed forward
    pass changed nothing."""
    task, rule = config.task, config.rule
    source, schedule, term = run.source, run.schedule, run.loss_term
    rows = schedule.rows.to(source.device)
    units = [0] * len(schedule.stack_order)
    trainable, frozen = run.trainable, run.frozen
    has_buffers = len(trainable) < len(run.global_state)

    def loss(params, buffers, x, y, *extra):  # extra: the loss term's (anchor, state, inputs), if any
        args, kwargs = model_args(x)
        outputs = functional_call(model, (params, buffers, frozen), args, kwargs)
        value = task.checked_loss(outputs, y)
        if term is not None:
            value = value + term.fn(params, *extra[0])
        return value, task.metric_sums(outputs.detach(), y)

    one = grad(loss, has_aux=True)
    in_dims = (0, 0, 0, 0) if term is None else (0, 0, 0, 0, term.in_dims)
    by_grad, losses = vmap(one, in_dims=in_dims), vmap(loss, in_dims=in_dims)

    def by_autograd(params, buffers, x, y, *extra):
        """Each client's gradient: the vmapped forward pass, then one backward pass by autograd
        through the sum of the clients' losses (client c's parameters reach its loss alone).
        Autograd keeps the batched tensors the forward pass computed and runs the fused backward
        kernels on them, where `grad` under `vmap` keeps more and splits some (SiLU's backward)
        into several operations."""
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            values, sums = losses(leaves, buffers, x, y, *extra)
            grads = torch.autograd.grad(values.sum(), list(leaves.values()), materialize_grads=True)
        return dict(zip(leaves, grads, strict=True)), sums

    # A failed forward pass may have changed buffers; other models keep vmap(grad)'s round-off.
    many = by_autograd if frozen and not has_buffers else by_grad
    model.train()

    def step(t, active, views, state, terms):
        nonlocal many
        done = []
        for lo, hi in _runs(schedule.sizes[:active, t]):
            single = hi - lo == 1 and not has_buffers
            r = rows[lo:hi, t, : schedule.sizes[lo, t]]
            x, y = gather(source.x, r), gather(source.y, r)
            if single:  # one client: unbatched
                x, y = tree_map(lambda v: v[0], x), tree_map(lambda v: v[0], y)
            run_params, run_state, run_terms = _run_views(lo, hi, active, views, state, terms, batched=has_buffers)
            params = {k: run_params[k] for k in trainable}
            buffers = {k: v for k, v in run_params.items() if k not in params}
            extra = () if term is None else (term.args(lo, hi, single=single),)
            if single:
                grads, sums = one(params, buffers, x, y, *extra)
            else:
                try:
                    grads, sums = many(params, buffers, x, y, *extra)
                except (RuntimeError, NotImplementedError):
                    if many is by_grad:
                        raise
                    many = by_grad
                    grads, sums = many(params, buffers, x, y, *extra)
            rule.step(params, grads, run_state, run_terms)
            if single:
                units[lo] += task.units(y)
            else:
                _count_units(units, lo, hi, y, task)
            done.append((lo, hi, sums))
        return done

    try:
        trained = _run_steps(run, config, step, batched=has_buffers)
    except (RuntimeError, NotImplementedError) as e:
        raise _Unsupported(str(e).splitlines()[0] + _attention_hint(model, e)) from e
    return trained, units


def _attention_hint(model: nn.Module, error: Exception) -> str:
    """What makes a transformers model batchable when `vmap` refused a test of a tensor's values
    and its attention is not eager: the SDPA and flash implementations' mask builders test the
    mask's values in Python (`padding_mask.all()`)."""
    if "data-dependent control flow" not in str(error):
        return ""
    for module in model.modules():
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if isinstance(implementation, str) and implementation != "eager":
            return f' (a transformers model with attn_implementation="{implementation}"; "eager" batches)'
    return ""


def _conv_chunk(model: nn.Module, run: _PhaseRun, config: ClientConfig) -> tuple[_Trained, list]:
    """The clients' forward pass stacked by `fastconv` (grouped convolutions), backward by
    autograd, at each step one run of clients per batch size (as `_func_chunk`). The parameters the
    phase does not train are no leaves of the graph."""
    task, rule = config.task, config.rule
    net = fastconv.stacked_net(model)
    assert net is not None, "kernel_for picks this kernel only for a net fastconv stacks"
    source, schedule, term = run.source, run.schedule, run.loss_term
    rows = schedule.rows.to(source.device)
    trainable, frozen = run.trainable, run.frozen
    units = [0] * len(schedule.stack_order)
    cross_entropy = task.classifies_by_cross_entropy
    losses, sums_of = vmap(task.checked_loss), vmap(task.metric_sums)
    loss_terms = vmap(term.fn, in_dims=(0, *term.in_dims)) if term is not None else None

    def step(t, active, views, state, terms):
        done = []
        for lo, hi in _runs(schedule.sizes[:active, t]):
            r = rows[lo:hi, t, : schedule.sizes[lo, t]]
            x, y = gather(source.x, r), gather(source.y, r)
            run_params, run_state, run_terms = _run_views(lo, hi, active, views, state, terms, batched=True)
            leaves = {k: run_params[k].detach().requires_grad_() for k in trainable}
            shared = {k: v.expand(hi - lo, *v.shape) for k, v in frozen.items()}  # views: no copy
            outputs = net({**shared, **run_params, **leaves}, x)
            if cross_entropy:  # each client's mean, summed: one call for all
                per_example = F.cross_entropy(outputs.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
                loss = per_example.sum() / y.shape[1]
                batch_sums = {
                    "loss": per_example.detach().sum(1),
                    "accuracy": (outputs.detach().argmax(-1) == y).sum(1),
                }
            else:
                loss = losses(outputs, y).sum()
                batch_sums = sums_of(outputs.detach(), y)
            if term is not None and loss_terms is not None:  # each client's, summed
                loss = loss + loss_terms(leaves, *term.args(lo, hi, single=False)).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()))
            with torch.no_grad():
                rule.step(
                    {k: run_params[k] for k in trainable},
                    dict(zip(trainable, grads, strict=True)),
                    run_state,
                    run_terms,
                )
            _count_units(units, lo, hi, y, task)
            done.append((lo, hi, batch_sums))
        return done

    model.train()
    try:
        trained = _run_steps(run, config, step, batched=True)
    except (RuntimeError, NotImplementedError) as e:
        raise _Unsupported(str(e).splitlines()[0]) from e
    return trained, units


_KERNEL_NAMES: dict[Callable, str] = {_mlp_chunk: "fastmlp", _func_chunk: "torch.func", _conv_chunk: "fastconv"}
