"""Test loss and accuracy of a model state on data held in memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .data.datasets import TensorData


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate(module: nn.Module, state: dict[str, torch.Tensor], data: TensorData, *, batch_size: int = 1024) -> Evaluation:
    """Mean cross-entropy and accuracy of `module` with `state` over all of `data`."""
    if len(data) == 0:
        return Evaluation(float("nan"), float("nan"), 0)
    was_training = module.training
    module.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.y.device)
    correct = torch.zeros((), dtype=torch.long, device=data.y.device)
    for start in range(0, len(data), batch_size):
        xb, yb = data.x[start:start + batch_size], data.y[start:start + batch_size]
        logits = functional_call(module, state, (xb,))
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(1) == yb).sum()
    module.train(was_training)
    return Evaluation(loss_sum.item() / len(data), correct.item() / len(data), len(data))
