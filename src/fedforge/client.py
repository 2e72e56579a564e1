"""One client's local training: global state + its data + hyperparameters -> ClientUpdate.

The types a client is given and returns live in `contract` (re-exported here), the optimizer
rules in `optim`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from . import fastmlp
from ._options import check_choices, option
from .contract import ClientConfig, ClientPlan, ClientUpdate
from .data.datasets import TensorData, Tree, call_model, gather
from .errors import ConfigError, DivergenceError
from .evaluation import evaluate
from .fastmlp import MLPLayout
from .models import MODELS, model_factory
from .optim import LocalTerms, OptimizerState, State, sgd
from .schedules import Constant, RoundConfig, parse_schedule
from .tasks import OPTIMIZERS, TASKS, make_task


def epoch_orders(num_examples: int, epochs: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One random permutation of the client's examples per local epoch, each drawn when it is
    reached (so memory does not grow with the number of epochs, and a client that stops after
    `max_steps` draws no more).

    Every engine draws batches from this, so they see the same batches in the same order.
    """
    for _ in range(epochs):
        yield torch.randperm(num_examples, generator=generator)


class OutOfTime(Exception):
    """Local training passed its deadline (a deployment client's `--max-round-seconds`)."""


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
Final = Callable[[], State]


def _autograd_steps(
    module: nn.Module,
    global_state: State,
    config: ClientConfig,
    plan: ClientPlan,
    optimizer_state: OptimizerState | None,
) -> tuple[Step, Final, Callable[[], OptimizerState]]:
    """Steps through autograd with the task's loss: works for any module. The config's optimizer
    rule (`optim`, with the plan's terms), or else the task's torch.optim optimizer itself, the
    plan's proximal term added to the gradients and its correction applied after each step."""
    task = config.task
    load_state(module, global_state)
    module.train()
    names, parameters = zip(*module.named_parameters(), strict=True)
    params = list(parameters)
    rule = config.rule
    if rule is not None:
        terms = plan.local_terms(global_state, names)
        named = dict(zip(names, params, strict=True))
        state = optimizer_state.clone() if optimizer_state is not None else rule.init(named)

        def update(grads):
            rule.step(named, dict(zip(names, grads, strict=True)), state, terms)

        def final_optimizer_state():
            return state
    else:
        assert task.optimizer is not None, "fedforge's SGD (optimizer None) always has a rule"
        optimizer = task.optimizer(params, **config.optimizer_options)
        if optimizer_state is not None:
            _load_torch_state(optimizer, optimizer_state, names)
        anchors = [global_state[n] for n in names] if plan.proximal_mu else None
        corrections = [plan.correction[n] for n in names] if plan.correction is not None else None

        def update(grads):
            if anchors is not None:  # FedProx: the gradient of mu/2 ||w - w_global||^2
                torch._foreach_add_(grads, torch._foreach_sub(params, anchors), alpha=plan.proximal_mu)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            optimizer.step()
            if corrections is not None:  # SCAFFOLD, outside the optimizer's state
                torch._foreach_add_(params, corrections, alpha=-config.lr)

        def final_optimizer_state():
            return _torch_state(optimizer, names)

    def step(xb, yb):
        outputs = call_model(module, xb)
        loss = task.checked_loss(outputs, yb)
        grads = list(torch.autograd.grad(loss, params))
        with torch.no_grad():
            update(grads)
            return task.metric_sums(outputs.detach(), yb)

    return step, lambda: {k: v.detach() for k, v in module.state_dict().items()}, final_optimizer_state


def _torch_state(optimizer: torch.optim.Optimizer, names) -> OptimizerState:
    """A torch.optim optimizer's per-parameter state as an OptimizerState (its tensors by name)."""
    step = torch.zeros((), dtype=torch.float64)
    slots: dict[str, dict[str, torch.Tensor]] = {}
    for index, per_param in optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            if key == "step":
                step = torch.as_tensor(value, dtype=torch.float64).clone()
            elif isinstance(value, torch.Tensor):
                slots.setdefault(key, {})[names[index]] = value.detach().clone()
            elif value is not None:
                raise ConfigError(
                    f"{type(optimizer).__name__} keeps {key!r} ({type(value).__name__}) in its state, "
                    f"which fedforge cannot carry between rounds"
                )
    return OptimizerState(step, slots)


def _load_torch_state(optimizer: torch.optim.Optimizer, state: OptimizerState, names) -> None:
    """Give a fresh torch.optim optimizer the state `_torch_state` took from last round's (copied)."""
    per_param = {}
    for index, name in enumerate(names):
        entry = {key: tensors[name].clone() for key, tensors in state.slots.items() if name in tensors}
        if entry:
            per_param[index] = {"step": state.step.to(torch.float32), **entry}
    optimizer.load_state_dict({**optimizer.state_dict(), "state": per_param})


def _mlp_steps(
    layout: MLPLayout,
    global_state: State,
    config: ClientConfig,
    plan: ClientPlan,
    optimizer_state: OptimizerState | None,
) -> tuple[Step, Final, Callable[[], OptimizerState]]:
    """SGD steps by the hand-derived Linear/ReLU kernel (the same rule, no autograd graph)."""
    rule = config.rule
    assert rule is not None, "the tutorial's task trains with fedforge's SGD, a rule"
    params = {k: v.detach().clone() for k, v in global_state.items()}
    state = optimizer_state.clone() if optimizer_state is not None else rule.init(params)
    terms = plan.local_terms(global_state, params)

    def step(xb, yb):
        state.step.add_(1)
        loss, correct = fastmlp.sgd_step(
            layout, params, state.slots.get("momentum_buffer"), xb, yb, 1.0 / len(yb), rule=rule, terms=terms
        )
        return {"loss": loss, "accuracy": correct}

    return step, lambda: params, lambda: state


def client_batches(
    x, y, config: ClientConfig, plan: ClientPlan, generator: torch.Generator, *, deadline: float | None = None
) -> Iterator[tuple]:
    """A client's batches of (inputs, targets) in the order every engine uses (`epoch_orders`),
    at most `plan.num_steps` of them; the last batch of an epoch may be smaller. `x` and `y`
    are tensors, or tuples or dicts of them (see TensorData). Past `deadline` (a
    `time.monotonic()` value) it raises OutOfTime instead of giving the next batch."""
    data = TensorData(x, y)
    max_steps = plan.num_steps(len(data), config)
    steps = 0
    for order in epoch_orders(len(data), plan.epochs or config.local_epochs, generator):
        order = order.to(data.device)
        for start in range(0, len(order), config.batch_size):
            if steps == max_steps:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise OutOfTime(f"{steps} of {max_steps} steps done")
            batch = order[start : start + config.batch_size]
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
    optimizer_state: OptimizerState | None = None,
    deadline: float | None = None,
) -> ClientUpdate:
    """Train `module`, loaded with `global_state`, on `data` as `config` and `plan` say.

    `module` is scratch space: it may be overwritten. Batches follow `epoch_orders(generator)`;
    the last batch of an epoch may be smaller, as with a DataLoader. Linear/ReLU stacks training
    the tutorial's classification with SGD take the `fastmlp` kernel unless `fast_mlp` is False
    (it computes the same thing); anything else goes through autograd with `config.task`.
    `optimizer_state` is where the client's optimizer left off last round (None: fresh); the
    update carries the new one when the task keeps it (`Task.keep_optimizer_state`).

    Raises:
        DivergenceError: the training loss or the weights became NaN or infinite.
        OutOfTime: training passed `deadline` (a `time.monotonic()` value; None: none).
    """
    task = config.task
    initial_loss = evaluate(module, global_state, data, task=task).loss if plan.measure_initial_loss else None
    if task.train is not None:
        return _own_loop(module, global_state, data, config, plan, client_id, generator, initial_loss, deadline)
    layout = fastmlp.mlp_layout(module) if fast_mlp and task.is_tutorial_classification else None
    mlp_inputs = layout.inputs(data.x) if layout else None
    x: Tree
    if layout is not None and mlp_inputs is not None:
        x = mlp_inputs
        step, final_state, final_optimizer_state = _mlp_steps(layout, global_state, config, plan, optimizer_state)
    else:
        x = data.x
        step, final_state, final_optimizer_state = _autograd_steps(module, global_state, config, plan, optimizer_state)
    sums: dict[str, torch.Tensor] = {}
    steps = units = 0
    for xb, yb in client_batches(x, data.y, config, plan, generator, deadline=deadline):
        for name, value in step(xb, yb).items():
            sums[name] = sums[name] + value if name in sums else value
        steps += 1
        units += task.units(yb)
    new_state = final_state()
    return finish_update(
        client_id,
        {name: new_state[name] - value for name, value in global_state.items()},
        num_examples=len(data),
        num_steps=steps,
        metrics=task.summarize({k: v.item() for k, v in sums.items()}, units),
        config=config,
        initial_loss=initial_loss,
        optimizer_state=final_optimizer_state() if task.keep_optimizer_state else None,
    )


def _own_loop(
    module: nn.Module,
    global_state: State,
    data: TensorData,
    config: ClientConfig,
    plan: ClientPlan,
    client_id: int,
    generator: torch.Generator,
    initial_loss: float | None,
    deadline: float | None,
) -> ClientUpdate:
    """The task's own training function (the escape hatch) on the batches the client is given."""
    task = config.task
    if plan.proximal_mu or plan.correction is not None:
        raise ConfigError(
            f"task {task.name} trains with a loop of its own: the strategy's proximal term or "
            "correction (FedProx, SCAFFOLD) cannot reach inside it"
        )
    steps = 0

    def batches():
        nonlocal steps
        for batch in client_batches(data.x, data.y, config, plan, generator, deadline=deadline):
            steps += 1
            yield batch

    load_state(module, global_state)
    module.train()
    assert task.train is not None, "called for a task with a training function of its own"
    metrics = task.train(module, batches(), config)
    if metrics is None:
        metrics = evaluate(module, {k: v.detach() for k, v in module.state_dict().items()}, data, task=task).metrics
    if "loss" not in metrics:
        raise ConfigError(
            f"task {task.name}: its training function must return the training loss as "
            f"{{'loss': ...}} (or None), got {sorted(metrics)}"
        )
    delta = {name: value.detach() - global_state[name] for name, value in module.state_dict().items()}
    return finish_update(
        client_id,
        delta,
        num_examples=len(data),
        num_steps=steps,
        metrics={k: float(v) for k, v in metrics.items()},
        config=config,
        initial_loss=initial_loss,
    )


def finish_update(
    client_id: int,
    delta: State,
    *,
    num_examples: int,
    num_steps: int,
    metrics: Mapping[str, float],
    config: ClientConfig,
    finite: bool | None = None,
    initial_loss: float | None = None,
    optimizer_state: OptimizerState | None = None,
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
        client_id=client_id,
        delta=delta,
        num_examples=num_examples,
        num_steps=num_steps,
        train_loss=mean_loss,
        train_accuracy=metrics.get("accuracy"),
        initial_loss=initial_loss,
        metrics=metrics,
        optimizer_state=optimizer_state,
    )


@dataclass(frozen=True)
class ClientSettings:
    """A client's model, task and local training (TOML: flat keys or the table [client])."""

    model: str = option(
        "mlp",
        "model: a built-in, or package.module:factory, a function (input_shape, num_classes) "
        "-> torch.nn.Module of your own",
        MODELS,
        open_choices=True,
    )
    task: str = option(
        "classification",
        "what clients learn: classification (cross-entropy; accuracy), regression "
        "(MSE; mse, mae, r2), language-model (next-token cross-entropy; perplexity), or "
        "package.module:object, a fedforge.Task of your own",
        TASKS,
        open_choices=True,
    )
    optimizer: str = option(
        "sgd",
        "client optimizer: sgd (lr, momentum, weight_decay), adam or adamw (lr, "
        "weight_decay), fresh each round unless keep_optimizer_state",
        OPTIMIZERS,
    )
    keep_optimizer_state: bool = option(
        False, "keep each client's optimizer state (momentum, Adam's moments) from one of its rounds to its next"
    )
    local_epochs: int = option(1, "local epochs per round")
    batch_size: int = option(32, "local batch size")
    lr: float = option(0.01, "client learning rate")
    momentum: float = option(0.0, "client SGD momentum (SGD only)")
    weight_decay: float = option(0.0, "client weight decay")
    lr_schedule: str = option(
        "constant",
        "the client lr by round, from lr: constant; step:step_size=N,gamma=G (times G every N rounds); "
        "exponential:gamma=G (times G every round); cosine:warmup=W,min_lr=M (W rounds of linear "
        "warm-up from lr/W, then cosine decay towards M)",
        metavar="NAME[:KEY=VALUE,...]",
    )

    def __post_init__(self):
        check_choices(self, ClientSettings)
        model_factory(self.model)  # a built-in, or a user's factory that can be imported
        self.client_config()  # the task (a built-in or a user's that can be imported) and the hyperparameters
        parse_schedule(self.lr_schedule).check(self.lr)  # its values, and min_lr against lr (rounds: Config)

    def client_config(self) -> ClientConfig:
        """The hyperparameters every client trains with."""
        task = make_task(self.task, optimizer=self.optimizer)
        if self.keep_optimizer_state and not task.keep_optimizer_state:
            task = dataclasses.replace(task, keep_optimizer_state=True)
        return ClientConfig(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            task=task,
        )

    def round_config(self) -> RoundConfig | None:
        """Each round's client config by `lr_schedule` (None: the same every round)."""
        schedule = parse_schedule(self.lr_schedule)
        return None if isinstance(schedule, Constant) else schedule.round_config


__all__ = [
    "ClientConfig",
    "ClientPlan",
    "ClientSettings",
    "ClientUpdate",
    "LocalTerms",
    "OptimizerState",
    "OutOfTime",
    "State",
    "all_finite",
    "client_batches",
    "epoch_orders",
    "finish_update",
    "sgd",
    "train_client",
]
