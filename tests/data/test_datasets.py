import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedforge.data import FASHION_MNIST, load_dataset, search_dirs, write_idx
from fedforge.data.datasets import gather, read_idx_cached
from fedforge.errors import ConfigError, DataError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def test_search_order(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFORGE_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert search_dirs("mnist", tmp_path / "explicit") == [
        tmp_path / "explicit" / "mnist",
        tmp_path / "explicit",
        tmp_path / "env" / "mnist",
        tmp_path / "env",
        tmp_path / "home" / ".cache" / "fedforge" / "mnist",
        Path("/usr/share/datasets/mnist"),
    ]


def test_real_fashion_mnist_in_memory(fashion):
    assert fashion.train.x.shape == (60_000, 1, 28, 28) and fashion.train.x.dtype == torch.float32
    assert fashion.test.x.shape == (10_000, 1, 28, 28)
    assert fashion.train.y.bincount().tolist() == [6000] * 10
    assert fashion.train.x.min() == -1 and fashion.train.x.max() == 1


def test_explicit_dir_wins_and_a_corrupt_file_there_is_reported(tmp_path):
    for filename, _ in FASHION_MNIST.files.values():
        shutil.copy(DEBIAN / filename, tmp_path / filename)
    images = tmp_path / FASHION_MNIST.files["test_images"][0]
    images.write_bytes(images.read_bytes()[:100_000])
    with pytest.raises(DataError, match=f"{images}.*corrupt or truncated"):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_unknown_dataset():
    with pytest.raises(ConfigError, match=r"unknown dataset 'cifar'.*fashion-mnist"):
        load_dataset("cifar")


def test_decoded_cache_is_used_and_keyed_by_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFORGE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "x.gz"
    write_idx(path, np.full((3, 2), 7, dtype=np.uint8))
    assert read_idx_cached(path, (3, 2)).tolist() == [[7, 7]] * 3
    assert len(list((tmp_path / "cache" / "decoded").iterdir())) == 1
    # A changed file (new size and mtime) is read afresh, never served from the old entry.
    write_idx(path, np.full((3, 2), 9, dtype=np.uint8))
    os.utime(path, ns=(1, 1))
    assert read_idx_cached(path, (3, 2)).tolist() == [[9, 9]] * 3
    # A cache that cannot be read is ignored.
    for entry in (tmp_path / "cache" / "decoded").iterdir():
        entry.write_bytes(b"garbage")
    assert read_idx_cached(path, (3, 2)).tolist() == [[9, 9]] * 3


@pytest.mark.parametrize("index_shape", [(7,), (3, 5), (2, 3, 4)])
def test_gather_equals_advanced_indexing(index_shape):
    source = torch.randn(50, 1, 28, 28)
    index = torch.randint(0, 50, index_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gather(source, index), source[index])
    labels = torch.arange(50) * 3
    assert torch.equal(gather(labels, index), labels[index])
