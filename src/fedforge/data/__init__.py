"""Datasets in memory, partitions across clients, and the IDX reader."""

from .datasets import DATASETS, FASHION_MNIST, MNIST, Dataset, IdxSpec, TensorData, load_dataset, search_dirs
from .idx import read_idx, write_idx
from .partition import PARTITIONS, dirichlet, iid, label_histogram, natural, partition, quantity, shards, split_holdout
from .shakespeare import load_shakespeare

__all__ = [
    "DATASETS",
    "FASHION_MNIST",
    "MNIST",
    "PARTITIONS",
    "Dataset",
    "IdxSpec",
    "TensorData",
    "dirichlet",
    "iid",
    "label_histogram",
    "load_dataset",
    "load_shakespeare",
    "natural",
    "partition",
    "quantity",
    "read_idx",
    "search_dirs",
    "shards",
    "split_holdout",
    "write_idx",
]
