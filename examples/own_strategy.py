"""A strategy of your own: every client's update counts the same, whatever its example count.

The docs' "Strategies" page shows this file; tests/test_examples.py runs it. scikit-learn's digits
over 10 clients of very unequal sizes (quantity skew), 5 rounds of the unweighted mean (the
tutorial's average), then FedAvg's weighted mean for comparison.
Run: `python examples/own_strategy.py` (`pip install 'fedforge[sklearn]'`).
"""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

import fedforge as ff
from fedforge.data import quantity
from fedforge.data.bundled import load_bundled
from fedforge.reductions import RunningMean
from fedforge.strategies.base import StrategyBase


@dataclass(frozen=True)
class EqualWeightAvg(StrategyBase):
    """The unweighted mean of the clients' deltas: a client of 10 examples weighs as one of 1,000."""

    name = "equal_avg"

    def aggregate(self, state: ff.ServerState, updates: Iterable[ff.ClientUpdate]) -> ff.ServerState:
        mean = RunningMean()  # one model-sized sum, never every update at once
        for update in updates:
            mean.add(update.delta, weight=1.0)
        if mean.count == 0:  # nobody reported: the same model, the next round
            return state.unchanged()
        delta = mean.mean(like=state.params)
        return state.next({k: v + delta[k] for k, v in state.params.items()})


if __name__ == "__main__":
    digits = load_bundled("digits")
    parts = quantity(len(digits.train), 10, sigma=1.5, rng=np.random.default_rng(0))
    data = ff.FederatedData(digits.train, parts, test=digits.test)
    model = ff.build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    client = ff.ClientConfig(local_epochs=5, batch_size=16, lr=0.05)
    for strategy in (EqualWeightAvg(), ff.FedAvg()):
        result = ff.simulate(model, data, rounds=5, clients_per_round=10, client=client, strategy=strategy, seed=0)
        accuracy = " ".join(f"{a:.3f}" for a in result.history.column("test_accuracy"))
        print(f"{strategy.name:9} test accuracy by round: {accuracy}")
