"""Convolutional networks for many clients at once: every client's channels side by side.

`stacked_net(model)` compiles an `nn.Sequential` of convolutions, BatchNorm, pooling,
elementwise activations, Flatten and Linear layers (and fedforge's residual `BasicBlock`) into
the forward pass of C clients whose parameters and buffers are stacked along a leading client
dimension. A batch of C clients' images travels as one tensor (B, C x channels, H, W) in
channels-last memory (for C > 1), so that

- every convolution is one grouped convolution (C x the layer's groups): client c's output
  channels see only its own input channels and its own weights;
- every BatchNorm is one `batch_norm` over C x channels: each client's batch statistics and
  running statistics are its own, updated in place in the stacked buffers as the sequential
  engine's module updates its own;
- pooling and activations are one call each (they act channel by channel);
- after Flatten the clients' rows travel as (C, B, features) through batched matrix products.

Autograd computes the backward pass. A ReLU followed by a max-pooling is computed as the pooling
followed by the ReLU: the same values and the same gradients (the ReLU is monotone, and where a
window's maximum is positive it picks the same element), on a quarter of the elements.

On a 2-core CPU, channels-last grouped convolutions of 10 clients at once took 0.6x the time
of the 10 clients' convolutions one after another (`benchmarks/convnets.py` measures the
whole round). Anything else (a layer it does not know, a subclass with its own forward,
Dropout's randomness) makes `stacked_net` return None and the engine use another kernel.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models import BasicBlock


@dataclass(frozen=True)
class Pass:
    """What every op of one forward pass needs to know: how many clients are stacked, and
    whether they train (BatchNorm: batch statistics, running statistics updated) or evaluate."""

    clients: int
    training: bool


# An operation: (activations, the clients' stacked parameters and buffers, the pass) -> activations.
# Images are (B, C x channels, H, W); after Flatten, rows are (C, B, features).
Op = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Pass], torch.Tensor]

# Parameter-free layers that act on each element alone: applied to the stacked activations as they are.
_ELEMENTWISE = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
)
# Pooling acts on each channel alone: on C x channels as on channels.
_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_KNOWN = (nn.Conv2d, nn.BatchNorm2d, nn.Flatten, nn.Linear, nn.Sequential, BasicBlock, *_POOLING, *_ELEMENTWISE)

# One model's evaluation as stacked copies of it: on a 2-core CPU, 8 copies of 32 images each
# took a quarter of the time of NIID-Bench's CNN (`simple-cnn`) on batches of 1,024 (its first
# layers have 1 and 6 channels, too few for the convolution and pooling kernels to vectorize).
EVAL_COPIES = 8
EVAL_BATCH = 256


class _Unknown(Exception):
    """A layer this module cannot stack."""


class StackedNet:
    """The forward pass of C clients at once (see the module's docstring)."""

    def __init__(self, ops: list[Op], image_input: bool):
        self.ops = ops
        self.image_input = image_input

    def __call__(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, *, training: bool = True) -> torch.Tensor:
        """The outputs (C, B, ...) of C clients, each with its own entries of `params` (stacked:
        (C, ...) each, buffers included) on its own batch, x (C, B, ...). Training updates the
        running statistics in place (they must then be contiguous); evaluation uses them, as
        `nn.Module.eval()` does."""
        C, B = x.shape[:2]
        step = Pass(C, training)
        if self.image_input:  # (C, B, channels, H, W) -> (B, C x channels, H, W)
            h = x.transpose(0, 1).reshape(B, C * x.shape[2], *x.shape[3:])
            # Channels last: grouped convolutions 2-3x faster; one client's as fast or faster without.
            h = h.contiguous(memory_format=torch.channels_last) if C > 1 else h
        else:
            h = x
        for op in self.ops:
            h = op(h, params, step)
        return h

    def evaluate(self, state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """One model's outputs on x (N, ...) in evaluation mode, computed as EVAL_COPIES stacked
        copies of it, each on its share of the rows (one copy when N is not a multiple)."""
        copies = EVAL_COPIES if len(x) % EVAL_COPIES == 0 else 1
        params = {k: v.expand(copies, *v.shape) for k, v in state.items()}
        return self(params, x.view(copies, len(x) // copies, *x.shape[1:]), training=False).flatten(0, 1)


def convolutional(model: nn.Module) -> bool:
    """Whether `model` has a convolution or a BatchNorm: what this module is for (the engine's
    kernel and the evaluation take it only for such models)."""
    return any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules())


def stacked_net(model: nn.Module) -> StackedNet | None:
    """`model` compiled for stacked clients, or None if it has a layer this module cannot stack.

    Only exact types are taken (a subclass may have a forward of its own), and no module with
    hooks (the ops do not call the modules' forward). The net takes images when its first layer
    is a convolution, BatchNorm, pooling or block, rows (C, B, ...) when it is a Flatten or a
    Linear layer, and must end in rows: its outputs are (C, B, features).
    """
    if not (isinstance(model, nn.Sequential) and type(model) is nn.Sequential) or _hooked(model) or _tied(model):
        return None
    first: nn.Module | None = model
    while isinstance(first, nn.Sequential) and type(first) is nn.Sequential:
        first = next(iter(first._modules.values()), None)
    if first is None:
        return None
    image = type(first) in (nn.Conv2d, nn.BatchNorm2d, BasicBlock, *_POOLING)
    if not image and type(first) not in (nn.Flatten, nn.Linear):
        return None
    try:
        ops, image_out = _sequence(model, "", image=image)
    except _Unknown:
        return None
    return None if image_out else StackedNet(ops, image_input=image)


def _hooked(model: nn.Module) -> bool:
    """Whether a hook would change what `model`'s forward computes (its modules' or global ones)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _tied(model: nn.Module) -> bool:
    """Whether a parameter or buffer is held twice (a module used twice): the state then names
    one tensor twice, and the stacked clients would hold two copies of it."""
    named = sum(1 for _ in model.named_parameters()) + sum(1 for _ in model.named_buffers())
    held = sum(1 for _ in model.named_parameters(remove_duplicate=False))
    return named != held + sum(1 for _ in model.named_buffers(remove_duplicate=False))


def _sequence(model: nn.Sequential, prefix: str, *, image: bool) -> tuple[list[Op], bool]:
    """The ops of a Sequential's children (as its forward runs them: a module held twice runs
    twice), and whether its output is images (else rows)."""
    children = [(name, child) for name, child in model._modules.items() if child is not None]
    ops: list[Op] = []
    i = 0
    while i < len(children):
        name, child = children[i]
        following = children[i + 1][1] if i + 1 < len(children) else None
        if type(child) is nn.ReLU and type(following) is nn.MaxPool2d and image:
            ops += [_module_op(following), _relu]  # the same, on a quarter of the elements
            i += 2
            continue
        op, image = _layer(child, f"{prefix}{name}.", image)
        ops.append(op)
        i += 1
    return ops, image


def _layer(child: nn.Module, prefix: str, image: bool) -> tuple[Op, bool]:
    """One child's op, and whether its output is images."""
    kind = type(child)
    if kind not in _KNOWN:  # exact types: past here, isinstance is type() is
        raise _Unknown(kind.__name__)
    if isinstance(child, _ELEMENTWISE):
        return _module_op(child), image
    if isinstance(child, nn.Flatten) and (child.start_dim, child.end_dim) == (1, -1):
        return (_flatten if image else _flatten_rows), False
    if isinstance(child, nn.Linear) and not image:
        return _linear(prefix), False
    if isinstance(child, nn.Sequential):
        ops, out_image = _sequence(child, prefix, image=image)
        return _chain(ops), out_image
    if not image:
        raise _Unknown(f"{kind.__name__} after Flatten")
    if isinstance(child, nn.Conv2d):
        return _conv(child, prefix), True
    if isinstance(child, nn.BatchNorm2d):
        return _batch_norm(child, prefix), True
    if isinstance(child, BasicBlock):
        return _block(child, prefix), True
    if isinstance(child, _POOLING):
        return _module_op(child), True
    raise _Unknown(kind.__name__)


def _relu(h: torch.Tensor, params: Mapping[str, torch.Tensor], step: Pass) -> torch.Tensor:
    return torch.relu(h)


def _module_op(module: nn.Module) -> Op:
    """A parameter-free module applied as it is, out of place (an in-place one could overwrite
    what an earlier op's backward needs, e.g. the output of a ReLU moved after a pooling)."""
    if getattr(module, "inplace", False):
        module = copy.copy(module)
        setattr(module, "inplace", False)  # noqa: B010 (nn.Module's typing refuses the plain assignment)
    return lambda h, params, step: module(h)


def _chain(ops: list[Op]) -> Op:
    def op(h, params, step):
        for each in ops:
            h = each(h, params, step)
        return h

    return op


def _conv(conv: nn.Conv2d, prefix: str) -> Op:
    if conv.padding_mode != "zeros":
        raise _Unknown(f"Conv2d with padding_mode={conv.padding_mode}")
    weight, bias = f"{prefix}weight", f"{prefix}bias" if conv.bias is not None else None
    stride, padding, dilation, groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def op(h, params, step):
        w = params[weight]
        b = params[bias].reshape(-1) if bias else None
        return F.conv2d(h, w.reshape(-1, *w.shape[2:]), b, stride, padding, dilation, step.clients * groups)

    return op


def _batch_norm(bn: nn.BatchNorm2d, prefix: str) -> Op:
    """nn.BatchNorm2d.forward on C x channels (see its source)."""
    affine, tracked, momentum, eps = bn.affine, bn.track_running_stats, bn.momentum, bn.eps

    def op(h, params, step):
        factor = 0.0 if momentum is None else momentum
        mean = var = None
        if tracked:
            if step.training:
                count = params[f"{prefix}num_batches_tracked"]
                count.add_(1)
                if momentum is None:  # a cumulative average: every stacked client has taken as many steps
                    factor = 1.0 / float(count[0])
            flat = (lambda t: t.view(-1)) if step.training else (lambda t: t.reshape(-1))  # view: updated in place
            mean, var = flat(params[f"{prefix}running_mean"]), flat(params[f"{prefix}running_var"])
        weight = params[f"{prefix}weight"].reshape(-1) if affine else None
        bias = params[f"{prefix}bias"].reshape(-1) if affine else None
        return F.batch_norm(h, mean, var, weight, bias, step.training or not tracked, factor, eps)

    return op


def _flatten(h: torch.Tensor, params: Mapping[str, torch.Tensor], step: Pass) -> torch.Tensor:
    """(B, C x channels, H, W) -> (C, B, channels x H x W), each client's rows in nn.Flatten's order."""
    return h.reshape(h.shape[0], step.clients, -1).transpose(0, 1)


def _flatten_rows(h: torch.Tensor, params: Mapping[str, torch.Tensor], step: Pass) -> torch.Tensor:
    return h.reshape(h.shape[0], h.shape[1], -1)


def _linear(prefix: str) -> Op:
    """(C, B, in) -> (C, B, out), computed as W h^T so that W's gradient, g^T h, is contiguous (the
    optimizer's elementwise update on a transposed gradient is several times slower); a single
    client as one matrix product (MKL's batched product of one is slower)."""
    weight, bias = f"{prefix}weight", f"{prefix}bias"

    def op(h, params, step):
        w, b = params[weight], params.get(bias)
        if step.clients == 1:
            return F.linear(h.squeeze(0), w.squeeze(0), b.squeeze(0) if b is not None else None).unsqueeze(0)
        if b is not None:
            return torch.baddbmm(b.unsqueeze(2), w, h.transpose(1, 2)).transpose(1, 2)
        return torch.bmm(w, h.transpose(1, 2)).transpose(1, 2)

    return op


def _block(block: BasicBlock, prefix: str) -> Op:
    conv1, bn1 = _conv(block.conv1, f"{prefix}conv1."), _batch_norm(block.bn1, f"{prefix}bn1.")
    conv2, bn2 = _conv(block.conv2, f"{prefix}conv2."), _batch_norm(block.bn2, f"{prefix}bn2.")
    shortcut, _ = _layer(block.shortcut, f"{prefix}shortcut.", True)

    def op(h, params, step):
        out = torch.relu(bn1(conv1(h, params, step), params, step))
        return torch.relu(bn2(conv2(out, params, step), params, step) + shortcut(h, params, step))

    return op
