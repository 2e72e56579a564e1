"""Federated regression on tabular data, with Adam on the clients.

scikit-learn's diabetes data (442 patients, 10 features, a continuous target) split across 5
clients; a small MLP trained with mean squared error; every client runs Adam for 5 local epochs
each round (lr 0.05, fresh each round); the server averages (FedAvg). Prints MSE, MAE and R^2
per round: R^2 0.39-0.40 on the test split after 9-18 rounds here (a least-squares linear fit of
the whole, centralized training split reaches 0.34 on it).

    python examples/tabular_regression.py [--rounds 20]
"""

import argparse

import numpy as np
import torch

import fedforge as ff
from fedforge.data.bundled import load_bundled
from fedforge.data.partition import iid
from fedforge.tasks import make_task


def main(rounds: int) -> ff.SimulationResult:
    dataset = load_bundled("diabetes")
    clients = iid(len(dataset.train), 5, rng=np.random.default_rng(0))
    data = ff.FederatedData(dataset.train, clients, dataset.test)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    config = ff.ClientConfig(local_epochs=5, batch_size=16, lr=0.05, task=make_task("regression", optimizer="adam"))

    def report(record, state):
        m = record.metrics
        print(
            f"round {record.round:>2}  test mse {m['test_mse']:8.1f}  mae {m['test_mae']:5.1f}  r2 {m['test_r2']:6.3f}"
        )

    return ff.simulate(model, data, rounds=rounds, clients_per_round=5, client=config, on_round=report)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    main(parser.parse_args().rounds)
