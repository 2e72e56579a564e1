"""A client algorithm of your own: FedProx's proximal term written as a loss term.

The docs' "Client algorithms" page walks through this file; tests/test_examples.py runs it.
Each client adds mu/2 ||w - w_received||^2 to its loss (Li et al. 2020), through autograd: any
differentiable function of the parameters can go in `loss_term`. scikit-learn's digits across
20 clients of two labels each (the `shards` partition), 10 per round. Prints each run's test
accuracy and how far its final model lies from FedAvg's and from the built-in FedProx's
(`fedforge.algorithms.Proximal`, the same term fused into the optimizer's step): with mu=0 it is
FedAvg, and with mu>0 the built-in FedProx, up to float rounding (a loss term trains through
autograd, plain FedAvg's MLP through a fused kernel); with mu>0 it is no longer FedAvg.

    python examples/own_algorithm.py [--rounds 10] [--mu 0.5]
"""

import argparse
from dataclasses import dataclass

import numpy as np

import fedforge as ff
from fedforge.algorithms import ClientAlgorithm, Proximal
from fedforge.data import shards
from fedforge.data.bundled import load_bundled


@dataclass(frozen=True)
class ProximalLoss(ClientAlgorithm):
    """loss + mu/2 ||w - w_received||^2 on every trained parameter."""

    mu: float = 0.1
    name = "proximal_loss"

    def loss_term(self, phase, params, received, state, inputs):
        # `params`: the parameters being trained, now; `received`: their values at the round's start.
        return self.mu / 2 * sum(((params[k] - received[k]) ** 2).sum() for k in params)


def distance(a: ff.ServerState, b: ff.ServerState) -> float:
    """The largest difference between two models' entries."""
    return max((a.params[k] - b.params[k]).abs().max().item() for k in a.params)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--mu", type=float, default=0.5)
    args = parser.parse_args()

    digits = load_bundled("digits")
    parts = shards(digits.train.y.numpy(), 20, rng=np.random.default_rng(0), shards_per_client=2)
    data = ff.FederatedData(digits.train, parts, test=digits.test)
    model = ff.build_model("mlp", digits.input_shape, digits.num_classes, seed=0)

    def run(algorithm: ClientAlgorithm) -> ff.SimulationResult:
        client = ff.ClientConfig(local_epochs=2, batch_size=16, lr=0.1, algorithm=algorithm)
        # One engine for every run, so that the comparisons below are of the algorithms alone.
        engine = ff.SequentialEngine()
        return ff.simulate(model, data, rounds=args.rounds, clients_per_round=10, client=client, engine=engine, seed=0)

    fedavg = run(ClientAlgorithm())
    runs = {
        "proximal_loss mu=0": run(ProximalLoss(mu=0.0)),
        f"proximal_loss mu={args.mu:g}": run(ProximalLoss(mu=args.mu)),
        f"built-in fedprox mu={args.mu:g}": run(Proximal(mu=args.mu)),
    }
    builtin = runs[f"built-in fedprox mu={args.mu:g}"]
    print(f"{'fedavg':<26} test accuracy {fedavg.history.final.test_accuracy:.4f}")
    for label, result in runs.items():
        print(
            f"{label:<26} test accuracy {result.history.final.test_accuracy:.4f}  "
            f"from fedavg {distance(result.state, fedavg.state):.3g}  "
            f"from built-in fedprox {distance(result.state, builtin.state):.3g}"
        )
