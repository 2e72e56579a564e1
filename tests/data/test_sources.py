"""The registry of datasets by name: `data.load(spec)` looks the name or its prefix up, one loader per kind."""

import numpy as np
import pytest
import torch

from fedforge import data
from fedforge.config import Config
from fedforge.data import Dataset, Request, Split, TensorData
from fedforge.errors import ConfigError
from fedforge.experiment import load


def test_each_kind_registers_its_names():
    assert list(data.LOADERS) == [
        "mnist",
        "fashion-mnist",
        "synthetic",
        "digits",
        "diabetes",
        "shakespeare",
        "shakespeare-text",
    ]
    assert list(data.PREFIXES) == ["csv", "parquet", "hf", "jsonl", "shakespeare-text"]


def test_an_unknown_name_is_refused_in_one_line_naming_the_choices():
    with pytest.raises(ConfigError, match=r"unknown dataset 'cifar' \(choose from: mnist, fashion-mnist, .*csv:PATH"):
        data.load("cifar")
    with pytest.raises(ConfigError, match=r"unknown dataset 'xls:a\.xls'"):
        data.load("xls:a.xls")


def test_the_request_reaches_the_loader():
    one = data.load("synthetic", num_clients=3, seed=1, synthetic_alpha=0.5)
    same = data.load("synthetic", Request(num_clients=3, seed=1, synthetic_alpha=0.5))
    assert one.name == "synthetic(0.5,1)" and len(one.clients) == 3
    assert torch.equal(one.train.x, same.train.x)
    assert not torch.equal(data.load("synthetic", num_clients=3, seed=2).train.x[:5], one.train.x[:5])
    with pytest.raises(ConfigError, match=r"dataset 'hf:x' needs a target"):
        data.load("hf:x")


def test_a_loader_of_ones_own_is_loaded_by_its_name_and_federated(monkeypatch):
    monkeypatch.setattr(data.sources, "LOADERS", dict(data.LOADERS))
    monkeypatch.setattr(data.sources, "PREFIXES", dict(data.PREFIXES))
    seen = []

    def squares(spec: str, request: Request) -> Dataset:
        seen.append((spec, request.seed))
        x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
        return Dataset(spec, TensorData(x, torch.arange(20) % 2), TensorData(x[:4], torch.arange(4) % 2), 2)

    data.register("squares", squares)
    data.register("grid", squares, prefix=True)
    assert data.load("squares", seed=4).name == "squares" and data.load("grid:7x7").name == "grid:7x7"
    assert seen == [("squares", 4), ("grid:7x7", 0)]
    with pytest.raises(ConfigError, match="dataset 'squares' is registered already"):
        data.register("squares", squares)
    federated = data.federate(data.load("squares"), Split(num_clients=4), seed=0)
    assert sorted(np.concatenate(federated.partition).tolist()) == list(range(20))
    # and from the settings (Config, the command line) by the same names
    dataset, federated = load(Config(dataset="squares", num_clients=4, clients_per_round=2))
    assert dataset.name == "squares" and len(federated.partition) == 4
    assert Config(dataset="grid:7x7", num_clients=4, clients_per_round=2).dataset == "grid:7x7"
    with pytest.raises(ConfigError, match=r"unknown dataset 'squars' \(choose from: .*squares, or csv:PATH.*grid:PATH"):
        Config(dataset="squars")


def test_a_dataset_that_comes_split_keeps_its_split_whatever_the_partition():
    config = Config(
        dataset="synthetic", num_clients=4, clients_per_round=2, partition="dirichlet", client_test_fraction=0.5
    )
    dataset, federated = load(config)
    assert [p.tolist() for p in federated.partition] == [p.tolist() for p in dataset.clients]
    assert federated.client_test is None
