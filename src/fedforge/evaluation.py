"""A task's loss and metrics for a model state, on data held in memory."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from . import fastconv
from .data.datasets import TensorData, model_args
from .tasks import CLASSIFICATION, Task


@dataclass(frozen=True)
class Evaluation:
    """`metrics` holds the task's metrics by name, `loss` among them; `accuracy` is the
    classification task's (None for other tasks)."""

    loss: float
    accuracy: float | None
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    data: TensorData,
    *,
    batch_size: int = 1024,
    task: Task = CLASSIFICATION,
) -> Evaluation:
    """`task`'s mean loss and metrics of `module` with `state` over all of `data`."""
    if len(data) == 0:
        return Evaluation(float("nan"), float("nan"), 0)
    was_training = module.training
    module.eval()
    sums: dict[str, torch.Tensor] = {}
    units = 0
    stacked = _stacked(module, data)
    if stacked is not None:
        batch_size = min(batch_size, fastconv.EVAL_BATCH)
    for start in range(0, len(data), batch_size):
        batch = data.rows(start, start + batch_size)
        yb = batch.y
        if stacked is not None and isinstance(batch.x, torch.Tensor):
            outputs = stacked.evaluate(state, batch.x)
        else:
            # `state` names every entry, each name of a tied weight too (as separate tensors).
            outputs = functional_call(module, state, *model_args(batch.x), tie_weights=False)
        for name, value in task.metric_sums(outputs, yb).items():
            value = value.double() if value.is_floating_point() else value
            sums[name] = sums[name] + value if name in sums else value
        units += task.units(yb)
    module.train(was_training)
    metrics = task.summarize({k: v.item() for k, v in sums.items()}, units)
    return Evaluation(metrics["loss"], metrics.get("accuracy"), len(data), metrics)


def _stacked(module: nn.Module, data: TensorData) -> fastconv.StackedNet | None:
    """The `fastconv` net that evaluates a convolutional `module` on the CPU faster than the
    module itself, where there is one."""
    x = data.x
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type == "cpu"):
        return None
    if not fastconv.convolutional(module):
        return None
    if any(isinstance(m, nn.BatchNorm2d) and not m.track_running_stats for m in module.modules()):
        return None  # it normalizes by the batch's statistics: the batch must stay whole
    return fastconv.stacked_net(module)
