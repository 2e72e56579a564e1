"""scikit-learn's bundled datasets, read offline: a demo of tasks beyond image classification.

- `digits`: 1,797 8x8 images of digits, 10 classes (classification); features scaled to [-1, 1].
- `diabetes`: 442 patients, 10 standardized features, a continuous disease-progression target
  (regression); one output.

A fixed 80/20 split (its own seed, so the test set is the same in every run). Needs
scikit-learn: `pip install 'fedforge[sklearn]'`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .datasets import Dataset, TensorData

BUNDLED = ("digits", "diabetes")
TEST_FRACTION = 0.2


def _split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(0).permutation(len(x))
    cut = round(len(x) * (1 - TEST_FRACTION))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def load_bundled(name: str) -> Dataset:
    """Dataset `name` of BUNDLED, split and scaled (statistics of the training split only)."""
    if name not in BUNDLED:
        raise ConfigError(f"unknown bundled dataset {name!r} (choose from: {', '.join(BUNDLED)})")
    try:
        from sklearn import datasets
    except ImportError:
        raise ConfigError(f"dataset {name!r} needs scikit-learn: pip install 'fedforge[sklearn]'") from None
    if name == "digits":
        bunch = datasets.load_digits()
        x = (bunch.data.reshape(-1, 1, 8, 8) / 8.0 - 1.0).astype(np.float32)  # pixels 0..16 -> [-1, 1]
        x_train, y_train, x_test, y_test = _split(x, bunch.target.astype(np.int64))
        return Dataset(
            name,
            TensorData(torch.from_numpy(x_train), torch.from_numpy(y_train)),
            TensorData(torch.from_numpy(x_test), torch.from_numpy(y_test)),
            num_classes=10,
        )
    bunch = datasets.load_diabetes()
    x_train, y_train, x_test, y_test = _split(bunch.data, bunch.target)
    mean, std = x_train.mean(0), x_train.std(0)

    def features(x):
        return torch.from_numpy(((x - mean) / std).astype(np.float32))

    return Dataset(
        name,
        TensorData(features(x_train), torch.from_numpy(y_train.astype(np.float32))),
        TensorData(features(x_test), torch.from_numpy(y_test.astype(np.float32))),
        num_classes=1,
    )
