"""What a simulation's checkpoint holds of its clients: the bytes of 10,000 clients' client states.

The tutorial's MLP (`models` "mlp", 784-128-64-10 for 28x28 images, 10 classes). For SCAFFOLD each client
that trained keeps its control variate c_i, one tensor per float entry of the model; for FedPer, its head
(the last layer). Printed: `ClientState.nbytes()` of one client and summed over 10,000 clients, and the
bytes a client takes in a checkpoint (torch.save of 100 clients' `flat()` tables, each with its own
tensors, divided by 100). No timings.

    PYTHONPATH=src python benchmarks/client_state_bytes.py
"""

from __future__ import annotations

import io

import torch

from fedforge.algorithms import ClientAlgorithm, ClientState, FedPer, ScaffoldClient
from fedforge.models import build_model

CLIENTS = 10_000
SERIALIZED = 100


def client_state(algorithm: ClientAlgorithm, model: torch.nn.Module) -> ClientState:
    """A client's state after its first round, as `client.start_of_round` makes it (its values aside)."""
    entries = {k: v.detach() for k, v in model.state_dict().items()}
    roles = algorithm.roles.assign(model)
    shared = {n: entries[n] for n in roles.shared}
    return ClientState({n: entries[n].clone() for n in roles.personal}, algorithm.init_state(shared))


def main() -> None:
    model = build_model("mlp", (1, 28, 28), 10, seed=0)
    print(f"the model: {sum(v.numel() * v.element_size() for v in model.state_dict().values()):,} bytes")
    for name, algorithm in (("scaffold", ScaffoldClient()), ("fedper", FedPer())):
        one = client_state(algorithm, model)
        # The same tensors in every client here; nbytes counts each client's as its own, as a run holds them.
        total = sum(ClientState(one.personal, one.algorithm, one.copy).nbytes() for _ in range(CLIENTS))
        buffer = io.BytesIO()
        torch.save({c: {k: v.clone() for k, v in one.flat().items()} for c in range(SERIALIZED)}, buffer)
        stored = len(buffer.getvalue()) / SERIALIZED
        print(
            f"{name:8s} {one.nbytes():>9,} bytes a client, {total:>14,} for {CLIENTS:,} ({total / 2**20:8,.1f} MiB); "
            f"in a checkpoint {stored:,.0f} bytes a client, {stored * CLIENTS / 2**20:,.1f} MiB for {CLIENTS:,}"
        )


if __name__ == "__main__":
    main()
