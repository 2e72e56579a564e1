"""One client's local training: global state + its data + hyperparameters -> ClientUpdate."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from . import fastmlp
from .data.datasets import TensorData, call_model, gather
from .errors import ConfigError, DivergenceError
from .evaluation import evaluate
from .fastmlp import MLPLayout
from .tasks import CLASSIFICATION, Task

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientConfig:
    """Local training hyperparameters, shared by every client of a run, and the task they train
    (its loss, metrics and optimizer; the tutorial's classification with SGD by default)."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    task: Task = CLASSIFICATION

    def __post_init__(self):
        if self.local_epochs < 1:
            raise ConfigError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.momentum and self.task.optimizer is not None:
            raise ConfigError(f"momentum is SGD's; {self.task.optimizer.__name__} takes its own options")


@dataclass(frozen=True)
class ClientPlan:
    """What one selected client is asked to do this round, beyond the run's ClientConfig.

    Strategies shape the local objective (FedProx's proximal term, SCAFFOLD's correction);
    the simulation shapes the amount of work (heterogeneous epochs, stragglers).

    Attributes:
        epochs: local epochs for this client (None: the config's).
        max_steps: stop after this many SGD steps (a straggler's partial work).
        proximal_mu: adds mu/2 * ||w - w_global||^2 to the loss (Li et al. 2020, FedProx).
        correction: a tensor per parameter (SCAFFOLD: c - c_i) that every step also moves
            the parameter by: p <- p - lr * correction, after the momentum update and outside
            the momentum buffer (as in Flower's NIID-Bench baseline). With plain SGD this is
            adding it to the gradient; with momentum rho, feeding it through the buffer would
            scale it by up to 1 / (1 - rho) twice (its estimate, (x - y_i) / (K lr), already
            carries that factor) and over-correct.
        measure_initial_loss: also report the global model's loss on the client's data
            before training (q-FedAvg needs it).
    """

    epochs: int | None = None
    max_steps: int | None = None
    proximal_mu: float = 0.0
    correction: State | None = None
    measure_initial_loss: bool = False

    def num_steps(self, num_examples: int, config: ClientConfig) -> int:
        epochs = self.epochs or config.local_epochs
        steps = epochs * math.ceil(num_examples / config.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def local_terms(self, config: ClientConfig, global_state: State, names) -> LocalTerms:
        """The plan's extra terms for the parameters `names` (see LocalTerms)."""
        decay = config.weight_decay + self.proximal_mu
        offset = {n: -self.proximal_mu * global_state[n] for n in names} if self.proximal_mu else None
        correction = {n: self.correction[n] for n in names} if self.correction is not None else None
        return LocalTerms(decay, offset, correction)


@dataclass(frozen=True)
class LocalTerms:
    """What a client's SGD step adds to the plain loss gradient g of a parameter p.

    buf <- momentum * buf + g + decay * p + offset;  p <- p - lr * buf - lr * correction.
    decay = weight_decay + mu and offset = -mu * w_global make FedProx's proximal gradient
    mu (p - w_global); correction is SCAFFOLD's c - c_i. offset/correction are None when zero.
    """

    decay: float
    offset: State | None = None
    correction: State | None = None


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back: the change to every state entry and how it was obtained.

    `delta` covers parameters and buffers (e.g. BatchNorm statistics), each in its own dtype.
    `metrics` are the task's training metrics by name (`loss` among them), measured on the
    examples seen while training; `train_accuracy` is the classification task's `accuracy`.
    """

    client_id: int
    delta: State
    num_examples: int
    num_steps: int
    train_loss: float
    train_accuracy: float | None
    initial_loss: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


def epoch_orders(num_examples: int, epochs: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One random permutation of the client's examples per local epoch.

    Every engine draws batches from this, so they see the same batches in the same order.
    """
    return [torch.randperm(num_examples, generator=generator) for _ in range(epochs)]


def sgd(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    offsets: list[torch.Tensor] | None = None,
    corrections: list[torch.Tensor] | None = None,
) -> list[torch.Tensor] | None:
    """One step of `torch.optim.SGD` (no dampening, no Nesterov) on `params`, in place.

    The gradient used is grads + weight_decay * params + offsets; after the step, params move
    by -lr * corrections as well (see LocalTerms). Returns the momentum buffers to pass to the
    next step (None without momentum).
    """
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if offsets is not None:
        grads = torch._foreach_add(grads, offsets)
    if momentum:
        if momentum_buffers is None:
            momentum_buffers = [g.detach().clone() for g in grads]
        else:
            torch._foreach_mul_(momentum_buffers, momentum)
            torch._foreach_add_(momentum_buffers, grads)
        grads = momentum_buffers
    torch._foreach_add_(params, grads, alpha=-lr)
    if corrections is not None:
        torch._foreach_add_(params, corrections, alpha=-lr)
    return momentum_buffers


def all_finite(tensors) -> bool:
    """Whether every float tensor holds only finite values.

    Checked through each tensor's sum, one read-only pass: a NaN or infinity anywhere makes
    the sum non-finite. (Finite values can only overflow the sum near 1e38, where a model
    has diverged anyway.)
    """
    sums = [t.sum() for t in tensors if t.is_floating_point()]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def load_state(module: nn.Module, state: State) -> None:
    """Copy `state` into `module`'s parameters and buffers (no reallocation)."""
    module.load_state_dict(state, strict=True)


Step = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def _autograd_steps(
    module: nn.Module, global_state: State, config: ClientConfig, plan: ClientPlan
) -> tuple[Step, Callable[[], State]]:
    """Steps through autograd with the task's loss: works for any module. fedforge's SGD
    (exact, with the plan's terms folded in) or the task's torch.optim optimizer, the plan's
    proximal term added to the gradients and its correction applied after each step."""
    task = config.task
    load_state(module, global_state)
    module.train()
    names, params = zip(*module.named_parameters())
    params = list(params)
    if task.optimizer is None:
        terms = plan.local_terms(config, global_state, names)
        offsets = [terms.offset[n] for n in names] if terms.offset else None
        corrections = [terms.correction[n] for n in names] if terms.correction else None
        momentum_buffers = None

        def update(grads):
            nonlocal momentum_buffers
            momentum_buffers = sgd(params, grads, momentum_buffers, lr=config.lr, momentum=config.momentum,
                                   weight_decay=terms.decay, offsets=offsets, corrections=corrections)
    else:
        options = {"lr": config.lr, "weight_decay": config.weight_decay, **task.optimizer_options}
        optimizer = task.optimizer(params, **options)  # fresh every round
        anchors = [global_state[n] for n in names] if plan.proximal_mu else None
        corrections = [plan.correction[n] for n in names] if plan.correction is not None else None

        def update(grads):
            if anchors is not None:  # FedProx: the gradient of mu/2 ||w - w_global||^2
                torch._foreach_add_(grads, torch._foreach_sub(params, anchors), alpha=plan.proximal_mu)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            if corrections is not None:  # SCAFFOLD, outside the optimizer's state
                torch._foreach_add_(params, corrections, alpha=-config.lr)

    def step(xb, yb):
        outputs = call_model(module, xb)
        loss = task.checked_loss(outputs, yb)
        grads = list(torch.autograd.grad(loss, params))
        with torch.no_grad():
            update(grads)
            return task.metric_sums(outputs.detach(), yb)

    return step, lambda: {k: v.detach() for k, v in module.state_dict().items()}


def _mlp_steps(
    layout: MLPLayout, global_state: State, config: ClientConfig, plan: ClientPlan
) -> tuple[Step, Callable[[], State]]:
    """SGD steps by the hand-derived Linear/ReLU kernel (same math, no autograd graph)."""
    params = {k: v.detach().clone() for k, v in global_state.items()}
    buffers = {k: torch.zeros_like(v) for k, v in params.items()} if config.momentum else None
    terms = plan.local_terms(config, global_state, params)

    def step(xb, yb):
        loss, correct = fastmlp.sgd_step(layout, params, buffers, xb, yb, 1.0 / len(yb), lr=config.lr,
                                         momentum=config.momentum, terms=terms)
        return {"loss": loss, "accuracy": correct}

    return step, lambda: params


def client_batches(x, y, config: ClientConfig, plan: ClientPlan,
                   generator: torch.Generator) -> Iterator[tuple]:
    """A client's batches of (inputs, targets) in the order every engine uses (`epoch_orders`),
    at most `plan.num_steps` of them; the last batch of an epoch may be smaller. `x` and `y`
    are tensors, or tuples or dicts of them (see TensorData)."""
    data = TensorData(x, y)
    max_steps = plan.num_steps(len(data), config)
    steps = 0
    for order in epoch_orders(len(data), plan.epochs or config.local_epochs, generator):
        order = order.to(data.device)
        for start in range(0, len(order), config.batch_size):
            if steps == max_steps:
                return
            batch = order[start:start + config.batch_size]
            steps += 1
            yield gather(x, batch), gather(y, batch)


def train_client(
    module: nn.Module,
    global_state: State,
    data: TensorData,
    config: ClientConfig,
    *,
    client_id: int,
    generator: torch.Generator,
    plan: ClientPlan = ClientPlan(),
    fast_mlp: bool = True,
) -> ClientUpdate:
    """Train `module`, loaded with `global_state`, on `data` as `config` and `plan` say.

    `module` is scratch space: it may be overwritten. Batches follow `epoch_orders(generator)`;
    the last batch of an epoch may be smaller, as with a DataLoader. Linear/ReLU stacks training
    the tutorial's classification with SGD take the `fastmlp` kernel unless `fast_mlp` is False
    (it computes the same thing); anything else goes through autograd with `config.task`.

    Raises:
        DivergenceError: the training loss or the weights became NaN or infinite.
    """
    task = config.task
    initial_loss = evaluate(module, global_state, data, task=task).loss if plan.measure_initial_loss else None
    if task.train is not None:
        return _own_loop(module, global_state, data, config, plan, client_id, generator, initial_loss)
    layout = fastmlp.mlp_layout(module) if fast_mlp and task.is_tutorial_classification else None
    x = layout.inputs(data.x) if layout else None
    if layout is not None and x is not None:
        step, final_state = _mlp_steps(layout, global_state, config, plan)
    else:
        x = data.x
        step, final_state = _autograd_steps(module, global_state, config, plan)
    sums: dict[str, torch.Tensor] = {}
    steps = units = 0
    for xb, yb in client_batches(x, data.y, config, plan, generator):
        for name, value in step(xb, yb).items():
            sums[name] = sums[name] + value if name in sums else value
        steps += 1
        units += task.units(yb)
    new_state = final_state()
    return finish_update(
        client_id, {name: new_state[name] - value for name, value in global_state.items()},
        num_examples=len(data), num_steps=steps, metrics=task.summarize({k: v.item() for k, v in sums.items()}, units),
        config=config, initial_loss=initial_loss,
    )


def _own_loop(module: nn.Module, global_state: State, data: TensorData, config: ClientConfig, plan: ClientPlan,
              client_id: int, generator: torch.Generator, initial_loss: float | None) -> ClientUpdate:
    """The task's own training function (the escape hatch) on the batches the client is given."""
    task = config.task
    if plan.proximal_mu or plan.correction is not None:
        raise ConfigError(f"task {task.name} trains with a loop of its own: the strategy's proximal term or "
                          "correction (FedProx, SCAFFOLD) cannot reach inside it")
    steps = 0

    def batches():
        nonlocal steps
        for batch in client_batches(data.x, data.y, config, plan, generator):
            steps += 1
            yield batch

    load_state(module, global_state)
    module.train()
    metrics = task.train(module, batches(), config)
    if metrics is None:
        metrics = evaluate(module, {k: v.detach() for k, v in module.state_dict().items()}, data, task=task).metrics
    if "loss" not in metrics:
        raise ConfigError(f"task {task.name}: its training function must return the training loss as "
                          f"{{'loss': ...}} (or None), got {sorted(metrics)}")
    delta = {name: value.detach() - global_state[name] for name, value in module.state_dict().items()}
    return finish_update(client_id, delta, num_examples=len(data), num_steps=steps,
                         metrics={k: float(v) for k, v in metrics.items()}, config=config, initial_loss=initial_loss)


def finish_update(
    client_id: int, delta: State, *, num_examples: int, num_steps: int, metrics: Mapping[str, float],
    config: ClientConfig, finite: bool | None = None, initial_loss: float | None = None,
) -> ClientUpdate:
    """The ClientUpdate of a finished client, after checking that its training did not diverge.

    `metrics` are the task's training metrics (`loss` among them), from the examples seen while
    training; `finite` says whether `delta` is all finite, when the caller already knows.
    """
    mean_loss = metrics["loss"]
    if finite is None:
        finite = all_finite(delta.values())
    if not (math.isfinite(mean_loss) and finite):
        raise DivergenceError(
            f"client {client_id} diverged (training loss {mean_loss:.4g}, weights finite: {finite});"
            f" lower the learning rate (lr={config.lr})"
        )
    return ClientUpdate(
        client_id=client_id, delta=delta, num_examples=num_examples, num_steps=num_steps,
        train_loss=mean_loss, train_accuracy=metrics.get("accuracy"), initial_loss=initial_loss, metrics=metrics,
    )
