"""Datasets in memory, loaded by name (`load`), partitioned across clients (`federate`), and the IDX reader."""

from .datasets import DATASETS, FASHION_MNIST, MNIST, Dataset, IdxSpec, TensorData, load_dataset, search_dirs
from .federated import FederatedData, Split, client_pool, federate
from .idx import read_idx, write_idx
from .partition import PARTITIONS, dirichlet, iid, label_histogram, natural, partition, quantity, shards, split_holdout
from .shakespeare import load_shakespeare
from .sources import LOADERS, PREFIXES, Loader, Request, load, register

__all__ = [
    "DATASETS",
    "FASHION_MNIST",
    "LOADERS",
    "MNIST",
    "PARTITIONS",
    "PREFIXES",
    "Dataset",
    "FederatedData",
    "IdxSpec",
    "Loader",
    "Request",
    "Split",
    "TensorData",
    "client_pool",
    "dirichlet",
    "federate",
    "iid",
    "label_histogram",
    "load",
    "load_dataset",
    "load_shakespeare",
    "natural",
    "partition",
    "quantity",
    "read_idx",
    "register",
    "search_dirs",
    "shards",
    "split_holdout",
    "write_idx",
]
