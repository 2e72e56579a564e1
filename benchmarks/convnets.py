"""Convolutional networks benchmark (issue 24): fedforge's engines, the tutorial's loop and Flower, in one run.

Every workload: Fashion-MNIST, the whole training set split IID across the clients, E=1, B=32,
SGD lr 0.01, seed 0, 5 rounds, each engine (`sequential`, `vectorized`, `auto`) in turn. A
round's time is the median of rounds 2-5 (round 1 warms up): the whole round and its training
part (selection, the clients' training and aggregation; the rest is the evaluation).

CNN     NIID-Bench's simple CNN (`simple-cnn`, 44,426 parameters), 100 clients of 600 examples,
        10 per round, evaluated on the 10,000 test images. Also the tutorial's loop (a copy of the
        global model per client, torch.optim.SGD, shuffled mini-batches from a DataLoader over
        tensors, example-weighted average, evaluation each round: engines.torch_loop_run) and,
        with --flower, Flower 1.x's simulation of the same clients (flower_run.py, in its own
        environment: 2 actors of 1 CPU, as benchmarks/ray_scale.py runs it for W2).
XDEV    cross-device: simple-cnn, 1,000 clients of 60 examples, 100 per round, evaluated on the
        10,000 test images. B=32 is kept though it does not divide 60: each client takes two steps,
        of 32 and 28 examples.
RESNET  `resnet8` (a small ResNet with BatchNorm, 77,754 parameters), 500 clients of 120
        examples, 20 per round, evaluated on the first 2,000 test images: a round of a few seconds
        on a 2-core CPU (70 GFLOP, as much as 5 rounds of CNN).
FEDBN   RESNET's run under FedBN (issue 25: each client keeps its BatchNorm layers, weights and
        statistics), sequential against vectorized: the clients start from their own BatchNorm
        entries, stacked per client.

FLOPs are counted, not guessed: forward hooks on every Conv2d and Linear give the forward FLOPs
per example (2 x multiply-adds: a convolution's output elements x in_channels/groups x kh x kw, a
linear layer's in x out per row). Training an example costs 3 x forward (forward, input gradient,
weight gradient) less the first layer's input gradient, which nobody computes; evaluating one
costs 1 x forward. The roofline is a round's FLOPs at the float32 matmul rate measured in the same
run; "x roofline" is a round's time as a multiple of it. The machine's load average (1 minute)
before each run is given beside it, as a shared machine's busy spells lengthen rounds.

    python benchmarks/convnets.py                          # every workload, one table
    python benchmarks/convnets.py --only cnn --rounds 3
    python benchmarks/convnets.py --flower /tmp/flwr/bin/python   # and Flower on CNN
    python benchmarks/convnets.py --device cuda            # on a GPU (no tutorial loop, no Flower)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from engines import DATASET, fedforge_run, matmul_gflops, split_clients, torch_loop_run
from ray_scale import flower_spec, measure_flower

from fedforge.algorithms import CLIENT_ALGORITHMS
from fedforge.data import load_dataset
from fedforge.models import build_model, count_parameters

ENGINES = ("sequential", "vectorized", "auto")
BATCH_SIZE = 32
TRAIN_EXAMPLES = 60_000


@dataclass(frozen=True)
class Workload:
    model: str
    num_clients: int  # each holds TRAIN_EXAMPLES / num_clients examples
    per_round: int
    test_examples: int = 10_000
    algorithm: str = "fedavg"  # the clients' (fedforge.algorithms.CLIENT_ALGORITHMS)

    @property
    def examples(self) -> int:
        return TRAIN_EXAMPLES // self.num_clients


WORKLOADS = {
    "cnn": Workload("simple-cnn", num_clients=100, per_round=10),
    "xdev": Workload("simple-cnn", num_clients=1000, per_round=100),
    "resnet": Workload("resnet8", num_clients=500, per_round=20, test_examples=2000),
    "fedbn": Workload("resnet8", num_clients=500, per_round=20, test_examples=2000, algorithm="fedbn"),
}


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """The forward FLOPs of one example through every Conv2d and Linear of `model`, and those of
    the first such layer (counted from the shapes the layers see, by forward hooks)."""
    flops: list[int] = []

    def count(module: nn.Module, inputs, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            flops.append(2 * output.numel() * module.in_channels // module.groups * kh * kw)
        else:  # Linear: in x out multiply-adds per row
            flops.append(2 * output.numel() * module.in_features)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [layer.register_forward_hook(count) for layer in layers]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sum(flops), flops[0]


def round_flops(workload: Workload) -> tuple[float, float]:
    """A round's training and evaluation FLOPs."""
    forward, first = forward_flops(build_model(workload.model, (1, 28, 28), 10), (1, 28, 28))
    train = workload.per_round * workload.examples * (3 * forward - first)  # no input gradient for the first layer
    return train, workload.test_examples * forward


def plain_pytorch(workload: Workload, device: str, repeats: int = 2) -> dict:
    """The same FLOPs without federation: one model trained with PyTorch alone on as many training
    examples as a round's clients hold (autograd, an SGD step per batch), then evaluated on the test
    images, each part at its fastest over batch sizes and memory layouts. What PyTorch's own kernels
    make of this network on this machine, the bound any engine built on them meets."""
    data = load_dataset(DATASET, progress=False)
    x = data.train.x[: workload.per_round * workload.examples].to(device)
    y = data.train.y[: len(x)].to(device)
    test_x, test_y = data.test.x[: workload.test_examples].to(device), data.test.y[: workload.test_examples].to(device)
    best = {"training": float("inf"), "evaluation": float("inf")}
    for layout in (torch.contiguous_format, torch.channels_last):
        model = build_model(workload.model, (1, 28, 28), 10).to(device).to(memory_format=layout)
        params = list(model.parameters())
        for batch in (BATCH_SIZE, 10 * BATCH_SIZE):
            for _ in range(repeats):
                start = time.perf_counter()
                model.train()
                for i in range(0, len(x), batch):
                    loss = F.cross_entropy(model(x[i : i + batch].contiguous(memory_format=layout)), y[i : i + batch])
                    grads = torch.autograd.grad(loss, params)
                    with torch.no_grad():
                        torch._foreach_add_(params, grads, alpha=-0.01)
                _synchronize(device)
                best["training"] = min(best["training"], time.perf_counter() - start)
        for _ in range(repeats):
            start = time.perf_counter()
            model.eval()
            correct = 0
            with torch.no_grad():
                for i in range(0, len(test_x), 1024):
                    correct += int(
                        (
                            model(test_x[i : i + 1024].contiguous(memory_format=layout)).argmax(1)
                            == test_y[i : i + 1024]
                        ).sum()
                    )
            _synchronize(device)
            best["evaluation"] = min(best["evaluation"], time.perf_counter() - start)
    return {
        "per_round": best["training"] + best["evaluation"],
        "training": best["training"],
        "accuracy": correct / len(test_x),
    }


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def row(label: str, engine: str, r: dict, roofline: float, load: float, note: str = "") -> str:
    training = f"{r['training']:8.3f}" if r.get("training") is not None else f"{'':8}"
    return (
        f"{label:<6} {engine:<14} {r['per_round']:8.3f} {training} {r['per_round'] / roofline:9.1f}x "
        f"{r['accuracy']:8.4f} {load:5.1f}  {note}"
    )


def run_workload(name: str, workload: Workload, peak: float, args) -> list[str]:
    train, evaluation = round_flops(workload)
    roofline = (train + evaluation) / (peak * 1e9)
    params = count_parameters(build_model(workload.model, (1, 28, 28), 10))
    label = name.upper()
    rows = [
        f"{label}: {workload.model} ({params:,} parameters), {workload.num_clients} clients of {workload.examples}, "
        f"{workload.per_round} per round, B={BATCH_SIZE}; {train / 1e9:.2f} GFLOP training + "
        f"{evaluation / 1e9:.2f} GFLOP evaluation ({workload.test_examples:,} test images) = "
        f"{(train + evaluation) / 1e9:.2f} GFLOP per round; roofline {roofline:.3f} s"
    ]
    print(rows[-1], flush=True)
    setting = dict(
        num_clients=workload.num_clients,
        per_round=workload.per_round,
        rounds=args.rounds,
        batch_size=BATCH_SIZE,
        model_name=workload.model,
        test_examples=workload.test_examples,
        warmup=1,
    )
    if workload.algorithm != "fedavg":  # fedforge's engines only: the others have no client algorithms
        setting["algorithm"] = CLIENT_ALGORITHMS[workload.algorithm]()
        for engine in ENGINES[:2]:
            load = os.getloadavg()[0]
            r = fedforge_run(engine, partition="iid", device=args.device, **setting)
            rows.append(row(label, engine, r, roofline, load, f"trained by {r['engine_choice']}"))
            print(rows[-1], flush=True)
        return rows
    per_round = {}
    for engine in ENGINES:
        load = os.getloadavg()[0]
        r = fedforge_run(engine, partition="iid", device=args.device, **setting)
        per_round[engine] = r["per_round"]
        rows.append(row(label, engine, r, roofline, load, f"trained by {r['engine_choice']}"))
        print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    plain = plain_pytorch(workload, args.device)
    rows.append(row(label, "plain PyTorch", plain, roofline, load, "one model, the round's examples, no federation"))
    print(rows[-1], flush=True)
    if name != "cnn":
        return rows
    if args.device != "cpu":
        rows.append(f"{label:<6} (the tutorial's loop and Flower run on the CPU only)")
        return rows
    load = os.getloadavg()[0]
    loop = torch_loop_run(partition="iid", **setting)
    rows.append(row(label, "tutorial loop", loop, roofline, load, "torch.optim + DataLoader per client"))
    print(rows[-1], flush=True)
    if args.flower:
        with tempfile.TemporaryDirectory() as tmp:
            parts = split_clients(load_dataset(DATASET, progress=False), workload.num_clients, "iid")
            model = build_model(workload.model, (1, 28, 28), 10)
            spec = flower_spec(
                str(Path(tmp) / "cnn.npz"), parts, per_round=workload.per_round, batch_size=BATCH_SIZE, model=model
            )
            load = os.getloadavg()[0]
            flower = measure_flower(args.flower, args.rounds, spec)
        flower["training"] = None  # Flower's rounds are timed between its evaluations only
        rows.append(row(label, "flower", flower, roofline, load, "flwr simulation, 2 actors x 1 CPU"))
        best = min(per_round, key=per_round.get)
        ratio = flower["per_round"] / per_round[best]
        faster = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
        rows.append(f"{label:<6} fedforge's best engine ({best}) is {faster} than Flower per round")
        print(*rows[-2:], sep="\n", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(WORKLOADS), action="append", help="a workload (repeatable)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (the medians leave out round 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the data, the models and the matmul are")
    parser.add_argument(
        "--flower",
        metavar="PYTHON",
        help="also CNN on Flower's simulation, run by this Python (an environment with flwr[simulation] and torch)",
    )
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is left out of the medians)")
    load_dataset(DATASET, progress=False)  # the first load decodes and caches; every run below is warm
    peak = matmul_gflops(device=args.device)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}; float32 matmul 2048x2048 on "
        f"{args.device}: {peak:.1f} GFLOP/s; {args.rounds} rounds, medians of rounds 2-{args.rounds}",
        flush=True,
    )
    rows = [f"{'':6} {'engine':<14} {'s/round':>8} {'train s':>8} {'x roofline':>10} {'accuracy':>8}  load"]
    for name, workload in WORKLOADS.items():
        if args.only is None or name in args.only:
            rows += run_workload(name, workload, peak, args)
    print("", *rows, sep="\n")


if __name__ == "__main__":
    main()
