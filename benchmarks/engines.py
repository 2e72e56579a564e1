"""Engines benchmark: the tutorial's loop, `sequential` and `vectorized`, measured in one run.

W1  the tutorial's experiment: Fashion-MNIST, 10 clients x 6000, 5 per round, E=1, B=32, MLP,
    5 rounds. Seconds per round and for the whole run (data loading included, interpreter
    start excluded); training GFLOP/s = 6 x parameters x examples / training seconds, and its
    ratio to a float32 2048x2048 torch.matmul measured in the same run.
W2  cross-device: 1,000 clients from a Dirichlet(0.3) partition, 100 per round, E=1, B=10, MLP.
    Besides the two engines: a per-client torch loop (what a Flower client does: a model copy,
    torch.optim.SGD and a DataLoader per client, here over in-memory tensors), and the bound
    this machine puts on any engine: the round's training and evaluation FLOPs at the matmul rate.
W3  scale: 10,000 clients (IID, 6 examples each), 1,000 per round and all 10,000 in one round,
    E=1, B=10, MLP; vectorized. Each W3 case runs in a child process so that its peak resident
    memory is its own.
W4  tasks beyond the tutorial's, on synthetic data of the shapes they take, sequential against
    vectorized (torch.func) in one process, alternating: regression on tabular rows
    (tabular-mlp, Adam), classification of 28x28 images with Adam (mlp; cnn), and a character
    language model (char-lstm, LEAF's Shakespeare model; Embedding+Linear). Seconds per round.

With `--baseline REV` W1's fedforge rows are timed again, each whole run in a child process,
alternating between this checkout and a `git worktree` of commit REV (the code before a
change), `--repeats` times; the medians and their ratio are printed.

    python benchmarks/engines.py            # everything, one table
    python benchmarks/engines.py --only w1
    python benchmarks/engines.py --only w1 --baseline e72f933 --repeats 5
    python benchmarks/engines.py --only w1 --device cuda     # fedforge's W1 rows on a GPU
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from tutorial_vs_fedforge import tutorial

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.data import dirichlet, iid, load_dataset
from fedforge.engines import engine_choice, make_engine
from fedforge.evaluation import evaluate
from fedforge.models import build_model, count_parameters

DATASET = "fashion-mnist"
TEST_EXAMPLES = 10_000


def matmul_gflops(n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """The float32 rate of an n x n torch.matmul on `device` (the median of `repeats`), in GFLOP/s."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def fedforge_run(
    engine: str,
    *,
    num_clients: int,
    per_round,
    rounds: int,
    batch_size: int,
    partition: str = "iid",
    alpha: float = 0.3,
    seed: int = 0,
    model_name: str = "mlp",
    test_examples: int | None = None,
    device: str = "cpu",
    warmup: int = 0,
    algorithm=None,
) -> dict:
    """One whole run from loading the data to the last evaluation. The medians leave out round 0
    (the initial evaluation) and the `warmup` rounds after it; the test set is its first
    `test_examples` (all of it by default). `algorithm`: the clients' (a `fedforge.algorithms`
    ClientAlgorithm; plain training by default)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    data = load_dataset(DATASET, progress=False)
    parts = split_clients(data, num_clients, partition, alpha, seed)
    model = build_model(model_name, data.input_shape, data.num_classes, seed=seed)
    engine_object = make_engine(engine)
    result = simulate(
        model,
        FederatedData(data.train, parts, data.test.rows(0, test_examples or len(data.test))).to(device),
        rounds=rounds,
        clients_per_round=per_round,
        # `algorithm` only when given: --baseline runs this file against trees from before it existed.
        client=ClientConfig(batch_size=batch_size, lr=0.01, **({"algorithm": algorithm} if algorithm else {})),
        engine=engine_object,
        seed=seed,
    )
    whole, whole_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    records = result.history.records[1 + warmup :]
    examples = sum(sum(len(parts[c]) for c in r.clients) for r in records)
    train_seconds = sum(r.train_seconds for r in records)
    return {
        "per_round": statistics.median(r.seconds for r in records),
        "training": statistics.median(r.train_seconds for r in records),
        "evaluation": statistics.median(r.seconds - r.train_seconds for r in records),
        "examples_per_round": examples / len(records),
        "whole": whole,
        "whole_cpu": whole_cpu,
        "gflops": 6 * count_parameters(model) * examples / train_seconds / 1e9,
        "accuracy": result.history.final.test_accuracy,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "engine_choice": str(engine_choice(engine_object)),
    }


def split_clients(data, num_clients: int, partition: str, alpha: float = 0.3, seed: int = 0) -> list[np.ndarray]:
    """The training set's indices of each client: an IID split, or Dirichlet(alpha) over the labels."""
    rng = np.random.default_rng(seed)
    if partition == "iid":
        return iid(len(data.train), num_clients, rng=rng)
    return dirichlet(data.train.y.numpy(), num_clients, alpha=alpha, rng=rng)


def w1(peak: float, device: str = "cpu") -> list[str]:
    rows = []
    if device == "cpu":  # the tutorial's loop runs on the CPU only
        start = time.perf_counter()
        seconds, accuracy = tutorial(DATASET, 5, 0)
        whole = time.perf_counter() - start
        params = count_parameters(build_model("mlp", (1, 28, 28), 10))
        gflops = 6 * params * 5 * 6000 * 5 / sum(seconds) / 1e9  # includes its evaluation: an upper bound
        rows.append(
            f"W1 tutorial loop   {statistics.median(seconds):8.3f} s/round  {whole:6.2f} s whole run  "
            f"<= {gflops:5.1f} GFLOP/s ({gflops / peak:4.0%} of matmul)  acc {accuracy:.4f}"
        )
    for engine in ("sequential", "vectorized"):
        r = fedforge_run(engine, num_clients=10, per_round=5, rounds=5, batch_size=32, device=device)
        rows.append(
            f"W1 {engine:<15} {r['per_round']:8.3f} s/round  {r['whole']:6.2f} s whole run  "
            f"   {r['gflops']:5.1f} GFLOP/s ({r['gflops'] / peak:4.0%} of matmul)  acc {r['accuracy']:.4f}"
        )
    return rows


def torch_loop_run(
    *,
    num_clients: int,
    per_round: int,
    rounds: int,
    batch_size: int,
    partition: str = "dirichlet",
    alpha: float = 0.3,
    seed: int = 0,
    model_name: str = "mlp",
    test_examples: int | None = None,
    warmup: int = 0,
) -> dict:
    """One client after another as a Flower client trains: a copy of the global model,
    torch.optim.SGD and a shuffled DataLoader over the client's tensors; example-weighted average;
    the test set (its first `test_examples`) evaluated every round. The median leaves out the
    first `warmup` rounds."""
    data = load_dataset(DATASET, progress=False)
    parts = split_clients(data, num_clients, partition, alpha, seed)
    test = data.test.rows(0, test_examples or len(data.test))
    random.seed(seed)
    torch.manual_seed(seed)
    loaders = [
        DataLoader(TensorDataset(data.train.x[p], data.train.y[p]), batch_size=batch_size, shuffle=True) for p in parts
    ]
    global_model = build_model(model_name, data.input_shape, data.num_classes, seed=seed)
    seconds, train_seconds = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        total, average = 0, None
        for c in random.sample(range(num_clients), per_round):
            local = copy.deepcopy(global_model)
            optimizer = torch.optim.SGD(local.parameters(), lr=0.01)
            for x, y in loaders[c]:
                optimizer.zero_grad()
                F.cross_entropy(local(x), y).backward()
                optimizer.step()
            n = len(parts[c])
            weights = {k: v.detach() * n for k, v in local.state_dict().items()}
            average = weights if average is None else {k: average[k] + weights[k] for k in average}
            total += n
        global_model.load_state_dict({k: v / total for k, v in average.items()})
        train_seconds.append(time.perf_counter() - start)
        accuracy = evaluate(global_model, global_model.state_dict(), test).accuracy
        seconds.append(time.perf_counter() - start)
    return {
        "per_round": statistics.median(seconds[warmup:]),
        "training": statistics.median(train_seconds[warmup:]),
        "accuracy": accuracy,
    }


def w2(peak: float, rounds: int = 3) -> list[str]:
    setting = dict(num_clients=1000, per_round=100, rounds=rounds, batch_size=10)
    results = {
        engine: fedforge_run(engine, partition="dirichlet", alpha=0.3, **setting)
        for engine in ("sequential", "vectorized")
    }
    loop = torch_loop_run(**setting)
    rows = [f"W2 {engine:<15} {r['per_round']:8.3f} s/round  acc {r['accuracy']:.4f}" for engine, r in results.items()]
    rows.append(
        f"W2 per-client loop {loop['per_round']:8.3f} s/round  acc {loop['accuracy']:.4f}  "
        f"(torch.optim + DataLoader per client)"
    )
    sequential, vectorized = results["sequential"]["per_round"], results["vectorized"]["per_round"]
    rows.append(
        f"W2 vectorized is {sequential / vectorized:.1f}x faster per round than sequential "
        f"({results['sequential']['training'] / results['vectorized']['training']:.1f}x in training alone), "
        f"{loop['per_round'] / vectorized:.1f}x faster than the per-client loop"
    )
    params = count_parameters(build_model("mlp", (1, 28, 28), 10))
    train_floor = 6 * params * results["vectorized"]["examples_per_round"] / (peak * 1e9)
    eval_floor = 2 * params * TEST_EXAMPLES / (peak * 1e9)
    rows.append(
        f"W2 bound: at the matmul rate a round's training takes {train_floor:.3f} s and its evaluation "
        f"{eval_floor:.3f} s (measured: {results['vectorized']['evaluation']:.3f} s), so no engine can be "
        f"more than {sequential / (train_floor + eval_floor):.1f}x faster per round than sequential here "
        f"({results['sequential']['training'] / train_floor:.1f}x in training alone)"
    )
    return rows


def w3_case(per_round: int) -> dict:
    return fedforge_run("vectorized", num_clients=10_000, per_round=per_round, rounds=2, batch_size=10)


def w3() -> list[str]:
    rows = []
    for per_round in (1000, 10_000):
        out = subprocess.run(
            [sys.executable, __file__, "--w3-case", str(per_round)], capture_output=True, text=True, check=True
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(
            f"W3 vectorized, {per_round:>6} clients/round {r['per_round']:8.3f} s/round  "
            f"peak RSS {r['peak_rss_gib']:.2f} GiB"
        )
    return rows


def _tasks_case(name: str):
    """W4's cases: (model, FederatedData, ClientConfig, clients per round), on synthetic data."""
    from torch import nn

    from fedforge.data import TensorData
    from fedforge.tasks import LANGUAGE_MODEL, REGRESSION, make_task

    g = torch.Generator().manual_seed(0)
    if name == "regression":  # 100 clients of 40-160 rows of 10 features
        x = torch.randn(16_100, 10, generator=g)
        data = TensorData(x, x @ torch.randn(10, generator=g) + 0.1 * torch.randn(16_100, generator=g))
        sizes = np.random.default_rng(0).integers(40, 161, 100)
        task, model, per_round, batch = REGRESSION.with_optimizer("adam"), build_model("tabular-mlp", (10,), 1), 20, 16
    elif name in ("mlp", "cnn"):  # 20 clients of 300 images
        y = torch.randint(0, 10, (6000,), generator=g)
        x = torch.randn(6000, 1, 28, 28, generator=g)
        x[torch.arange(6000), 0, y, y] += 3.0
        data, sizes = TensorData(x, y), [300] * 20
        task, model = make_task("classification", optimizer="adam"), build_model(name, (1, 28, 28), 10)
        per_round, batch = (10, 32) if name == "mlp" else (4, 32)
    else:  # 20 clients of 40 sequences of 80 characters (LEAF's Shakespeare shapes)
        tokens = torch.randint(0, 80, (800, 81), generator=g)
        data, sizes = TensorData(tokens[:, :-1], tokens[:, 1:]), [40] * 20
        task, per_round, batch = LANGUAGE_MODEL.with_optimizer("adam"), 5, 10
        model = (
            build_model("char-lstm", (80,), 80)
            if name == "char-lstm"
            else nn.Sequential(nn.Embedding(80, 32), nn.Linear(32, 80))
        )
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts = [np.arange(a, b) for a, b in itertools.pairwise(bounds)]
    return model, FederatedData(data, parts, None), ClientConfig(batch_size=batch, lr=0.001, task=task), per_round


def w4(rounds: int = 3, repeats: int = 3) -> list[str]:
    rows = []
    for name in ("regression", "mlp", "cnn", "embedding", "char-lstm"):
        model, data, config, per_round = _tasks_case(name)
        seconds: dict[str, list[float]] = {"sequential": [], "vectorized": []}
        for _ in range(repeats):
            for engine in seconds:
                result = simulate(
                    copy.deepcopy(model),
                    data,
                    rounds=rounds,
                    clients_per_round=per_round,
                    client=config,
                    engine=make_engine(engine),
                    seed=0,
                )
                seconds[engine] += [r.train_seconds for r in result.history.records[1:]]
        sequential, vectorized = statistics.median(seconds["sequential"]), statistics.median(seconds["vectorized"])
        rows.append(
            f"W4 {name:<11} {config.task.name:<15} {config.task.optimizer.__name__:<5} {per_round:3d} "
            f"clients/round  sequential {sequential:7.3f} s  vectorized {vectorized:7.3f} s  "
            f"({sequential / vectorized:4.2f}x)"
        )
    return rows


def w1_case(engine: str) -> dict:
    r = fedforge_run(engine, num_clients=10, per_round=5, rounds=5, batch_size=32)
    import fedforge

    return {**r, "fedforge": fedforge.__file__}


def w1_against(revision: str, repeats: int) -> list[str]:
    """W1's whole runs here and at `revision` (a git worktree), alternating, each in a child process."""
    repo = Path(__file__).resolve().parent.parent
    folder = Path(tempfile.mkdtemp(prefix="fedforge-baseline-"))
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", str(folder), revision], check=True, capture_output=True
    )
    try:
        trees = {"baseline": folder / "src", "this": repo / "src"}
        whole: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        for _ in range(repeats):
            for engine in ("sequential", "vectorized"):
                for tree, src in trees.items():
                    out = subprocess.run(
                        [sys.executable, __file__, "--w1-case", engine],
                        capture_output=True,
                        text=True,
                        check=True,
                        env={**os.environ, "PYTHONPATH": str(src)},
                    ).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    if not r["fedforge"].startswith(str(src)):
                        raise RuntimeError(f"the child imported {r['fedforge']}, not fedforge from {src}")
                    whole.setdefault((engine, tree), []).append(r["whole"])
                    cpu.setdefault((engine, tree), []).append(r["whole_cpu"])
    finally:
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "remove", "--force", str(folder)], check=False, capture_output=True
        )
    # A shared machine's noise comes in bursts that only lengthen runs: the fastest run and the
    # CPU seconds (which exclude time the process waited for a core) are the steadier measures.
    rows = []
    for engine in ("sequential", "vectorized"):
        for what, times in (("wall", whole), ("cpu", cpu)):
            old, new = times[engine, "baseline"], times[engine, "this"]
            runs = " ".join(f"{t:.2f}" for t in old) + " | " + " ".join(f"{t:.2f}" for t in new)
            rows.append(
                f"W1 {engine:<10} whole run, {what:>4} s: {revision} median {statistics.median(old):5.2f} "
                f"min {min(old):5.2f}; this checkout median {statistics.median(new):5.2f} min {min(new):5.2f}; "
                f"ratio of medians {statistics.median(new) / statistics.median(old):4.2f}, of minima "
                f"{min(new) / min(old):4.2f} (runs {runs})"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["w1", "w2", "w3", "w4"])
    parser.add_argument("--baseline", metavar="REV", help="also time W1 at git revision REV, alternating")
    parser.add_argument("--repeats", type=int, default=3, help="--baseline: runs of each engine per tree")
    parser.add_argument("--w3-case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--w1-case", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="W1 only: where the data, the model and the matmul are")
    args = parser.parse_args()
    if args.device != "cpu" and (args.only != "w1" or args.baseline):
        parser.error("--device is for --only w1 (without --baseline)")
    if args.w3_case:
        print(json.dumps(w3_case(args.w3_case)))
        return
    if args.w1_case:
        print(json.dumps(w1_case(args.w1_case)))
        return
    load_dataset(DATASET, progress=False)  # the first load decodes and caches; every run below is warm
    peak = matmul_gflops(device=args.device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32 matmul 2048x2048 on {args.device}: "
        f"{peak:.1f} GFLOP/s"
    )
    for name, workload in (("w1", lambda: w1(peak, args.device)), ("w2", lambda: w2(peak)), ("w3", w3), ("w4", w4)):
        if args.only in (None, name):
            for row in workload():
                print(row, flush=True)
            if name == "w1" and args.baseline:
                for row in w1_against(args.baseline, args.repeats):
                    print(row, flush=True)


if __name__ == "__main__":
    main()
