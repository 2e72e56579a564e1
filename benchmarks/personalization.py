"""Personalization benchmark (issue 25): each client's own test accuracy under pathological non-IID.

Fashion-MNIST, 100 clients of 2 label shards each (McMahan et al. 2017's pathological split, the
`shards` partition), a fifth of each client's examples held out as its own test set (480 train,
120 test per client), 10 clients per round, `--rounds` rounds (100; `--bn-rounds` for the CNN's
rows), E=1, B=32, SGD lr 0.05, seed 0, one torch thread (`--threads`). After the last round each
method's personal model of each of the 100 clients is tested on that client's held-out examples;
the table gives the example-weighted mean (every client holds 120, so the plain mean) and the
10th and 90th percentiles across clients:

FedAvg           the final global model, untouched, on each client's held-out examples
FedAvg+FT        the final global model after one local epoch on each client (FedAvg's
                 personalized evaluation, done here for all 100 clients)
FedPer, FedRep   the final global body with the client's own head, as it kept it (FedRep: 10
                 head epochs, then 1 body epoch a round)
Ditto            the client's personal copy (lambda 0.1)
+1               (FedPer+1, ...) the client's personal model after one more round of its
                 algorithm from the final global model and what it kept: what the round loop's
                 personalized evaluation tests, for all 100 clients (FedRep refits its head to
                 the final body first)
Local            each client alone, from the same initial model, for as many epochs as it trains
                 in expectation over the run (rounds x 10 / 100), never communicating
FedBN            (with FedAvg, FedAvg+FT and Local again) a small CNN with BatchNorm: the final
                 global model with the client's own BatchNorm layers

A client that was never selected has no personal entries: it is tested with the initial model's
(FedPer, FedRep, FedBN) or the global model (Ditto's copy starts as it); the table counts them
("unseen"; with 100 rounds each client misses all of them with probability 0.9^100 = 3e-5).
"sim" is the simulation's own personalized_accuracy (the round's 10 clients, each after its
round's training) averaged over the last 10 rounds. Times are wall seconds for the run and the
final evaluation, on the vectorized engine (the engine column says which engine trained the last
round: the vectorized one falls back to sequential, with a notice, where it cannot batch). Peak
RSS is the process's, so far (it only grows).

`--memory` measures instead what clients keep: a synthetic run of `--memory-clients` (10,000)
clients of 6 random 28x28 images each, one round with every client (sequential engine), the MLP
(109,386 parameters); FedAvg (keeps nothing), FedPer (the head: 650 parameters) and SCAFFOLD
(a control variate per client: the whole model), each in a child process so that its peak RSS is
its own. It prints the sum of ClientState.nbytes() over the clients and the peak RSS.

    python benchmarks/personalization.py                 # 100 rounds, every method
    python benchmarks/personalization.py --rounds 20 --only fedavg fedper
    python benchmarks/personalization.py --memory
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

import fedforge as ff
from fedforge.algorithms import ClientAlgorithm, ClientState, Ditto, FedBN, FedPer, FedRep
from fedforge.client import train_client
from fedforge.data import Split, federate
from fedforge.engines import engine_choice, make_engine
from fedforge.history import personalized_summary
from fedforge.strategies import Scaffold

NUM_CLIENTS, PER_ROUND, HOLDOUT = 100, 10, 0.2
CLIENT = ff.ClientConfig(local_epochs=1, batch_size=32, lr=0.05)
SEED = 0


def bn_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small CNN with BatchNorm after every hidden layer (as FedBN's digits CNN, scaled down to a
    2-core CPU): conv3x3(8)-BN-pool, conv3x3(16)-BN-pool, fc 64-BN, out; 53k parameters."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * (height // 4) * (width // 4), 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def build(model: str) -> nn.Module:
    if model == "bn-cnn":
        torch.manual_seed(SEED)
        return bn_cnn((1, 28, 28), 10)
    return ff.build_model(model, (1, 28, 28), 10, seed=SEED)


@dataclass(frozen=True)
class Method:
    name: str
    model: str
    algorithm: ClientAlgorithm | None  # None: local training alone


METHODS = {
    "fedavg": Method("FedAvg", "mlp", ClientAlgorithm()),
    "fedper": Method("FedPer", "mlp", FedPer()),
    "fedrep": Method("FedRep", "mlp", FedRep(head_epochs=10)),
    "ditto": Method("Ditto", "mlp", Ditto(lam=0.1)),
    "local": Method("Local", "mlp", None),
    "fedavg-bn": Method("FedAvg", "bn-cnn", ClientAlgorithm()),
    "fedbn": Method("FedBN", "bn-cnn", FedBN()),
    "local-bn": Method("Local", "bn-cnn", None),
}


def held_out(data: ff.FederatedData) -> list[ff.TensorData]:
    assert data.client_test is not None
    return [data.train.subset(np.asarray(rows)) for rows in data.client_test]


def summary(model: nn.Module, states: Callable[[int], dict], tests: list[ff.TensorData]) -> dict[str, float]:
    """Each client's model (`states(c)`) on its held-out examples, summarized across clients."""
    results = []
    for c, test in enumerate(tests):
        evaluation = ff.evaluate(model, states(c), test)
        results.append((evaluation.metrics, len(test)))
    return personalized_summary(results)


def fine_tuned(model: nn.Module, state: dict, data: ff.FederatedData, c: int, epochs: int) -> dict:
    """`state` after `epochs` local epochs of plain SGD on client c's training examples."""
    update = train_client(
        model,
        state,
        data.train.subset(np.asarray(data.partition[c])),
        ff.ClientConfig(local_epochs=epochs, batch_size=CLIENT.batch_size, lr=CLIENT.lr),
        client_id=c,
        generator=torch.Generator().manual_seed(SEED * 1_000 + c),
    )
    return {k: v + update.delta[k] if k in update.delta else v for k, v in state.items()}


def one_more_round(
    model: nn.Module, final: dict, data: ff.FederatedData, c: int, algorithm: ClientAlgorithm, kept: ClientState | None
) -> dict:
    """Client c's personal model after one more round of its algorithm from the final global
    model and what it kept: what the round loop's personalized evaluation tests (FedRep refits its
    head to the final body first; FedAvg's equivalent is FedAvg+FT)."""
    update = train_client(
        model,
        final,
        data.train.subset(np.asarray(data.partition[c])),
        replace(CLIENT, algorithm=algorithm),
        client_id=c,
        generator=torch.Generator().manual_seed(SEED * 1_000 + c),
        client_state=kept,
    )
    state = update.client_state
    if state is not None and state.copy:
        return {**final, **state.copy}
    personal = {k: v + update.delta[k] if k in update.delta else v for k, v in final.items()}
    return {**personal, **(state.personal if state is not None else {})}


def run_method(method: Method, data: ff.FederatedData, rounds: int) -> list[dict]:
    """The method's rows of the table (FedAvg gives two: untouched and fine-tuned)."""
    tests = held_out(data)
    model = build(method.model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    if method.algorithm is None:
        epochs = max(1, round(rounds * PER_ROUND / NUM_CLIENTS))
        row = summary(model, lambda c: fine_tuned(model, initial, data, c, epochs), tests)
        return [_row(method.name, method, row, time.perf_counter() - start, engine="-", note=f"E={epochs}")]

    kept: dict[int, ClientState] = {}

    def on_client(update) -> None:
        if isinstance(update, ff.ClientUpdate) and update.client_state is not None:
            kept[update.client_id] = update.client_state

    engine = make_engine("vectorized")
    result = ff.simulate(
        model,
        data,
        rounds=rounds,
        clients_per_round=PER_ROUND,
        client=replace(CLIENT, algorithm=method.algorithm),
        engine=engine,
        seed=SEED,
        personalized_eval=True,
        on_client=on_client,
    )
    trained = time.perf_counter() - start
    final = {**initial, **result.state.params}
    sim = result.history.column("personalized_accuracy")[-10:]
    sim_mean = float(np.mean([a for a in sim if a is not None]))
    choice = str(engine_choice(engine)).split(" ")[0]
    unseen = NUM_CLIENTS - len(kept)

    def personal(c: int) -> dict:
        state = kept.get(c)
        if state is None:
            return final
        return {**final, **state.personal, **state.copy}

    if method.algorithm.personalizes:
        evaluated = time.perf_counter()
        row = summary(model, personal, tests)
        kept_seconds = trained + time.perf_counter() - evaluated
        evaluated = time.perf_counter()
        again = summary(model, lambda c: one_more_round(model, final, data, c, method.algorithm, kept.get(c)), tests)
        again_seconds = trained + time.perf_counter() - evaluated
        return [
            _row(method.name, method, row, kept_seconds, choice, f"kept model; unseen {unseen}", sim_mean),
            _row(f"{method.name}+1", method, again, again_seconds, choice, "one more round", sim_mean),
        ]
    # Each row's time: the run's, and its own final evaluation.
    evaluated = time.perf_counter()
    global_row = summary(model, lambda c: final, tests)
    global_seconds = trained + time.perf_counter() - evaluated
    evaluated = time.perf_counter()
    ft_row = summary(model, lambda c: fine_tuned(model, final, data, c, 1), tests)
    ft_seconds = trained + time.perf_counter() - evaluated
    return [
        _row(method.name, method, global_row, global_seconds, choice, "global model"),
        _row(f"{method.name}+FT", method, ft_row, ft_seconds, choice, "1 epoch", sim_mean),
    ]


def _row(name, method, row, seconds, engine, note="", sim=None) -> dict:
    return {
        "method": name,
        "model": method.model,
        "accuracy": row["personalized_accuracy"],
        "p10": row["personalized_accuracy_p10"],
        "p90": row["personalized_accuracy_p90"],
        "sim": sim,
        "seconds": seconds,
        "engine": engine,
        "note": note,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def print_row(r: dict) -> None:
    sim = f"{r['sim']:.4f}" if r["sim"] is not None else "   -  "
    print(
        f"{r['method']:<10} {r['model']:<7} {r['accuracy']:.4f}  {r['p10']:.4f}  {r['p90']:.4f}  {sim}  "
        f"{r['seconds']:7.1f}  {r['engine']:<11} {r['peak_rss_gib']:5.2f}  {r['note']}",
        flush=True,
    )


def memory_case(case: str, num_clients: int) -> dict:
    """One round of `num_clients` synthetic clients with every client; what they keep."""
    generator = torch.Generator().manual_seed(SEED)
    examples = 6
    train = ff.TensorData(
        torch.rand(num_clients * examples, 1, 28, 28, generator=generator),
        torch.randint(0, 10, (num_clients * examples,), generator=generator),
    )
    parts = [np.arange(c * examples, (c + 1) * examples) for c in range(num_clients)]
    model = ff.build_model("mlp", (1, 28, 28), 10, seed=SEED)
    algorithm = FedPer() if case == "fedper" else ClientAlgorithm()
    strategy = Scaffold() if case == "scaffold" else ff.FedAvg()
    kept = {"clients": 0, "nbytes": 0}

    def on_client(update) -> None:
        if isinstance(update, ff.ClientUpdate) and update.client_state is not None:
            kept["clients"] += 1
            kept["nbytes"] += update.client_state.nbytes()

    start = time.perf_counter()
    ff.simulate(
        model,
        ff.FederatedData(train, parts),
        rounds=1,
        clients_per_round=num_clients,
        client=ff.ClientConfig(batch_size=10, algorithm=algorithm),
        strategy=strategy,
        engine=make_engine("sequential"),
        seed=SEED,
        on_client=on_client,
    )
    return {
        "case": case,
        **kept,
        "seconds": time.perf_counter() - start,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def memory(num_clients: int) -> None:
    print(f"{num_clients:,} synthetic clients x 6 examples, one round with all of them, MLP, sequential engine")
    print(f"{'case':<9} {'clients keeping':>15} {'state (nbytes)':>21} {'per client':>11} {'peak RSS':>9} seconds")
    for case in ("fedavg", "fedper", "scaffold"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-case", case, "--memory-clients", str(num_clients)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        per = r["nbytes"] / max(r["clients"], 1)
        print(
            f"{case:<9} {r['clients']:>15,} {r['nbytes'] / 2**20:>17,.1f} MiB {per:>9,.0f} B "
            f"{r['peak_rss_gib']:>5.2f} GiB {r['seconds']:>8.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--bn-rounds", type=int, help="rounds of the bn-cnn rows (default: --rounds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared machine: 1)")
    parser.add_argument("--only", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--memory", action="store_true", help="measure the clients' state instead")
    parser.add_argument("--memory-clients", type=int, default=10_000)
    parser.add_argument("--memory-case", choices=("fedavg", "fedper", "scaffold"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_case:
        print(json.dumps(memory_case(args.memory_case, args.memory_clients)))
        return
    if args.memory:
        memory(args.memory_clients)
        return

    bn_rounds = args.bn_rounds or args.rounds
    start = time.perf_counter()
    dataset = ff.load_dataset("fashion-mnist", progress=False)
    split = Split("shards", NUM_CLIENTS, shards_per_client=2, client_test_fraction=HOLDOUT)
    data = federate(dataset, split, seed=SEED)
    data = ff.FederatedData(data.train, data.partition, None, data.client_test)
    print(
        f"Fashion-MNIST, {NUM_CLIENTS} clients x 2 shards ({len(data.partition[0])} train, "
        f"{len(data.client_test[0])} held out each), {PER_ROUND} per round, {args.rounds} rounds "
        f"(bn-cnn {bn_rounds}), "
        f"E={CLIENT.local_epochs} B={CLIENT.batch_size} lr={CLIENT.lr}; "
        f"data loaded in {time.perf_counter() - start:.1f} s"
    )
    print(
        "each client's own held-out accuracy over all 100 clients: mean, p10, p90; sim: the run's own (last 10 rounds)"
    )
    columns = ("method", 10), ("model", 7), ("mean", 7), ("p10", 7), ("p90", 7), ("sim", 7), ("seconds", 8)
    print(" ".join(f"{name:<{width}}" for name, width in columns), f"{'engine':<11} RSS GiB")
    for key in args.only:
        method = METHODS[key]
        for row in run_method(method, data, bn_rounds if method.model == "bn-cnn" else args.rounds):
            print_row(row)


if __name__ == "__main__":
    main()
