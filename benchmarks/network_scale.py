"""Load test: one server holding 1,000 authenticated clients, with 200 idle unauthenticated streams beside them.

The clients are lightweight: coroutines in a few processes, each with its own connection, that
answer every task with a well-formed update of zeros (consistent example and step counts), so
the server does all its real work (authentication, tasks, decoding and checking updates,
aggregation, evaluation, checkpoints) while the clients cost almost nothing. Meanwhile an
attacker process holds 100 sockets that never finish a handshake and 100 gRPC streams that never
authenticate, re-opening each as soon as it is refused, and a probe (an enrolled client that is
never selected) reconnects every 0.5 s and times its welcome. Prints the seconds to connect all
clients, the server's peak memory, the seconds per round, and the probe's worst and median
wait, with and without the attacker.

    python benchmarks/network_scale.py [--clients 1000] [--per-round 100] [--rounds 5] [--groups 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from fedforge.client import ClientConfig, ClientPlan
from fedforge.network.auth import enroll
from fedforge.network.hub import CLIENT_ID_KEY, METHOD, SECRET_KEY
from fedforge.network.wire import Kind, Message, decode, encode

EXAMPLES = 60  # what each client claims: 60,000 Fashion-MNIST examples over 1,000 clients
CONFIG = ClientConfig()  # the tutorial's: 1 epoch, batch 32


def zero_update(task: Message) -> bytes:
    h = task.header
    delta = {
        f"delta/{k[len('global/') :]}": torch.zeros_like(v) for k, v in task.tensors.items() if k.startswith("global/")
    }
    steps = ClientPlan(epochs=h["epochs"], max_steps=h["max_steps"]).num_steps(EXAMPLES, CONFIG)
    return encode(
        Message(
            Kind.UPDATE,
            {"task": h["task"], "num_examples": EXAMPLES, "num_steps": steps, "train_loss": 1.0, "train_accuracy": 0.5},
            delta,
        )
    )


async def light_client(port: int, client_id: int, secret: str, welcomed: list[float]) -> None:
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call = channel.stream_stream(METHOD)(metadata=((CLIENT_ID_KEY, str(client_id)), (SECRET_KEY, secret)))
        while (raw := await call.read()) is not grpc.aio.EOF:
            message = decode(raw)
            if message.kind == Kind.WELCOME:
                welcomed.append(time.monotonic())
            elif message.kind == Kind.TASK:
                await call.write(zero_update(message))
            elif message.kind in (Kind.SHUTDOWN, Kind.REJECT):
                return


def client_group(port: int, secrets: dict[int, str], out: multiprocessing.Queue) -> None:
    torch.set_num_threads(1)
    welcomed: list[float] = []

    async def main():
        started = time.monotonic()
        tasks = [asyncio.create_task(light_client(port, i, s, welcomed)) for i, s in secrets.items()]
        while len(welcomed) < len(secrets):
            await asyncio.sleep(0.05)
        out.put(("connected", time.monotonic() - started))
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def attacker(port: int, stop) -> None:
    """100 sockets that never speak and 100 streams that never authenticate, re-opened when refused."""
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(100)
    ]

    def silent():
        stop.wait()
        yield b""

    def hold(channel):
        while not stop.is_set():
            try:
                for _ in channel.stream_stream(METHOD)(silent(), timeout=10):
                    pass
            except grpc.RpcError:
                pass

    threads = [threading.Thread(target=hold, args=(c,), daemon=True) for c in channels]
    for t in threads:
        t.start()
    stop.wait()
    for s in sockets:
        s.close()


def probe(port: int, client_id: int, secret: str, stop: threading.Event, waits: list[float]) -> None:
    """An enrolled client that is never selected: how long until it is welcomed, every 0.5 s
    (an attempt cut by the server's own end is not counted)."""
    while not stop.wait(0.5):
        started = time.monotonic()
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            call = channel.stream_stream(METHOD)(
                iter(()), metadata=((CLIENT_ID_KEY, str(client_id)), (SECRET_KEY, secret)), timeout=30
            )
            try:
                if decode(next(call)).kind == Kind.WELCOME:
                    waits.append(time.monotonic() - started)
            except grpc.RpcError:
                if not stop.is_set():
                    waits.append(float("inf"))
            call.cancel()


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def run(args, workdir: Path, with_attacker: bool) -> dict:
    tokens = workdir / "tokens.json"
    secrets = {i: enroll(tokens, i) for i in range(args.clients + 1)}  # the last one is the probe's
    name = f"scale-{'attacked' if with_attacker else 'quiet'}"
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
            "--round-timeout",
            "120",
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
    stop, waits, attack_stop = threading.Event(), [], context.Event()
    helpers = [threading.Thread(target=probe, args=(port, args.clients, secrets[args.clients], stop, waits))]
    if with_attacker:  # a process of its own, so that its threads do not slow the probe's
        helpers.append(context.Process(target=attacker, args=(port, attack_stop)))
    for h in helpers:
        h.start()
    out = context.Queue()
    ids = list(range(args.clients))
    groups = [
        context.Process(target=client_group, args=(port, {i: secrets[i] for i in ids[g :: args.groups]}, out))
        for g in range(args.groups)
    ]
    for g in groups:
        g.start()
    connect = max(out.get(timeout=300)[1] for _ in groups)
    peak = 0.0
    while server.poll() is None:
        peak = max(peak, peak_rss_mb(server.pid))
        time.sleep(0.2)
        if server.poll() is None and not stop.is_set() and (workdir / name / "history.json").exists():
            rounds_done = len(json.loads((workdir / name / "history.json").read_text())["rounds"]) - 1
            if rounds_done >= args.rounds - 1:
                stop.set()  # the probe stops before the server does
    stop.set()
    attack_stop.set()
    for h in helpers:
        h.join(30)
    for g in groups:
        g.join(60)
    history = workdir / name / "history.json"
    if server.returncode != 0 or not history.exists():
        raise SystemExit(f"the run failed:\n{(workdir / f'{name}.log').read_text()[-3000:]}")
    rounds = json.loads(history.read_text())["rounds"][1:]
    return {"connect": connect, "peak": peak, "round": statistics.median(r["seconds"] for r in rounds), "waits": waits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--groups", type=int, default=4)
    args = parser.parse_args()
    print(
        f"{args.clients} lightweight clients in {args.groups} processes, {args.per_round} updates per round, "
        f"{args.rounds} rounds, MLP on Fashion-MNIST, 127.0.0.1"
    )
    print(f"{'':<34}{'connect s':>10}{'peak MB':>9}{'s/round':>9}{'probe max s':>13}{'probe median s':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for with_attacker in (False, True):
            r = run(args, Path(tmp), with_attacker)
            label = "with 200 idle unauthenticated" if with_attacker else "alone"
            waits = r["waits"] or [float("nan")]
            print(
                f"{label:<34}{r['connect']:>10.1f}{r['peak']:>9.0f}{r['round']:>9.2f}{max(waits):>13.3f}"
                f"{statistics.median(waits):>16.3f}"
            )
    print("probe: an enrolled client never selected, reconnecting every 0.5 s: seconds until it is welcomed")


if __name__ == "__main__":
    main()
