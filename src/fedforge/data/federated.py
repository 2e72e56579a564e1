"""A dataset split across clients: the partition drawn from a seed, and every client's examples side by side."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from .. import _seeding
from ..errors import ConfigError
from .datasets import Dataset, TensorData, one_tensor
from .partition import partition, split_holdout


@dataclass(frozen=True)
class FederatedData:
    """A training set split across clients, and the data the global model is tested on.

    Args:
        train: all training examples, in memory: a TensorData, or anything the task's
            `Task.data` takes (a tuple or dict of tensors, a torch.utils.data.Dataset, a
            Hugging Face datasets.Dataset).
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


@dataclass(frozen=True)
class Split:
    """How a dataset is split across clients: a partition (see PARTITIONS) and its options, and the
    fraction of each client's examples held out for federated evaluation."""

    partition: str = "iid"
    num_clients: int = 10
    alpha: float = 0.5
    shards_per_client: int = 2
    sigma: float = 1.0
    client_test_fraction: float = 0.0


def federate(dataset: Dataset, split: Split, *, seed: int) -> FederatedData:
    """`dataset` split across clients as `split` says, from `seed`.

    A dataset that comes split (`Dataset.clients`: synthetic's devices) keeps its own split. A
    continuous target is cut into 10 quantile bins, the labels of the label-skewed partitions
    (dirichlet, shards). The natural partition is the dataset's own groups (shakespeare: one
    client per role).
    """
    if dataset.clients is not None:
        return FederatedData(dataset.train, dataset.clients, dataset.test)
    if split.partition == "natural" and dataset.groups is None:
        raise ConfigError(
            f"dataset {dataset.name} has no natural partition (no groups such as shakespeare's "
            f"speaking roles); choose another partition"
        )
    labels = one_tensor(dataset.train.y, "the targets a partition splits by").cpu().numpy()
    if labels.ndim != 1 and split.partition in ("dirichlet", "shards"):
        raise ConfigError(
            f"partition {split.partition} splits by label, and dataset {dataset.name} has no one "
            f"label per example (targets of shape {labels.shape[1:]} each)"
        )
    if np.issubdtype(labels.dtype, np.floating):
        labels = np.searchsorted(np.quantile(labels, np.linspace(0, 1, 11)[1:-1]), labels, side="right")
    parts = partition(
        split.partition,
        labels,
        split.num_clients,
        rng=_seeding.numpy_rng(seed, _seeding.PARTITION),
        alpha=split.alpha,
        shards_per_client=split.shards_per_client,
        sigma=split.sigma,
        groups=dataset.groups,
    )
    client_test = None
    if split.client_test_fraction > 0:
        parts, client_test = split_holdout(
            parts, split.client_test_fraction, rng=_seeding.numpy_rng(seed, _seeding.CLIENT_TEST_SPLIT)
        )
    return FederatedData(dataset.train, parts, dataset.test, client_test)


def client_pool(
    train: TensorData,
    partition: Sequence[np.ndarray],
    *,
    flipped: Collection[int] = frozenset(),
    clients: range | None = None,
) -> tuple[TensorData, list[int]]:
    """Every client's training examples side by side, and where each client's rows start: client c
    holds rows starts[c]:starts[c + 1]. The labels of the clients in `flipped` (a scenario's
    label_flip attackers, `scenarios.label_flipped`) become num_classes - 1 - label here (the
    pool is fedforge's own copy: no user data is touched).

    The round loop trains from it; engines whose workers load the data themselves (Ray) rebuild
    it with this function, so that their clients train on the same examples. With `clients` (a
    range of client ids) the pool holds only theirs, client c at rows starts[c - clients.start]:
    starts[c - clients.start + 1]: a Ray worker keeps only the clients it trains.
    """
    for cid, idx in enumerate(partition):
        if len(idx) == 0:
            raise ConfigError(f"client {cid} has no training examples; use fewer clients")
    chosen = range(len(partition)) if clients is None else clients
    # One gather puts every client's examples side by side; each client's data is a view.
    pool = train.subset(np.concatenate([partition[c] for c in chosen]))
    starts = np.concatenate([[0], np.cumsum([len(partition[c]) for c in chosen])]).tolist()
    if flipped:
        labels = one_tensor(pool.y, "the labels a label_flip attack flips")
        num_classes = int(one_tensor(train.y, "the labels a label_flip attack flips").max()) + 1
        for c in sorted(flipped):
            if c in chosen:
                i = c - chosen.start
                labels[starts[i] : starts[i + 1]] = num_classes - 1 - labels[starts[i] : starts[i + 1]]
    return pool, starts


__all__ = ["FederatedData", "Split", "client_pool", "federate"]
