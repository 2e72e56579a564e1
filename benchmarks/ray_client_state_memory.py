"""Where SCAFFOLD's client states live on the Ray engine: the driver's memory against its workers'.

The tutorial's MLP (`models` "mlp", 784-128-64-10) and CLIENTS clients of random 28x28 images
(EXAMPLES each, one local step a round), ROUNDS rounds of CLIENTS / ROUNDS clients (about two
thirds of the clients train), on 2 Ray workers of half a CPU. Each client that trained keeps its
SCAFFOLD control variate (the model's size, ~0.4 MB); with fedavg, none. Printed after the last
round: the peak RSS of the driver (this process), the RSS of each worker, and the clients' states
in all. No checkpoint is written (it would gather every state onto the driver, as `fedforge run` does
every round); the peak is taken before the run's result gathers them.

Measured (2 shared CPUs, 4,000 clients: 2,556 keep a state, 1,067 MiB in all): driver peak RSS
926 MiB with the states on the workers (1,560 and 1,595 MiB each), 2,428 MiB when the driver held
them (the engine before, workers 1,475 and 1,416 MiB); fedavg 552 MiB (workers 429 MiB each).
What the driver holds beyond fedavg is the round's SCAFFOLD updates, each client's own.

    PYTHONPATH=src python benchmarks/ray_client_state_memory.py [CLIENTS] [STRATEGY]
"""

from __future__ import annotations

import logging
import resource
import sys
from typing import Any

import numpy as np
import ray
import torch

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.data.datasets import TensorData
from fedforge.engines.ray import RayEngine
from fedforge.models import build_model
from fedforge.strategies import make_strategy

CLIENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000
STRATEGY = sys.argv[2] if len(sys.argv) > 2 else "scaffold"  # fedavg: the same run with no client state
EXAMPLES, ROUNDS = 8, 40


def data() -> FederatedData:
    generator = torch.Generator().manual_seed(0)
    n = CLIENTS * EXAMPLES
    train = TensorData(torch.rand(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator))
    return FederatedData(train, list(np.arange(n).reshape(CLIENTS, EXAMPLES)))


def rss(pid: int) -> int:
    """A process's resident memory now, in bytes (Linux: /proc)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    model = build_model("mlp", (1, 28, 28), 10, seed=0)
    size = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    seen: dict[str, Any] = {}
    with RayEngine(data, seed=0, workers=2, cpus_per_worker=0.5) as engine:

        def on_round(record, state) -> None:
            if record.round == ROUNDS:  # before the result gathers every state onto the driver
                seen["driver"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                seen["workers"] = [rss(p["pid"]) for p in engine.placement]

        result = simulate(
            model,
            data(),
            rounds=ROUNDS,
            clients_per_round=CLIENTS // ROUNDS,
            client=ClientConfig(batch_size=EXAMPLES, lr=0.05),
            strategy=make_strategy(STRATEGY),
            engine=engine,
            seed=0,
            on_round=on_round,
        )
    kept, driver, workers = len(result.kept.client_states), seen["driver"], seen["workers"]
    mib = 2**20
    states = kept * size / mib
    print(f"{STRATEGY}: {kept:,} of {CLIENTS:,} clients keep a state of {size / mib:.2f} MiB, {states:,.0f} MiB in all")
    print(f"driver peak RSS {driver / mib:,.0f} MiB; workers' RSS {', '.join(f'{w / mib:,.0f}' for w in workers)} MiB")


if __name__ == "__main__":
    main()
