"""Linear/ReLU stacks trained with hand-derived gradients, for one client or many at once.

The built-in `mlp`, `2nn` and `logreg` are such stacks. For them an SGD step is a handful of
matrix products with no autograd graph, each weight updated in place by one fused
`addmm_`/`baddbmm_`: about half the time of autograd + optimizer at the tutorial's batch size
of 32. The same step trains C clients together when every tensor has a leading client
dimension. The update is fedforge's SGD rule itself (`optim.sgd_step`), handed the gradient as
its factors (`Gradient`); the result equals `torch.optim.SGD` on the same batches up to float32
round-off (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .optim import LocalTerms, Rule
from .optim import sgd_step as sgd_rule


@dataclass(frozen=True)
class MLPLayout:
    """Where a Sequential's Linear layers keep their weights, and which are followed by ReLU."""

    weights: tuple[str, ...]
    biases: tuple[str | None, ...]
    relu: tuple[bool, ...]  # relu[i]: a ReLU follows layer i
    flatten: bool  # a leading nn.Flatten: inputs are flattened first

    def inputs(self, x: object) -> torch.Tensor | None:
        """`x` as the first Linear layer takes it (2-D), or None if this layout cannot take it."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        if self.flatten:
            return x.flatten(1)
        return x if x.dim() == 2 else None


def mlp_layout(module: nn.Module) -> MLPLayout | None:
    """The layout of `module` if it is [Flatten] (Linear [ReLU])* with no buffers, else None."""
    if type(module) is not nn.Sequential or any(True for _ in module.buffers()):
        return None
    children = list(module.named_children())
    flatten = bool(children) and type(children[0][1]) is nn.Flatten
    if flatten:
        if (children[0][1].start_dim, children[0][1].end_dim) != (1, -1):
            return None
        children = children[1:]
    weights, biases, relu = [], [], []
    for name, child in children:
        if type(child) is nn.Linear:
            weights.append(f"{name}.weight")
            biases.append(f"{name}.bias" if child.bias is not None else None)
            relu.append(False)
        elif type(child) is nn.ReLU and weights and not relu[-1]:
            relu[-1] = True
        else:
            return None
    if not weights or relu[-1]:
        return None
    return MLPLayout(tuple(weights), tuple(biases), tuple(relu), flatten)


def _affine(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if weight.dim() == 2 and h.dim() == 3:  # clients' batches through one shared weight: one GEMM
        return torch.nn.functional.linear(h, weight, bias)
    if h.dim() == 2:
        return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
    if bias is not None:
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
    return torch.bmm(h, weight.transpose(1, 2))


@dataclass(frozen=True)
class _WeightGrad:
    """A weight's gradient g^T inp (per client), kept as its two factors (an `optim.Gradient`)."""

    g: torch.Tensor
    inp: torch.Tensor

    def add_to(self, out: torch.Tensor, beta: float, alpha: float) -> None:
        """out <- beta * out + alpha * grad, in one BLAS call."""
        if self.g.dim() == 2:
            out.addmm_(self.g.t(), self.inp, beta=beta, alpha=alpha)
        else:
            out.baddbmm_(self.g.transpose(1, 2), self.inp, beta=beta, alpha=alpha)

    def added(self, base: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
        """beta * base + alpha * grad as a new tensor (stacked over the clients: base broadcasts)."""
        if self.g.dim() == 2:
            return torch.addmm(base, self.g.t(), self.inp, beta=beta, alpha=alpha)
        return torch.baddbmm(base, self.g.transpose(1, 2), self.inp, beta=beta, alpha=alpha)


@dataclass(frozen=True)
class _BiasGrad:
    """A bias's gradient: g summed over the batch."""

    g: torch.Tensor

    def add_to(self, out: torch.Tensor, beta: float, alpha: float) -> None:
        (out.mul_(beta) if beta != 1 else out).add_(self.g.sum(-2), alpha=alpha)

    def added(self, base: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
        return torch.add(base * beta if beta != 1 else base, self.g.sum(-2), alpha=alpha)


def sgd_step(
    layout: MLPLayout,
    params: dict[str, torch.Tensor],
    momentum_buffers: dict[str, torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    weight: float | torch.Tensor,
    *,
    rule: Rule,
    terms: LocalTerms = LocalTerms(0.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of fedforge's SGD `rule` (lr, momentum, weight decay) on the weighted cross-entropy,
    updating `params` in place.

    `terms` adds FedProx's proximal gradient and SCAFFOLD's correction, as `optim.LocalTerms`
    defines them.

    Shapes: one client is x (B, features), y (B,), params as in the model; C clients add a
    leading C to every tensor (x (C, B, features), weight (C, B), params and the terms' tensors).
    C clients may also start from one shared set of params (as in the model, no leading C:
    the first step of a round). Their forward pass is then one matrix product per layer, and
    the step replaces each entry of `params` (and of `momentum_buffers`, which then starts
    empty) with a new stacked tensor instead of writing in place: the stacking copy is the
    step's own output.

    Args:
        momentum_buffers: zeros like `params` on the first step (needed when momentum > 0),
            or an empty dict with shared params; updated in place.
        weight: each example's weight in its client's loss: 1 / batch size, or a tensor that
            is 1 / (client's batch size) for real examples and 0 for padding.

    Returns:
        Per client (a scalar for one client): the summed loss and the number of correct
        predictions over examples of non-zero weight, before the step.
    """
    shared = x.dim() == 3 and params[layout.weights[0]].dim() == 2
    inputs = [x]
    h = x
    for w, b, relu in zip(layout.weights, layout.biases, layout.relu, strict=True):
        h = _affine(h, params[w], params[b] if b else None)
        if relu:
            h = h.relu_()
        inputs.append(h)
    logp = torch.log_softmax(h, dim=-1)
    picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    hits = h.argmax(-1) == y
    if isinstance(weight, torch.Tensor):
        valid = weight > 0
        loss_sum, correct = -(picked * valid).sum(-1), (hits & valid).sum(-1)
        weight = weight.unsqueeze(-1)
    else:
        loss_sum, correct = -picked.sum(-1), hits.sum(-1)
    decay = rule.decay(terms)
    # d(sum weight * cross-entropy) / d logits = weight * (softmax - onehot)
    g = logp.exp_()
    g.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(g[..., :1], -1.0))
    g.mul_(weight)
    for i in range(len(layout.weights) - 1, -1, -1):
        w_name, b_name = layout.weights[i], layout.biases[i]
        inp = inputs[i]
        g_below = None
        if i > 0:  # needs the weight before its update
            g_below = g @ params[w_name]
            if layout.relu[i - 1]:  # zero where the ReLU was off, in one op
                g_below = torch.ops.aten.threshold_backward(g_below, inp, 0)
        _update(params, momentum_buffers, rule, decay, terms, w_name, _WeightGrad(g, inp), shared)
        if b_name:
            _update(params, momentum_buffers, rule, decay, terms, b_name, _BiasGrad(g), shared)
        if g_below is not None:
            g = g_below
    return loss_sum, correct


def _update(params, momentum_buffers, rule, decay, terms, name, grad, shared) -> None:
    """Apply fedforge's SGD rule to one parameter; `grad` is a _WeightGrad or _BiasGrad. From shared
    params (`shared`) the rule writes new stacked tensors, and the momentum buffer starts there."""
    p, buf = sgd_rule(
        params[name],
        grad,
        None if shared or not rule.momentum else momentum_buffers[name],
        lr=rule.lr,
        momentum=rule.momentum,
        decay=decay,
        offset=terms.offset.get(name) if terms.offset else None,
        correction=terms.correction.get(name) if terms.correction else None,
        in_place=not shared,
    )
    params[name] = p
    if rule.momentum:
        momentum_buffers[name] = buf
