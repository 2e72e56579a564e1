"""The tutorial's experiment two ways, in one process: the tutorial's own loop and fedforge.

The tutorial's style: a Dataset that converts every sample on access (ToTensor + Normalize),
one DataLoader per client (batch 32, shuffled), a deepcopy of the global model per client,
torch.optim.SGD, an unweighted state_dict average (clients are equal-sized here, so it equals
FedAvg), and a DataLoader over the test set (batch 128). fedforge runs with its `sequential`
engine (one client after another, as the tutorial) and
its default `vectorized` engine (the selected clients trained together). The per-sample
transform is done with
numpy instead of PIL (no torchvision here), which is less work than torchvision does: the
measured ratio is, if anything, in the tutorial's favour.

The two alternate (`--repeats` times each, tutorial first) so that both see the same machine
state; the table gives the median and the fastest round over all repeats, the ratio of the
medians, and the final accuracies (which are the same in every repeat: both are seeded).

    python benchmarks/tutorial_vs_fedforge.py [--rounds 5] [--repeats 3] [--dataset fashion-mnist]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.data import iid, load_dataset
from fedforge.data.datasets import DATASETS, locate
from fedforge.data.idx import read_idx
from fedforge.engines import make_engine
from fedforge.models import build_model


class PerSampleImages(torch.utils.data.Dataset):
    """Like torchvision's MNIST: uint8 images, the transform applied to each sample on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = torch.from_numpy(self.images[i]).unsqueeze(0).float().div(255)  # ToTensor
        x = (x - 0.5) / 0.5  # Normalize((0.5,), (0.5,))
        return x, int(self.labels[i])


def tutorial(dataset: str, rounds: int, seed: int) -> tuple[list[float], float]:
    spec = DATASETS[dataset]
    folder = locate(spec, progress=False)
    raw = {part: read_idx(folder / name, spec.shape(part)) for part, (name, _) in spec.files.items()}
    train = PerSampleImages(raw["train_images"], raw["train_labels"])
    test = PerSampleImages(raw["test_images"], raw["test_labels"])
    random.seed(seed)
    torch.manual_seed(seed)
    indices = list(range(len(train)))
    random.shuffle(indices)
    size = len(train) // 10
    loaders = [
        DataLoader(Subset(train, indices[i * size : (i + 1) * size]), batch_size=32, shuffle=True) for i in range(10)
    ]
    test_loader = DataLoader(test, batch_size=128)
    global_model = build_model("mlp", (1, 28, 28), 10, seed=seed)
    seconds, accuracy = [], 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        local_weights = []
        for c in random.sample(range(10), 5):
            local = copy.deepcopy(global_model)
            optimizer = torch.optim.SGD(local.parameters(), lr=0.01)
            local.train()
            for x, y in loaders[c]:
                optimizer.zero_grad()
                F.cross_entropy(local(x), y).backward()
                optimizer.step()
            local_weights.append(local.state_dict())
        average = {k: torch.zeros_like(v) for k, v in local_weights[0].items()}
        for weights in local_weights:
            for k in average:
                average[k] += weights[k] / len(local_weights)
        global_model.load_state_dict(average)
        global_model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (global_model(x).argmax(1) == y).sum().item()
        accuracy = correct / len(test)
        seconds.append(time.perf_counter() - start)
    return seconds, accuracy


def fedforge_run(dataset: str, rounds: int, seed: int, engine: str = "sequential") -> tuple[list[float], float]:
    data = load_dataset(dataset, progress=False)
    parts = iid(len(data.train), 10, rng=np.random.default_rng(seed))
    model = build_model("mlp", data.input_shape, data.num_classes, seed=seed)
    result = simulate(
        model,
        FederatedData(data.train, parts, data.test),
        rounds=rounds,
        clients_per_round=5,
        client=ClientConfig(local_epochs=1, batch_size=32, lr=0.01),
        engine=make_engine(engine),
        seed=seed,
    )
    records = result.history.records[1:]
    return [r.seconds for r in records], records[-1].test_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist", choices=list(DATASETS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{args.dataset}, 10 clients, 5 per round, E=1, B=32, lr 0.01, MLP; {args.rounds} rounds x "
        f"{args.repeats} repeats; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    sides = {
        "tutorial loop": tutorial,
        "fedforge (sequential)": fedforge_run,
        "fedforge (vectorized)": lambda *a: fedforge_run(*a, engine="vectorized"),  # the default engine
    }
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    accuracy: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, run in sides.items():
            times, accuracy[name] = run(args.dataset, args.rounds, args.seed)
            seconds[name] += times
    print(f"{'':<24}{'s/round median':>16}{'fastest':>10}{'final accuracy':>16}")
    for name in sides:
        print(f"{name:<24}{statistics.median(seconds[name]):>16.3f}{min(seconds[name]):>10.3f}{accuracy[name]:>16.4f}")
    reference = "tutorial loop"
    for name in list(sides)[1:]:
        ratio = statistics.median(seconds[reference]) / statistics.median(seconds[name])
        print(
            f"{name}: {ratio:.1f}x faster per round than the tutorial loop (medians); accuracy "
            f"{100 * (accuracy[name] - accuracy[reference]):+.2f} points"
        )


if __name__ == "__main__":
    main()
