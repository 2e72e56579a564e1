"""Load test: one server and 100 clients on 127.0.0.1, against the simulation of the same run.

The tutorial's model and client SGD on Fashion-MNIST, 100 clients (IID, 600 examples each), 50
per round, 5 rounds. The clients run as threads in 4 processes (25 each, one torch thread per
process). Prints seconds per round for the networked run and for the simulation, the bytes each
selected client receives and sends per round, and the same run with int8-compressed updates:
its bytes, the relative error compression puts on an update, and the accuracy it ends at.

    python benchmarks/network_load.py [--clients 100] [--per-round 50] [--rounds 5] [--groups 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from fedforge.client import ClientPlan, ClientUpdate
from fedforge.config import Config
from fedforge.engines import ClientTask
from fedforge.engines.network import task_message
from fedforge.experiment import run_experiment
from fedforge.models import build_model
from fedforge.network.auth import enroll
from fedforge.network.client import PartitionOf, run_client, update_message
from fedforge.network.wire import decode, encode


def client_group(port: int, ids: list[int], secrets: dict[int, str], count: int, compression: str | None) -> None:
    torch.set_num_threads(1)
    threads = [
        threading.Thread(
            target=run_client,
            args=(f"127.0.0.1:{port}", i, secrets[i], PartitionOf("fashion-mnist", i, count)),
            kwargs={"root_cert": None, "compression": compression, "give_up_after": 60},
        )
        for i in ids
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def networked(args, workdir: Path, compression: str | None) -> list[dict]:
    tokens = workdir / "tokens.json"
    secrets = {i: enroll(tokens, i) for i in range(args.clients)}
    name = f"net-{compression or 'exact'}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedforge",
            "server",
            "-q",
            "--insecure",
            "--threads",
            "1",
            "--tokens",
            str(tokens),
            "--address",
            "127.0.0.1:0",
            "--dataset",
            "fashion-mnist",
            "--num-clients",
            str(args.clients),
            "--clients-per-round",
            str(args.per_round),
            "--rounds",
            str(args.rounds),
            "--min-clients",
            str(args.clients),
            "--out-dir",
            str(workdir),
            "--name",
            name,
        ],
        stdout=subprocess.PIPE,
        stderr=(workdir / f"{name}.log").open("w"),
        text=True,
    )
    port = int(next(line for line in server.stdout if "listening on port" in line).split()[-1])
    context = multiprocessing.get_context("spawn")
    groups = [
        context.Process(
            target=client_group,
            args=(port, list(range(g, args.clients, args.groups)), secrets, args.clients, compression),
        )
        for g in range(args.groups)
    ]
    for g in groups:
        g.start()
    server.wait()
    for g in groups:
        g.join(60)
    rounds = json.loads((workdir / name / "history.json").read_text())["rounds"]
    if len(rounds) != args.rounds + 1:
        raise SystemExit(f"the networked run did not finish:\n{(workdir / f'{name}.log').read_text()[-3000:]}")
    return rounds


def message_bytes(compression: str | None) -> tuple[int, int, float]:
    """Bytes of one task and one update of the MLP, and the relative error of the update."""
    model = build_model("mlp", (1, 28, 28), 10)
    state = model.state_dict()
    torch.manual_seed(0)
    delta = {k: torch.randn_like(v) * 0.01 for k, v in state.items()}
    task = encode(task_message(1, ClientTask(0, None, 0, plan=ClientPlan()), state))
    update = encode(update_message(1, ClientUpdate(0, delta, 600, 19, 0.5, 0.8)), compression=compression)
    back = decode(update).tensors
    error = (
        torch.cat([(back[f"delta/{k}"] - v).flatten() for k, v in delta.items()]).norm()
        / torch.cat([v.flatten() for v in delta.values()]).norm()
    )
    return len(task), len(update), float(error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--groups", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config = Config(
            dataset="fashion-mnist",
            num_clients=args.clients,
            clients_per_round=args.per_round,
            rounds=args.rounds,
            out_dir=str(workdir),
            name="sim",
        )
        simulated = run_experiment(config, progress=False, verbose=False).history.records[1:]
        rows = [
            (
                "simulation (auto engine)",
                statistics.median(r.seconds for r in simulated),
                simulated[-1].test_accuracy,
                None,
            )
        ]
        for compression in (None, "int8"):
            history = networked(args, workdir, compression)[1:]
            rows.append(
                (
                    f"network, {compression or 'exact'} updates",
                    statistics.median(r["seconds"] for r in history),
                    history[-1]["test_accuracy"],
                    compression,
                )
            )
    print(
        f"{args.clients} clients ({args.groups} processes), {args.per_round} per round, {args.rounds} rounds, "
        f"MLP on Fashion-MNIST, 127.0.0.1"
    )
    print(f"{'':<30}{'s/round':>9}{'accuracy':>10}{'down KB':>9}{'up KB':>8}{'update error':>14}")
    for label, seconds, accuracy, compression in rows:
        if label.startswith("network"):
            down, up, error = message_bytes(compression)
            print(f"{label:<30}{seconds:>9.2f}{accuracy:>10.4f}{down / 1024:>9.0f}{up / 1024:>8.0f}{error:>14.2e}")
        else:
            print(f"{label:<30}{seconds:>9.2f}{accuracy:>10.4f}")
    print("down/up: bytes each selected client receives (the global model) and sends (its update) per round")


if __name__ == "__main__":
    main()
