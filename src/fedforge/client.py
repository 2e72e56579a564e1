"""One client's local training: global state + its data + hyperparameters -> ClientUpdate.

The types a client is given and returns live in `contract` (re-exported here), the optimizer
rules in `optim`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import fastmlp
from ._imports import is_reference, load_instance
from ._options import check_choices, option
from .algorithms import (
    CLIENT_ALGORITHMS,
    PERSONAL,
    SHARED,
    ClientAlgorithm,
    ClientState,
    RoleMap,
    Roles,
    check_loss_term,
    phase_seed,
)
from .contract import ClientConfig, ClientPlan, ClientUpdate
from .data.datasets import TensorData, Tree, call_model, gather
from .errors import ConfigError, DivergenceError
from .evaluation import evaluate
from .fastmlp import MLPLayout
from .models import MODELS, check_model_name
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
    """Copy `state` into `module`'s parameters and buffers (no reallocation), but for the entries
    that already are the module's own tensors (a frozen base the sequential engine's scratch
    shares with the model: copying it for every client would cost a copy of the base each)."""
    own = module.state_dict()
    if own.keys() != state.keys():
        module.load_state_dict(state, strict=True)  # says what is missing or unexpected
        return
    module.load_state_dict({k: v for k, v in state.items() if not _same_tensor(v, own[k])}, strict=False)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` are views of the same memory with the same layout."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


Step = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
Final = Callable[[], State]


def _autograd_steps(
    module: nn.Module,
    start: State,
    trained: Sequence[str],
    config: ClientConfig,
    terms: LocalTerms,
    loss_term: LossTerm | None,
    optimizer_state: OptimizerState | None,
) -> tuple[Step, Final, Callable[[], OptimizerState]]:
    """Steps through autograd with the task's loss (plus the algorithm's `loss_term`): works for
    any module. The parameters `trained` take the config's optimizer rule (`optim`, with `terms`),
    or else the task's torch.optim optimizer itself, the terms' gradient added before each step and
    their correction applied after it; the others stay as `start` has them."""
    task = config.task
    load_state(module, start)
    module.train()
    names = tuple(trained)
    parameters = dict(module.named_parameters())
    params = [parameters[n] for n in names]
    named: State = dict(zip(names, params, strict=True))
    rule = config.rule
    if rule is not None:
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
        offsets = [terms.offset.get(n) for n in names] if terms.offset is not None else None
        corrections = [terms.correction.get(n) for n in names] if terms.correction is not None else None

        def update(grads):
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                if terms.decay:
                    g.add_(p, alpha=terms.decay)
                if offsets is not None and offsets[i] is not None:
                    g.add_(offsets[i])
                p.grad = g
            optimizer.step()
            if corrections is not None:  # SCAFFOLD's, outside the optimizer's state
                for p, c in zip(params, corrections, strict=True):
                    if c is not None:
                        p.add_(c, alpha=-config.lr)

        def final_optimizer_state():
            return _torch_state(optimizer, names)

    def step(xb, yb):
        outputs = call_model(module, xb)
        loss = task.checked_loss(outputs, yb)
        if loss_term is not None:
            loss = loss + loss_term(named)
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
    start: State,
    config: ClientConfig,
    terms: LocalTerms,
    optimizer_state: OptimizerState | None,
) -> tuple[Step, Final, Callable[[], OptimizerState]]:
    """SGD steps by the hand-derived Linear/ReLU kernel (the same rule, no autograd graph)."""
    rule = config.rule
    assert rule is not None, "the tutorial's task trains with fedforge's SGD, a rule"
    params = {k: v.detach().clone() for k, v in start.items()}
    state = optimizer_state.clone() if optimizer_state is not None else rule.init(params)

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
    client_state: ClientState | None = None,
) -> ClientUpdate:
    """Train `module`, loaded with `global_state`, on `data` as `config` and `plan` say.

    `module` is scratch space: it may be overwritten. `global_state` is the model's full state
    (the server's shared entries; frozen and personal ones as the client's model has them before
    its first round). Batches follow `epoch_orders(generator)`; the last batch of an epoch may be
    smaller, as with a DataLoader. Linear/ReLU stacks training the tutorial's classification with
    SGD take the `fastmlp` kernel unless `fast_mlp` is False (it computes the same thing);
    anything else goes through autograd with `config.task`. `optimizer_state` is where the
    client's optimizer left off last round (None: fresh); the update carries the new one when the
    task keeps it (`Task.keep_optimizer_state`). The round runs `config.algorithm`'s phases from
    `client_state` (None: the client's first round), and the update carries the new state.

    Raises:
        DivergenceError: the training loss or the weights became NaN or infinite.
        OutOfTime: training passed `deadline` (a `time.monotonic()` value; None: none).
    """
    task, algorithm = config.task, config.algorithm
    roles = algorithm.roles.assign(module)
    received, client_state = start_of_round(roles, algorithm, global_state, client_state)
    initial_loss = evaluate(module, received, data, task=task).loss if plan.measure_initial_loss else None
    if task.train is not None:
        return _own_loop(
            module, received, roles, data, config, plan, client_id, generator, initial_loss, deadline, client_state
        )
    inputs = plan.inputs or {}
    own, copy = received, None
    sums: dict[str, torch.Tensor] = {}
    steps = units = 0
    kept_optimizer = None
    for index, phase in enumerate(algorithm.phases):
        trained = roles.trained(phase.trains)
        start = own if not phase.copy else {**received, **client_state.copy}
        terms = algorithm.terms(index, {n: received[n] for n in trained}, client_state.algorithm, inputs)
        loss_term = _loss_term(algorithm, index, received, trained, client_state, inputs)
        phase_plan = phase.plan(plan)
        phase_generator = (
            generator if index == 0 else torch.Generator().manual_seed(phase_seed(generator.initial_seed(), index))
        )
        carried = optimizer_state if index == 0 else None  # a kept optimizer state is the first phase's
        whole = loss_term is None and len(trained) == len(roles.parameters)  # fastmlp trains every parameter
        layout = fastmlp.mlp_layout(module) if fast_mlp and task.is_tutorial_classification and whole else None
        mlp_inputs = layout.inputs(data.x) if layout else None
        x: Tree
        if layout is not None and mlp_inputs is not None:
            x = mlp_inputs
            step, final_state, final_optimizer_state = _mlp_steps(layout, start, config, terms, carried)
        else:
            x = data.x
            step, final_state, final_optimizer_state = _autograd_steps(
                module, start, trained, config, terms, loss_term, carried
            )
        phase_sums: dict[str, torch.Tensor] = {}
        phase_steps = phase_units = 0
        for xb, yb in client_batches(x, data.y, config, phase_plan, phase_generator, deadline=deadline):
            for name, value in step(xb, yb).items():
                phase_sums[name] = phase_sums[name] + value if name in phase_sums else value
            phase_steps += 1
            phase_units += task.units(yb)
        result = final_state()
        if layout is None and index < len(algorithm.phases) - 1:  # the module's own tensors: the next phase reloads it
            result = {k: v.clone() for k, v in result.items()}
        if index == 0 and task.keep_optimizer_state:
            kept_optimizer = final_optimizer_state()
        if phase.copy:
            copy = {n: result[n] for n in roles.names(SHARED, PERSONAL)}
            loss = phase_sums.get("loss")
            if not all_finite(copy.values()) or (loss is not None and not torch.isfinite(loss).all()):
                raise DivergenceError(
                    f"client {client_id}'s personal copy diverged in phase {index} of {algorithm.name}; "
                    f"lower the learning rate (lr={config.lr})"
                )
        else:  # the model the client sends: its metrics are the round's
            own, sums, steps, units = result, _added(sums, phase_sums), steps + phase_steps, units + phase_units
    return _finished(
        client_id,
        algorithm,
        roles,
        global_state,
        received,
        own,
        copy,
        client_state,
        inputs,
        config,
        num_examples=len(data),
        num_steps=steps,
        metrics=task.summarize({k: v.item() for k, v in sums.items()}, units),
        initial_loss=initial_loss,
        optimizer_state=kept_optimizer,
    )


def _added(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The metric sums of `a` and `b` added by name (a name in one only as it is)."""
    return {k: a[k] + b[k] if k in a and k in b else (a[k] if k in a else b[k]) for k in {**a, **b}}


LossTerm = Callable[[State], torch.Tensor]


def _loss_term(
    algorithm: ClientAlgorithm, phase: int, received: State, trained: Sequence[str], client_state, inputs: State
) -> LossTerm | None:
    """The algorithm's loss term of `phase` as a function of the trained parameters (None: it has none)."""
    if not algorithm.has_loss_term:
        return None
    anchor = {n: received[n] for n in trained}

    def term(params: State) -> torch.Tensor:
        return check_loss_term(algorithm.loss_term(phase, params, anchor, client_state.algorithm, inputs), algorithm)

    return term


def start_of_round(
    roles: RoleMap, algorithm: ClientAlgorithm, global_state: State, client_state: ClientState | None
) -> tuple[State, ClientState]:
    """The model a client starts its round from (the global model with its own personal entries)
    and its state: on its first round (`client_state` None), its personal entries as the global
    state has them and its algorithm's initial state."""
    if client_state is None:
        shared = {n: global_state[n] for n in roles.shared}
        client_state = ClientState({n: global_state[n] for n in roles.personal}, algorithm.init_state(shared))
    return {**global_state, **client_state.personal}, client_state


def personal_model(whole: State, update: ClientUpdate) -> State:
    """A client's personal model after its round, from the whole model it received (`whole`) and its
    update: its personal copy (Ditto's), or else its model at the end of its training, the received
    one plus its update's delta with the personal entries it keeps. What personalized evaluation
    tests, in a simulation's round loop and on a deployment client alike."""
    kept = update.client_state
    if kept is not None and kept.copy:
        return {**whole, **kept.copy}
    personal = {**whole, **{k: whole[k] + d for k, d in update.delta.items()}}
    if kept is not None:
        personal.update(kept.personal)
    return personal


def _finished(
    client_id: int,
    algorithm: ClientAlgorithm,
    roles: RoleMap,
    global_state: State,
    received: State,
    own: State,
    copy: State | None,
    client_state: ClientState,
    inputs: State,
    config: ClientConfig,
    **fields,
) -> ClientUpdate:
    """The update of a client whose training ended with `own` (and its personal `copy`): the shared
    entries' delta, the algorithm's `finish` (new state, extras), and what the client keeps."""
    shared = roles.shared
    before = {n: received[n] for n in shared}
    after = {n: own[n] for n in shared}
    steps = torch.tensor(float(fields["num_steps"]), dtype=torch.float64)
    algorithm_state, extras = algorithm.finish(before, after, client_state.algorithm, inputs, steps, config.lr)
    # Copied: `own` and `copy` may be the module's tensors, which the next client overwrites, and a
    # hook may hand back the tensors it was given.
    extras = {k: v.clone() for k, v in extras.items()}
    kept = ClientState(
        {n: own[n].clone() for n in roles.personal},
        {k: v.clone() for k, v in algorithm_state.items()},
        {n: v.clone() for n, v in copy.items()} if copy is not None else client_state.copy,
    )
    return finish_update(
        client_id,
        {n: after[n] - global_state[n] for n in shared},
        config=config,
        extras=extras,
        client_state=kept if (kept.personal or kept.algorithm or kept.copy) else None,
        **fields,
    )


def _own_loop(
    module: nn.Module,
    received: State,
    roles: RoleMap,
    data: TensorData,
    config: ClientConfig,
    plan: ClientPlan,
    client_id: int,
    generator: torch.Generator,
    initial_loss: float | None,
    deadline: float | None,
    client_state: ClientState,
) -> ClientUpdate:
    """The task's own training function (the escape hatch) on the batches the client is given.

    Roles apply (personal entries start from the client's, only shared ones are sent); an
    algorithm with more than one phase or with terms of its loss cannot reach inside the loop."""
    task, algorithm = config.task, config.algorithm
    inputs = plan.inputs or {}
    terms = algorithm.terms(0, {n: received[n] for n in roles.parameters}, client_state.algorithm, inputs)
    if len(algorithm.phases) > 1 or algorithm.has_loss_term or terms != LocalTerms(0.0):
        raise ConfigError(
            f"task {task.name} trains with a loop of its own: algorithm {algorithm.name}'s phases or loss "
            "terms (FedProx's, SCAFFOLD's, ...) cannot reach inside it"
        )
    steps = 0

    def batches():
        nonlocal steps
        for batch in client_batches(data.x, data.y, config, plan, generator, deadline=deadline):
            steps += 1
            yield batch

    load_state(module, received)
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
    own = {name: value.detach() for name, value in module.state_dict().items()}
    return _finished(
        client_id,
        algorithm,
        roles,
        received,
        received,
        own,
        None,
        client_state,
        inputs,
        config,
        num_examples=len(data),
        num_steps=steps,
        metrics={k: float(v) for k, v in metrics.items()},
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
    extras: State | None = None,
    client_state: ClientState | None = None,
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
        extras=extras or {},
        client_state=client_state,
    )


@dataclass(frozen=True)
class ClientSettings:
    """A client's model, task and local training (TOML: flat keys or the table [client])."""

    model: str = option(
        "mlp",
        "model: a built-in, or package.module:factory, a function (input_shape, num_classes) "
        "-> torch.nn.Module of your own, or hf:PATH, a pretrained transformer (a folder written by "
        "save_pretrained, or a hub name) fine-tuned with LoRA adapters (--lora-rank)",
        MODELS,
        open_choices=True,
    )
    task: str = option(
        "classification",
        "what clients learn: classification (cross-entropy; accuracy), regression "
        "(MSE; mse, mae, r2), language-model (next-token cross-entropy; perplexity), causal-lm "
        "(a transformers causal LM's next-token loss over its labels; perplexity), "
        "sequence-classification (a transformers classifier's logits; accuracy), or "
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
    algorithm: str = option(
        "fedavg",
        "what each client does beyond plain local training: fedavg (nothing more); ditto (trains a "
        "personal copy too); fedper (the last layer stays on each client); fedrep (fedper, head then "
        "body); fedbn (BatchNorm layers stay on each client); or package.module:object, a "
        "fedforge.algorithms.ClientAlgorithm of your own (a class or a function returning one). FedProx, "
        "SCAFFOLD and FedDyn come with their --strategy",
        CLIENT_ALGORITHMS,
        open_choices=True,
    )
    ditto_lambda: float = option(0.1, "ditto: the personal model's proximal term lambda")
    ditto_epochs: int | None = option(None, "ditto: local epochs of the personal model (default: local_epochs)")
    fedrep_head_epochs: int = option(10, "fedrep: local epochs of the head before the body's")
    personal: tuple[str, ...] = option(
        (),
        "entries of the model that stay on each client, trained but never sent (fnmatch patterns over the "
        "state dict's names, e.g. 'fc3.*'; repeatable)",
        metavar="PATTERN",
    )
    frozen: tuple[str, ...] = option(
        (),
        "entries of the model that are neither trained nor sent (patterns as --personal; a parameter "
        "with requires_grad=False is frozen anyway)",
        metavar="PATTERN",
    )

    def __post_init__(self):
        check_choices(self, ClientSettings)
        self.client_algorithm()  # its options in range
        check_model_name(self.model)  # a built-in, a user's factory that can be imported, or hf:PATH
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
            algorithm=self.client_algorithm(),
        )

    def client_algorithm(self) -> ClientAlgorithm:
        """The client algorithm `algorithm` names, with its options and the roles given."""
        by_name: dict[str, dict[str, Any]] = {
            "ditto": {"lam": self.ditto_lambda, "epochs": self.ditto_epochs},
            "fedrep": {"head_epochs": self.fedrep_head_epochs},
        }
        if is_reference(self.algorithm):
            algorithm = load_instance(self.algorithm, "algorithm", ClientAlgorithm)
        elif self.algorithm in CLIENT_ALGORITHMS:
            algorithm = CLIENT_ALGORITHMS[self.algorithm](**by_name.get(self.algorithm, {}))
        else:
            names = ", ".join(CLIENT_ALGORITHMS)
            raise ConfigError(f"unknown algorithm {self.algorithm!r} (choose from: {names}, or package.module:object)")
        if self.personal or self.frozen:
            algorithm = algorithm.with_roles(
                Roles(personal=self.personal or algorithm.roles.personal, frozen=self.frozen)
            )
        return algorithm

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
    "personal_model",
    "sgd",
    "train_client",
]
