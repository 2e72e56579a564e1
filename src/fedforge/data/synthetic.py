"""The synthetic(alpha, beta) federated benchmark of the FedProx paper (Li et al. 2020,
"Federated Optimization in Heterogeneous Networks", section 5.1), generated as its authors'
script does, from a numpy Generator instead of the global RNG.

Device k has n_k = floor(lognormal(4, 2)) + 50 examples x ~ N(v_k, Sigma) in 60 dimensions,
Sigma diagonal with Sigma_jj = j^-1.2, v_k ~ N(B_k, 1), B_k ~ N(0, beta); labels
y = argmax(softmax(x W_k + b_k)) with W_k, b_k ~ N(u_k, 1), u_k ~ N(0, alpha). alpha sets how
much the devices' models differ, beta how much their data differ. Each device's examples are
shuffled and split 90 / 10 into train and test.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from .datasets import Dataset, TensorData

DIMENSION = 60
NUM_CLASSES = 10


def synthetic(
    alpha: float, beta: float, *, rng: np.random.Generator, num_devices: int = 30, train_fraction: float = 0.9
) -> tuple[Dataset, list[np.ndarray], list[np.ndarray]]:
    """Generate synthetic(alpha, beta).

    Returns:
        The dataset (train: every device's training examples, device after device; test:
        every device's test examples; clients: the devices), each device's indices into train,
        and each device's indices into test.
    """
    sizes = rng.lognormal(4, 2, num_devices).astype(int) + 50
    mean_w = rng.normal(0, alpha, num_devices)  # u_k (the authors' code uses alpha as the std)
    shift = rng.normal(0, beta, num_devices)  # B_k
    std = np.power(np.arange(1, DIMENSION + 1), -1.2) ** 0.5  # Sigma = diag(j^-1.2)
    train_x, train_y, test_x, test_y = [], [], [], []
    for k in range(num_devices):
        mean_x = rng.normal(shift[k], 1, DIMENSION)  # v_k
        weights = rng.normal(mean_w[k], 1, (DIMENSION, NUM_CLASSES))
        bias = rng.normal(mean_w[k], 1, NUM_CLASSES)
        x = mean_x + rng.standard_normal((sizes[k], DIMENSION)) * std
        y = np.argmax(x @ weights + bias, axis=1)  # argmax of softmax = argmax of logits
        order = rng.permutation(sizes[k])
        cut = int(train_fraction * sizes[k])
        train_x.append(x[order[:cut]])
        train_y.append(y[order[:cut]])
        test_x.append(x[order[cut:]])
        test_y.append(y[order[cut:]])

    def indices(parts):
        bounds = np.cumsum([0] + [len(p) for p in parts])
        return [np.arange(a, b, dtype=np.int64) for a, b in itertools.pairwise(bounds)]

    def tensors(xs, ys):
        return TensorData(torch.from_numpy(np.concatenate(xs)).float(), torch.from_numpy(np.concatenate(ys)).long())

    train_parts = indices(train_y)
    dataset = Dataset(
        f"synthetic({alpha:g},{beta:g})",
        tensors(train_x, train_y),
        tensors(test_x, test_y),
        NUM_CLASSES,
        clients=train_parts,  # one client per device, whatever the partition
    )
    return dataset, train_parts, indices(test_y)
