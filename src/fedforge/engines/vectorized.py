"""Train the selected clients of a round together, as one batched computation.

Every client keeps its own batches (the same `epoch_orders` stream as the sequential engine),
its own parameters and its own momentum: parameters are stacked along a leading client
dimension. Clients run different numbers of local steps when their datasets differ in size;
they are sorted by step count, so the clients still training at step t are a prefix of the
stack, and a step updates the views `params[:active]` in place. A client's last, short batch
is padded, its padding weighted 0. Nothing is truncated: each client does exactly the steps
it does in the sequential engine, on the same examples.

Linear/ReLU stacks use the hand-derived `fastmlp` kernel (batched matrix products); other
models use `torch.func` (`vmap` of `grad` of `functional_call`). Models with buffers or
operations `vmap` cannot batch fall back to the sequential engine, with a one-line notice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .. import fastmlp
from ..client import ClientConfig, ClientUpdate, LocalTerms, State, epoch_orders, finish_update, sgd
from ..data.datasets import TensorData, call_model, concat, gather, leaves, model_args
from ..evaluation import evaluate
from .base import ClientTask
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
    t; weight[c, t] is 1 / (that batch's size) for real rows and 0 for padding. At step t the
    first active[t] clients of the stack are still training.
    """

    rows: torch.Tensor  # (C, T, B) int64
    weight: torch.Tensor  # (C, T, B) float32
    active: list[int]  # (T,)
    stack_order: list[int]  # stack position -> index into the tasks
    steps: list[int]  # per task


def build_schedule(tasks: Sequence[ClientTask], starts: Sequence[int], config: ClientConfig) -> Schedule:
    """The batches each task's client would see in the sequential engine, stacked."""
    B = config.batch_size
    steps = [task.plan.num_steps(len(task.data), config) for task in tasks]
    stack_order = sorted(range(len(tasks)), key=lambda i: -steps[i])
    T = max(steps)
    rows = torch.zeros(len(tasks), T, B, dtype=torch.long)
    weight = torch.zeros(len(tasks), T, B)
    for position, i in enumerate(stack_order):
        n, epochs = len(tasks[i].data), tasks[i].plan.epochs or config.local_epochs
        batches = math.ceil(n / B)
        padded = torch.full((epochs, batches * B), -1, dtype=torch.long)
        padded[:, :n] = torch.stack(epoch_orders(n, epochs, torch.Generator().manual_seed(tasks[i].seed)))
        padded = padded.view(epochs * batches, B)[: steps[i]]
        valid = padded >= 0
        rows[position, : steps[i]] = torch.where(valid, padded, 0) + starts[i]
        weight[position, : steps[i]] = valid / valid.sum(1, keepdim=True)
    by_steps = np.sort(steps)
    active = (len(steps) - np.searchsorted(by_steps, np.arange(T), side="right")).tolist()
    return Schedule(rows, weight, active, stack_order, steps)


def _shared_source(tasks: Sequence[ClientTask]) -> tuple[TensorData, list[int]]:
    """One tensor holding every task's data, and where each task's rows start in it."""
    source = tasks[0].source
    if source is not None and all(t.source is source for t in tasks):
        return source, [t.start for t in tasks]
    starts = np.concatenate([[0], np.cumsum([len(t.data) for t in tasks])[:-1]]).tolist()
    return concat([t.data for t in tasks]), starts


class _Unsupported(Exception):
    """The model cannot be trained by a batched kernel; the engine falls back."""


class VectorizedEngine:
    """Trains many clients at once; results equal the sequential engine's up to float32 round-off.

    Args:
        max_memory: bytes of working memory for one chunk of clients (stacked parameters,
            momentum, activations, batch schedule); None: DEFAULT_MAX_MEMORY for the data's
            device. Rounds with more clients are processed chunk by chunk, so memory does not
            grow with the number of clients per round.
    """

    name = "vectorized"

    def __init__(self, max_memory: int | None = None):
        if max_memory is not None and max_memory <= 0:
            raise ValueError(f"max_memory must be > 0, got {max_memory}")
        self.max_memory = max_memory
        self._fallback: SequentialEngine | None = None
        self._per_example_activations: dict[int, int] = {}

    def run(
        self, model: nn.Module, global_state: State, tasks: Sequence[ClientTask], config: ClientConfig
    ) -> Iterator[ClientUpdate]:
        if not tasks:
            return
        kernel = None
        if self._fallback is None:
            try:
                if not config.task.is_tutorial_classification:
                    raise _Unsupported(f"its kernels train classification with SGD, not {config.task.name} with "
                                       f"{getattr(config.task.optimizer, '__name__', 'SGD')}")
                kernel = _kernel_for(model, tasks[0].data)
            except _Unsupported as e:
                self._fall_back(e)
        if kernel is None:
            yield from self._fallback.run(model, global_state, tasks, config)
            return
        size = self.chunk_size(model, tasks, config)
        for first in range(0, len(tasks), size):
            try:
                # Trains the whole chunk now; the updates are then handed out one by one.
                updates = kernel(model, global_state, tasks[first:first + size], config)
            except _Mixed:
                updates = SequentialEngine().run(model, global_state, tasks[first:first + size], config)
            except _Unsupported as e:
                self._fall_back(e)
                yield from self._fallback.run(model, global_state, tasks[first:], config)
                return
            yield from updates

    def _fall_back(self, reason: Exception) -> None:
        log.warning("the vectorized engine cannot batch this model or task (%s); "
                    "training its clients sequentially", reason)
        self._fallback = SequentialEngine()

    def chunk_size(self, model: nn.Module, tasks: Sequence[ClientTask], config: ClientConfig) -> int:
        """How many clients fit in `max_memory` at once (at least one)."""
        param_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
        copies = 3 if config.momentum else 2  # params, momentum, transient gradients
        example = tasks[0].data.rows(0, 1).x
        activations = self._activation_bytes(model, example) + sum(t.numel() * t.element_size()
                                                                   for t in leaves(example))
        steps = max(config.local_epochs * math.ceil(len(t.data) / config.batch_size) for t in tasks)
        per_client = copies * param_bytes + 3 * config.batch_size * activations + 12 * steps * config.batch_size
        budget = self.max_memory or DEFAULT_MAX_MEMORY.get(tasks[0].data.device.type, DEFAULT_MAX_MEMORY["cuda"])
        return max(1, min(len(tasks), budget // per_client))

    def _activation_bytes(self, model: nn.Module, example) -> int:
        """Bytes of every module output for one example, a batch of one (measured once per model)."""
        key = id(model)
        if key not in self._per_example_activations:
            total = 0

            def hook(_module, _inputs, output):
                nonlocal total
                if isinstance(output, torch.Tensor):
                    total += output.numel() * output.element_size()

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


def _kernel_for(model: nn.Module, data: TensorData):
    layout = fastmlp.mlp_layout(model)
    if layout is not None and layout.inputs(data.rows(0, 1).x) is not None:
        return _mlp_chunk
    if any(True for _ in model.buffers()):
        raise _Unsupported("it has buffers, e.g. BatchNorm statistics")
    return _func_chunk


def _stack(state: State, count: int) -> State:
    return {k: v.unsqueeze(0).repeat(count, *([1] * v.dim())) for k, v in state.items()}


def _stacked_terms(tasks: Sequence[ClientTask], schedule: Schedule, global_state: State,
                   config: ClientConfig) -> LocalTerms:
    """The chunk's LocalTerms: one decay, and each client's offset/correction stacked in schedule order."""
    terms = [task.plan.local_terms(config, global_state, global_state) for task in tasks]
    decay = terms[0].decay
    if any(t.decay != decay for t in terms):
        raise _Mixed()

    def stacked(field: str) -> State | None:
        per_task = [getattr(t, field) for t in terms]
        if all(v is None for v in per_task):
            return None
        zeros = {k: torch.zeros_like(v) for k, v in global_state.items()}
        ordered = [per_task[i] or zeros for i in schedule.stack_order]
        return {k: torch.stack([o[k] for o in ordered]) for k in global_state}

    return LocalTerms(decay, stacked("offset"), stacked("correction"))


class _Mixed(Exception):
    """Clients of one chunk differ in their proximal term: they cannot share a batched step."""


def _updates(
    model: nn.Module, tasks: Sequence[ClientTask], schedule: Schedule, params: State, global_state: State,
    loss_sum: torch.Tensor, correct: torch.Tensor, config: ClientConfig,
) -> Iterator[ClientUpdate]:
    """One ClientUpdate per task, in the tasks' order (the order the sequential engine yields).

    The stacked parameters become the stacked deltas in place; each update's delta is a view
    of its row, so no per-client copy is made and the chunk's memory is all there is.
    """
    finite = torch.ones(len(tasks), dtype=torch.bool, device=loss_sum.device)
    for k, v in params.items():
        v.sub_(global_state[k])
        if v.is_floating_point():
            finite &= torch.isfinite(v.flatten(1).sum(1))  # see client.all_finite
    seen = (schedule.weight > 0).sum((1, 2)).tolist()
    finite_list, losses, hits = finite.tolist(), loss_sum.tolist(), correct.tolist()
    position = {task_index: pos for pos, task_index in enumerate(schedule.stack_order)}
    for i, task in enumerate(tasks):
        pos = position[i]
        initial_loss = evaluate(model, global_state, task.data).loss if task.plan.measure_initial_loss else None
        yield finish_update(task.client_id, {k: v[pos] for k, v in params.items()}, num_examples=len(task.data),
                            num_steps=schedule.steps[i],
                            metrics=config.task.summarize({"loss": losses[pos], "accuracy": hits[pos]}, seen[pos]),
                            config=config, finite=finite_list[pos], initial_loss=initial_loss)


def _run_steps(model, tasks, global_state, config, step, *, shared_start=False) -> Iterator[ClientUpdate]:
    """Drive `step(source, views, buffer_views, term_views, rows, weight)` over a chunk's schedule.

    With `shared_start` (the step accepts shared params, see `fastmlp.sgd_step`) the first step
    starts every client from the one global state and stacks the clients' parameters itself.
    """
    source, starts = _shared_source(tasks)
    device = source.device
    schedule = build_schedule(tasks, starts, config)
    terms = _stacked_terms(tasks, schedule, global_state, config)
    rows, weight = schedule.rows.to(device), schedule.weight.to(device)
    C = len(tasks)
    shared = shared_start and C > 1 and bool(schedule.active) and schedule.active[0] == C
    if shared:  # the first step replaces these entries with the stacked clients'
        params, buffers = dict(global_state), ({} if config.momentum else None)
    else:
        params = _stack(global_state, C)
        buffers = {k: torch.zeros_like(v) for k, v in params.items()} if config.momentum else None
    loss_sum = torch.zeros(C, device=device)
    correct = torch.zeros(C, dtype=torch.long, device=device)
    views = buffer_views = term_views = None
    current = 0
    for t, active in enumerate(schedule.active):
        if active != current:  # re-slice only when a client finishes
            current = active
            # A single client runs unbatched (2-D): faster than a batch of one.
            pick = (lambda v: v[0]) if active == 1 else (lambda v: v[:active])
            term_views = LocalTerms(terms.decay, *({k: pick(v) for k, v in term.items()} if term else None
                                                   for term in (terms.offset, terms.correction)))
            if shared and t == 0:
                views, buffer_views = params, buffers
                current = None  # slice the stacked tensors the first step makes
            else:
                views = {k: pick(v) for k, v in params.items()}
                buffer_views = {k: pick(v) for k, v in buffers.items()} if buffers else None
        r, w = (rows[0, t], weight[0, t]) if active == 1 else (rows[:active, t], weight[:active, t])
        batch_loss, batch_correct = step(source, views, buffer_views, term_views, r, w)
        loss_sum[:active] += batch_loss
        correct[:active] += batch_correct
    return _updates(model, tasks, schedule, params, global_state, loss_sum, correct, config)


def _mlp_chunk(model, global_state, tasks, config) -> Iterator[ClientUpdate]:
    layout = fastmlp.mlp_layout(model)

    def step(source, views, buffer_views, term_views, r, w):
        x, y = gather(layout.inputs(source.x), r), gather(source.y, r)
        return fastmlp.sgd_step(layout, views, buffer_views, x, y, w, lr=config.lr, momentum=config.momentum,
                                terms=term_views)

    return _run_steps(model, tasks, global_state, config, step, shared_start=True)


def _func_chunk(model, global_state, tasks, config) -> Iterator[ClientUpdate]:
    def loss(params, x, y, w):
        logits = functional_call(model, params, *model_args(x))
        losses = F.cross_entropy(logits, y, reduction="none")
        valid = w > 0
        metrics = ((losses.detach() * valid).sum(), ((logits.argmax(-1) == y) & valid).sum())
        return (losses * w).sum(), metrics

    batched_grad = vmap(grad(loss, has_aux=True))
    single_grad = grad(loss, has_aux=True)
    model.train()

    def step(source, views, buffer_views, term_views, r, w):
        fn = single_grad if r.dim() == 1 else batched_grad
        grads, metrics = fn(views, gather(source.x, r), gather(source.y, r), w)
        names = list(views)
        sgd([views[k] for k in names], [grads[k] for k in names],
            [buffer_views[k] for k in names] if buffer_views else None,
            lr=config.lr, momentum=config.momentum, weight_decay=term_views.decay,
            offsets=[term_views.offset[k] for k in names] if term_views.offset else None,
            corrections=[term_views.correction[k] for k in names] if term_views.correction else None)
        return metrics

    try:
        return _run_steps(model, tasks, global_state, config, step)
    except (RuntimeError, NotImplementedError) as e:
        raise _Unsupported(str(e).splitlines()[0]) from e
