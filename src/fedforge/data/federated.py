"""A training set split across clients, with its test data: what a federated run trains on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .datasets import TensorData


@dataclass(frozen=True)
class FederatedData:
    """A training set split across clients, and the data the global model is tested on.

    Args:
        train: all training examples, in memory: a TensorData, or anything the task's
            `Task.data` takes (a tuple or dict of tensors, a torch.utils.data.Dataset).
        partition: each client's indices into `train`.
        test: the centralized test set, or None to skip centralized evaluation.
        client_test: each client's held-out indices into `train`, for federated evaluation.
    """

    train: TensorData
    partition: Sequence[np.ndarray]
    test: TensorData | None = None
    client_test: Sequence[np.ndarray] | None = None

    @property
    def num_clients(self) -> int:
        return len(self.partition)

    def to(self, device) -> FederatedData:
        test = self.test.to(device) if self.test is not None else None
        return FederatedData(self.train.to(device), self.partition, test, self.client_test)


__all__ = ["FederatedData"]
