"""The clients' optimizer rules, written once, as functions over explicit state.

Every engine updates parameters through these rules: the sequential engine on one client's
tensors, the vectorized engine on tensors stacked along a leading client dimension, and
`fastmlp`'s fused kernels, which hand SGD a gradient they never materialize (`Gradient`).
Every rule is elementwise; the per-client numbers of a step (Adam's bias corrections, from each
client's own step count) broadcast along the client dimension, so the same code serves both.

    sgd    fedforge's SGD: `torch.optim.SGD` without dampening or Nesterov.
    adam   `torch.optim.Adam`'s default algorithm (no amsgrad, no maximize).
    adamw  `torch.optim.AdamW`'s likewise (decoupled weight decay).

Each adds the strategy's LocalTerms (FedProx's proximal gradient, SCAFFOLD's correction).
What a rule keeps between steps is an `OptimizerState` value: fresh each round, or carried per
client from round to round when the task asks (`Task.keep_optimizer_state`). Any other
`torch.optim` optimizer, or an option these rules do not have, runs as torch.optim itself
(`rule_for` says None), on the sequential engine.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalTerms:
    """What a client's plan adds to the plain loss gradient g of a parameter p, beyond its optimizer.

    The rule's gradient is g + (weight_decay + decay) * p + offset, where weight_decay is the
    rule's own when it is part of the gradient (SGD's, Adam's; not AdamW's, which is decoupled);
    after the rule's step, p <- p - lr * correction. decay = mu and offset = -mu * w_global make
    FedProx's proximal gradient mu (p - w_global) (Li et al. 2020). correction is SCAFFOLD's
    c - c_i (Karimireddy et al. 2020), applied outside the optimizer's state: fed through a
    momentum buffer it would be scaled by up to 1 / (1 - momentum) twice. offset/correction are
    None when zero, and a parameter missing from them has none. A client algorithm
    (`fedforge.algorithms`) says what they are.
    """

    decay: float
    offset: State | None = None
    correction: State | None = None


@dataclass(frozen=True)
class OptimizerState:
    """What a client's optimizer carries from one step to the next.

    `step` counts the steps taken (float64; shape (C,) when C clients are stacked); `slots` holds
    a tensor per parameter under torch.optim's state names: `momentum_buffer` (SGD with momentum),
    `exp_avg` and `exp_avg_sq` (Adam, AdamW), or a torch.optim optimizer's own.
    """

    step: torch.Tensor
    slots: Mapping[str, State] = field(default_factory=dict)

    def view(self, pick) -> OptimizerState:
        """`pick` applied to every tensor: e.g. the active clients' slice, whose views the next step
        updates in place."""
        return OptimizerState(pick(self.step), {s: {k: pick(v) for k, v in t.items()} for s, t in self.slots.items()})

    def clone(self) -> OptimizerState:
        return self.view(torch.clone)

    def client(self, position: int) -> OptimizerState:
        """One client's state, copied out of a stacked one (so that the stack can be freed)."""
        return self.view(lambda t: t[position].clone())


class Gradient(Protocol):
    """A parameter's gradient g, as SGD consumes it (fastmlp keeps a weight's g as two factors)."""

    def add_to(self, out: torch.Tensor, beta: float, alpha: float) -> None:
        """out <- beta * out + alpha * g, in place."""

    def added(self, base: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
        """beta * base + alpha * g as a new tensor (base may broadcast, e.g. shared by the clients)."""


@dataclass(frozen=True)
class Dense:
    """A gradient held as a tensor (autograd's, torch.func's)."""

    g: torch.Tensor

    def add_to(self, out: torch.Tensor, beta: float, alpha: float) -> None:
        (out.mul_(beta) if beta != 1 else out).add_(self.g, alpha=alpha)

    def added(self, base: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
        return torch.add(base * beta if beta != 1 else base, self.g, alpha=alpha)


def sgd_step(
    p: torch.Tensor,
    grad: Gradient,
    buf: torch.Tensor | None,
    *,
    lr: float,
    momentum: float = 0.0,
    decay: float = 0.0,
    offset: torch.Tensor | None = None,
    correction: torch.Tensor | None = None,
    in_place: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fedforge's SGD rule for one parameter: `torch.optim.SGD` (no dampening, no Nesterov) with LocalTerms.

        buf <- momentum * buf + g + decay * p + offset;  p <- p - lr * buf - lr * correction

    and without momentum p <- (1 - lr * decay) p - lr * g - lr * offset - lr * correction, the
    first two in one fused update (one BLAS call for fastmlp's factored gradients).

    Args:
        buf: the momentum buffer, updated in place; None starts one (torch.optim.SGD's first
            step: buf = g + decay * p + offset), as does a zero buffer.
        in_place: False when `p` is shared by the clients whose `grad` is stacked (fastmlp's
            first step from the global model): p and a new buffer are written to new tensors.

    Returns:
        The parameter and the momentum buffer after the step (None without momentum); the same
        tensors as given when updated in place.
    """
    if momentum:
        if buf is None:
            base = p if decay else torch.zeros((), dtype=p.dtype, device=p.device)
            buf = grad.added(base, decay, 1.0)
        else:
            grad.add_to(buf, momentum, 1.0)
            if decay:
                buf.add_(p, alpha=decay)
        if offset is not None:
            buf.add_(offset)
        p = p.add_(buf, alpha=-lr) if in_place else torch.add(p, buf, alpha=-lr)
    else:
        if in_place:
            grad.add_to(p, 1.0 - lr * decay, -lr)
        else:
            p = grad.added(p, 1.0 - lr * decay, -lr)
        if offset is not None:
            p.add_(offset, alpha=-lr)
    if correction is not None:
        p.add_(correction, alpha=-lr)
    return p, buf


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
    """`sgd_step` on lists of parameters, in place, as torch.optim's functional `sgd` takes them.

    Returns the momentum buffers to pass to the next step (None without momentum).
    """
    buffers: list[torch.Tensor] = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        _, buf = sgd_step(
            p,
            Dense(g),
            momentum_buffers[i] if momentum_buffers is not None else None,
            lr=lr,
            momentum=momentum,
            decay=weight_decay,
            offset=offsets[i] if offsets is not None else None,
            correction=corrections[i] if corrections is not None else None,
        )
        if buf is not None:  # None without momentum
            buffers.append(buf)
    return buffers if momentum else None


def _per_client(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-client numbers (shape (C,), or () for one client) shaped to broadcast against `like`."""
    return t if t.dim() == 0 else t.view(-1, *[1] * (like.dim() - 1))


def bias_corrections(step: torch.Tensor, *, lr: float, betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's per-step numbers for step t (float64, a scalar or one per client): lr / (1 - beta1^t)
    and sqrt(1 - beta2^t), in float64 as torch.optim computes them in Python floats."""
    return lr / (1 - betas[0] ** step), (1 - betas[1] ** step).sqrt()


def adam_step(
    p: torch.Tensor,
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    corrections: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decoupled_decay: float = 0.0,
    decay: float = 0.0,
    offset: torch.Tensor | None = None,
    correction: torch.Tensor | None = None,
) -> None:
    """The Adam rule for one parameter, in place: `torch.optim.Adam`'s single-tensor algorithm
    (Kingma & Ba 2015), AdamW's with `decoupled_decay` (Loshchilov & Hutter 2019), with LocalTerms.

        g <- g + decay * p + offset;  p <- (1 - lr * decoupled_decay) p
        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps) - lr * correction

    Args:
        corrections: `bias_corrections` of step t (counting from 1): scalars, or one per client
            (shape (C,)) when `p` stacks C clients.
    """
    beta1, beta2 = betas
    if decay:
        g = g.add(p, alpha=decay)
    if offset is not None:
        g = g.add(offset)
    if decoupled_decay:
        p.mul_(1 - lr * decoupled_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # Then in the parameter's dtype, as torch.optim's Python floats become when they meet a tensor.
    step_size, correction2_sqrt = (_per_client(c, p).to(p.dtype) for c in corrections)
    denom = (exp_avg_sq.sqrt() / correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg * -step_size, denom)
    if correction is not None:
        p.add_(correction, alpha=-lr)


RULES = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class Rule:
    """A client optimizer fedforge applies itself: which rule (RULES) and its hyperparameters."""

    name: str
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.name not in RULES:
            raise ValueError(f"unknown rule {self.name!r} (choose from: {', '.join(RULES)})")

    @property
    def slots(self) -> tuple[str, ...]:
        """The names of the tensors it keeps per parameter."""
        if self.name == "sgd":
            return ("momentum_buffer",) if self.momentum else ()
        return ("exp_avg", "exp_avg_sq")

    @property
    def gradient_decay(self) -> float:
        """The weight decay that is part of the gradient (all but AdamW's)."""
        return 0.0 if self.name == "adamw" else self.weight_decay

    def decay(self, terms: LocalTerms) -> float:
        """The coefficient of p in the gradient: the rule's weight decay there, plus the plan's."""
        return self.gradient_decay + terms.decay

    def init(self, params: State, clients: int | None = None) -> OptimizerState:
        """A fresh state for `params` (zero buffers: the same first step as torch.optim's lazy start);
        with `clients`, one per client, stacked, for `params` that are not."""
        some = next(iter(params.values()))
        shape = () if clients is None else (clients,)
        slots = {
            s: {k: torch.zeros(*shape, *v.shape, dtype=v.dtype, device=v.device) for k, v in params.items()}
            for s in self.slots
        }
        return OptimizerState(torch.zeros(shape, dtype=torch.float64, device=some.device), slots)

    def stacked(self, states: Sequence[OptimizerState | None], params: State) -> OptimizerState:
        """The states of C clients (None: fresh) stacked along a leading client dimension."""
        if all(s is None for s in states):
            return self.init(params, len(states))
        fresh = self.init(params)
        filled = [s or fresh for s in states]
        return OptimizerState(
            torch.stack([s.step for s in filled]),
            {slot: {k: torch.stack([s.slots[slot][k] for s in filled]) for k in params} for slot in self.slots},
        )

    def step(self, params: State, grads: State, state: OptimizerState, terms: LocalTerms) -> None:
        """One step of every parameter in `params`, in place (stacked clients or one alike)."""
        state.step.add_(1)
        decay = self.decay(terms)
        corrections = bias_corrections(state.step, lr=self.lr, betas=self.betas) if self.name != "sgd" else None
        for name, p in params.items():
            offset = terms.offset.get(name) if terms.offset is not None else None
            correction = terms.correction.get(name) if terms.correction is not None else None
            if self.name == "sgd":
                buf = state.slots["momentum_buffer"][name] if self.momentum else None
                sgd_step(
                    p,
                    Dense(grads[name]),
                    buf,
                    lr=self.lr,
                    momentum=self.momentum,
                    decay=decay,
                    offset=offset,
                    correction=correction,
                )
            else:
                assert corrections is not None, "computed above for every rule but sgd"
                adam_step(
                    p,
                    grads[name],
                    state.slots["exp_avg"][name],
                    state.slots["exp_avg_sq"][name],
                    corrections,
                    lr=self.lr,
                    betas=self.betas,
                    eps=self.eps,
                    decoupled_decay=self.weight_decay if self.name == "adamw" else 0.0,
                    decay=decay,
                    offset=offset,
                    correction=correction,
                )


@functools.cache
def _defaults(optimizer: type) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(optimizer).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def rule_for(
    optimizer: type[torch.optim.Optimizer] | None,
    options: Mapping[str, Any],
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> Rule | None:
    """The rule that computes what `optimizer(params, lr=lr, weight_decay=weight_decay, **options)`
    computes (None: fedforge's SGD with `momentum`), or None when no rule here does."""
    if optimizer is None:
        return Rule("sgd", lr=lr, momentum=momentum, weight_decay=weight_decay)
    name = {torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}.get(optimizer)
    if name is None:
        return None
    # A class is hashable (by identity); mypy checks Optimizer's __hash__ as if called on the class.
    defaults = _defaults(optimizer)  # type: ignore[arg-type]
    settings = {**defaults, "lr": lr, "weight_decay": weight_decay, **options}
    # Implementation choices that change the arithmetic, or options no rule here has, go to torch.optim.
    if (
        set(options) - {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"}
        or settings["amsgrad"]
        or settings["maximize"]
    ):
        return None
    betas = settings["betas"]
    numbers_ = [settings["lr"], settings["eps"], settings["weight_decay"], *betas]
    if len(betas) != 2 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in numbers_):
        return None  # e.g. a tensor learning rate
    return Rule(
        name,
        lr=float(settings["lr"]),
        weight_decay=float(settings["weight_decay"]),
        betas=(float(betas[0]), float(betas[1])),
        eps=float(settings["eps"]),
    )


__all__ = [
    "RULES",
    "Dense",
    "Gradient",
    "LocalTerms",
    "OptimizerState",
    "Rule",
    "adam_step",
    "bias_corrections",
    "rule_for",
    "sgd",
    "sgd_step",
]
