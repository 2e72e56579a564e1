"""A fedforge workload on Flower's own simulation (`flwr.simulation.run_simulation`, Ray underneath),
for benchmarks/ray_scale.py (W2) and benchmarks/convnets.py (CNN).

Runs in a separate environment with `flwr[simulation]` and torch (never fedforge's). Flower's way:
a ClientApp whose client trains one client per call with a DataLoader, torch.optim.SGD and the
model's weights as NumPy arrays in and out, on an actor pool of 2 actors of 1 CPU; FedAvg on the
server with centralized evaluation each round. The same data as fedforge's run: Fashion-MNIST from
the IDX files, normalized as fedforge does, and what the spec (written by ray_scale.flower_spec)
gives: the clients' indices, the clients per round, the batch size and the model (fedforge's
initial model, saved whole: a stack of torch.nn layers), E=1, lr 0.01. Each actor loads the data
once, as fedforge's workers do, so that Flower is not charged for reloads: the apps are imported
from this module (on the actors' PYTHONPATH), not pickled from __main__ with an empty cache.

    python flower_run.py SPEC.npz ROUNDS      # prints {"round_seconds": [...], "accuracy": ...}
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_DATA: dict = {}


def data() -> dict:
    """The training and test sets, the clients' indices and the run's settings, loaded once per process."""
    if not _DATA:
        spec = np.load(os.environ["FLOWER_RUN_SPEC"])
        folder, mean, std = Path(str(spec["folder"])), float(spec["mean"]), float(spec["std"])

        def idx(name, offset, shape):
            with gzip.open(folder / name) as f:
                return np.frombuffer(f.read(), np.uint8, offset=offset).reshape(shape)

        def images(name, n):
            return torch.from_numpy(idx(name, 16, (n, 1, 28, 28)).copy()).float().div_(255).sub_(mean).div_(std)

        def labels(name, n):
            return torch.from_numpy(idx(name, 8, (n,)).astype(np.int64))

        _DATA.update(
            x=images("train-images-idx3-ubyte.gz", 60000),
            y=labels("train-labels-idx1-ubyte.gz", 60000),
            test_x=images("t10k-images-idx3-ubyte.gz", 10000),
            test_y=labels("t10k-labels-idx1-ubyte.gz", 10000),
            order=spec["order"],
            starts=spec["starts"],
            per_round=int(spec["per_round"]),
            batch_size=int(spec["batch_size"]),
            model=torch.load(str(spec["model"]), weights_only=False),
        )
    return _DATA


def model() -> nn.Module:
    """A fresh copy of the initial model."""
    return copy.deepcopy(data()["model"])


def set_weights(model: nn.Module, weights) -> None:
    model.load_state_dict({k: torch.from_numpy(np.copy(w)) for k, w in zip(model.state_dict(), weights, strict=True)})


class Client(NumPyClient):
    def __init__(self, cid: int):
        self.cid = cid

    def fit(self, parameters, config):
        d = data()
        rows = torch.from_numpy(np.array(d["order"][d["starts"][self.cid] : d["starts"][self.cid + 1]]))
        local = model()
        set_weights(local, parameters)
        optimizer = torch.optim.SGD(local.parameters(), lr=0.01)
        batches = DataLoader(TensorDataset(d["x"][rows], d["y"][rows]), batch_size=d["batch_size"], shuffle=True)
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(local(x), y).backward()
            optimizer.step()
        return [v.detach().numpy() for v in local.state_dict().values()], len(rows), {}


def client_fn(context: Context):
    return Client(int(context.node_config["partition-id"])).to_client()


marks: list[float] = []
accuracy: list[float] = []


def evaluate(server_round, parameters, config):
    """Centralized evaluation, called after round 0 (the initial model) and after every round: its times mark the
    rounds."""
    d = data()
    global_model = model().eval()
    set_weights(global_model, parameters)
    with torch.no_grad():
        logits = global_model(d["test_x"])
    accuracy.append(float((logits.argmax(1) == d["test_y"]).float().mean()))
    marks.append(time.perf_counter())
    return float(F.cross_entropy(logits, d["test_y"])), {"accuracy": accuracy[-1]}


def server_fn(context: Context) -> ServerAppComponents:
    d = data()
    clients = len(d["starts"]) - 1
    initial = ndarrays_to_parameters([v.numpy() for v in model().state_dict().values()])
    strategy = FedAvg(
        fraction_fit=d["per_round"] / clients,
        fraction_evaluate=0.0,
        min_fit_clients=d["per_round"],
        min_available_clients=clients,
        evaluate_fn=evaluate,
        initial_parameters=initial,
    )
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=int(os.environ["FLOWER_RUN_ROUNDS"])))


def main() -> None:
    spec, rounds = sys.argv[1], sys.argv[2]
    # Inherited by Ray's processes, which import this module by name.
    here = str(Path(__file__).resolve().parent)
    os.environ.update(
        FLOWER_RUN_SPEC=spec,
        FLOWER_RUN_ROUNDS=rounds,
        PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p),
    )
    import flower_run

    run_simulation(
        server_app=ServerApp(server_fn=flower_run.server_fn),
        client_app=ClientApp(client_fn=flower_run.client_fn),
        num_supernodes=len(np.load(spec)["starts"]) - 1,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    marks, accuracy = flower_run.marks, flower_run.accuracy
    print(json.dumps({"round_seconds": np.diff(marks).tolist(), "accuracy": accuracy[-1] if accuracy else None}))


if __name__ == "__main__":
    main()
