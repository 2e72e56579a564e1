"""Secure aggregation's cost in a deployment: bytes up per client and server seconds per round, with and without it.

The tutorial's run over the network: the MLP (784-128-64-10: 109,386 float32 parameters) on Fashion-MNIST, IID over
n clients, all n in every round (clients per round = min clients = quorum = n), 1 local epoch, batch 32, SGD lr 0.01,
FedAvg, `--rounds` rounds. For each n two deployments: `plain` (each client sends its float32 update) and `secure`
(`NetworkEngine(secure=SecureAggregation())`, what `fedforge server --secure-aggregation` runs by default: threshold
0.5, every other client a neighbour up to 64 participants, a random Harary graph of degree 2 * ceil(2 * log2 n)
above). The server (Hub + NetworkEngine + run_experiment, built as `fedforge.server.serve` builds them) runs in this
process, listening on 127.0.0.1 on an insecure (plaintext) channel, with one torch thread; the n clients (`run_client`,
real training on their Fashion-MNIST part) run as threads in `--groups` spawned processes, one torch thread each.

Server side, per round (means over the rounds):
  up B/client    bytes of the messages the server received from each client in the round: the raw messages the hub
                 hands the round loop (`hub.events`), before decoding; gRPC/HTTP2 framing is not counted.
                 x f32: over 4 x parameters (the plain float32 update); x plain: over the plain run's at the same n.
  down B/client  bytes the round loop sent each client (its task with the global model; secure aggregation's requests).
  loop CPU       CPU seconds (time.thread_time) of the server's round-loop thread from the engine's start to the round's
                 checkpoint: tasks out, updates decoded and checked (plain) or the protocol and unmasking (secure),
                 aggregation, evaluation on the 10,000 test images, history and checkpoint written.
  engine CPU     the part of loop CPU inside NetworkEngine.run: the networked part, the one secure aggregation changes.
  proc CPU       CPU seconds of the whole server process over the same span: the round loop and the hub's gRPC threads
                 (the clients live in other processes).
  wall           seconds of the round, the clients' training included (they share this machine's cores).
  s/p            secure over plain at the same n.
Client side, per client and round (timed in the client processes): CPU seconds training, in secure aggregation (the
protocol's keys, shares, masking and unmasking shares, and quantizing the update), and encoding/decoding messages.

Reading it: the issue's goals are up x f32 <= 1.2 (Bonawitz et al. report 1.73x at 2^10 clients and 2^20 values) and a
secure server round at most 3x the plain one at 100 clients (loop CPU s/p; engine CPU s/p isolates the networked part).
A secure upload is the masked vector (parameters + 2 counters, 4 bytes each) plus, per neighbour, a channel key, a
sealed pair of shares, two commitments and an unmasking share: it grows with the neighbours, so with n up to 64
clients and with log n above. Absolute seconds are this machine's; with all clients on the same cores, wall time is
mostly training.

    python benchmarks/secagg.py                 # n = 10 50 100, 2 rounds each
    python benchmarks/secagg.py --quick         # n = 5 10, 1 round (a smoke run)
    python benchmarks/secagg.py --clients 100 --rounds 3 --profile   # then a secure run at n = 100 under cProfile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing
import pstats
import queue
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

import fedforge.engines.network as network_engine
import fedforge.experiment as experiment
import fedforge.simulation as simulation
from fedforge.config import Config
from fedforge.engines.network import NetworkEngine
from fedforge.models import build_model
from fedforge.network.auth import enroll, load_tokens
from fedforge.network.hub import EventKind, Hub
from fedforge.network.wire import Kind, Message
from fedforge.secagg import SecureAggregation
from fedforge.secagg.protocol import ServerRound, degree_for
from fedforge.secagg.quantize import COUNTERS, Quantizer

MODES = ("plain", "secure")
SERVER_PARTS = ("wire", "check", "protocol", "unmask", "evaluate", "save")
CLIENT_PARTS = ("train", "secagg", "wire")
STAGES = ("SA_KEYS", "SA_SHARES", "SA_MASKED", "SA_UNMASKED")  # the secure round's exchanges, by their answer


class Timers:
    """CPU seconds (time.thread_time) spent in wrapped functions, by part; a call inside another timed call counts
    once, in the outer one's part."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self._local = threading.local()
        self._lock = threading.Lock()

    def wrap(self, owner, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if getattr(self._local, "busy", False):
                return original(*args, **kwargs)
            self._local.busy = True
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.thread_time() - start
                self._local.busy = False
                with self._lock:
                    self.totals[part] += elapsed

        setattr(owner, name, timed)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.totals)


# -- the clients: threads in a few processes -----------------------------------------------------------------------
def client_group(port: int, secrets: dict[int, str], count: int, settings: dict, out) -> None:
    """Run the clients `secrets` names as threads of this process; put their exit codes and CPU seconds by part."""
    torch.set_num_threads(1)
    from fedforge.network import client as net_client
    from fedforge.secagg.protocol import ClientRound

    timers = Timers()
    timers.wrap(net_client._Trainer, "train", "train")
    for name in ("__init__", "keys", "shares", "masked_input", "unmask"):
        timers.wrap(ClientRound, name, "secagg")
    timers.wrap(net_client._SecureRound, "quantize", "secagg")
    timers.wrap(net_client, "encode", "wire")
    timers.wrap(net_client, "decode", "wire")
    # Load the run's partition once before the threads start: each client's first call would otherwise load it
    # concurrently (the cache does not lock), one copy of Fashion-MNIST per thread.
    net_client._federated(Config.from_dict(settings, source="server settings"))
    codes: dict[int, int | str] = {}

    def one(i: int) -> None:
        try:
            codes[i] = net_client.run_client(
                f"127.0.0.1:{port}",
                i,
                secrets[i],
                net_client.PartitionOf("fashion-mnist", i, count),
                root_cert=None,
                give_up_after=60,
            )
        except Exception as e:  # reported, not lost in a thread
            codes[i] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=one, args=(i,), name=f"client-{i}") for i in secrets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put({"codes": codes, "cpu": timers.snapshot()})


# -- the server: this process, instrumented ----------------------------------------------------------------------
class Meter:
    """Bytes by round and client, and the rounds' seconds, measured in the server process."""

    def __init__(self, timers: Timers, profiler: cProfile.Profile | None):
        self.timers, self.profiler = timers, profiler
        self.round = 0
        self.up: dict[tuple[int, int], int] = defaultdict(int)
        self.down: dict[tuple[int, int], int] = defaultdict(int)
        self.rounds: list[dict] = []
        self._open: dict | None = None
        self._lock = threading.Lock()

    def received(self, client_id: int, size: int) -> None:  # on the hub's thread
        with self._lock:
            self.up[self.round, client_id] += size

    def sent(self, client_id: int, size: int) -> None:
        with self._lock:
            self.down[self.round, client_id] += size

    def begin(self) -> None:
        """The engine starts a round (or retries one that failed), on the round loop's thread."""
        if self._open is not None:
            self._open["attempts"] += 1
            return
        with self._lock:
            self.round += 1
        self._open = {
            "attempts": 1,
            "engine": 0.0,
            "engine_wall": 0.0,
            "stages": defaultdict(float),
            "parts": self.timers.snapshot(),
            "loop": time.thread_time(),
            "proc": time.process_time(),
            "wall": time.perf_counter(),
        }
        if self.profiler is not None:
            self.profiler.enable()

    def end(self) -> None:
        """The round's checkpoint is written (also called after round 0's evaluation, where no round is open)."""
        if self._open is None:
            return
        if self.profiler is not None:
            self.profiler.disable()
        o, parts = self._open, self.timers.snapshot()
        self.rounds.append(
            {
                "loop": time.thread_time() - o["loop"],
                "proc": time.process_time() - o["proc"],
                "wall": time.perf_counter() - o["wall"],
                "engine": o["engine"],
                "engine_wall": o["engine_wall"],
                "attempts": o["attempts"],
                "stages": o["stages"],
                "parts": {k: parts.get(k, 0.0) - o["parts"].get(k, 0.0) for k in SERVER_PARTS},
            }
        )
        self._open = None


class CountingQueue(queue.Queue):
    """`hub.events`, counting each MESSAGE's raw bytes for its client as the hub puts it."""

    def __init__(self, meter: Meter):
        super().__init__()
        self.meter = meter

    def put(self, item, block=True, timeout=None):
        if item.kind == EventKind.MESSAGE:
            self.meter.received(item.session.client_id, len(item.data))
        super().put(item, block, timeout)


class MeteredEngine(NetworkEngine):
    def __init__(self, hub: Hub, meter: Meter, **kwargs):
        super().__init__(hub, **kwargs)
        self.meter = meter

    def run(self, model, global_state, tasks, config):
        self.meter.begin()
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return super().run(model, global_state, tasks, config)  # both modes collect every answer before returning
        finally:
            self.meter._open["engine"] += time.thread_time() - cpu
            self.meter._open["engine_wall"] += time.perf_counter() - wall

    def _exchange(self, task_id, outgoing, answer):
        """One of the secure round's four exchanges: its wall seconds, by the answer it waits for."""
        start = time.perf_counter()
        try:
            return super()._exchange(task_id, outgoing, answer)
        finally:
            self.meter._open["stages"][answer.name] += time.perf_counter() - start


def instrument_server() -> Timers:
    """Time the round loop's parts (module functions and methods it looks up at call time)."""
    timers = Timers()
    timers.wrap(network_engine, "encode", "wire")
    timers.wrap(network_engine, "decode", "wire")
    timers.wrap(network_engine, "update_from", "check")
    for name in (
        "setup",
        "on_keys",
        "neighbour_keys",
        "on_shares",
        "input_request",
        "on_input",
        "unmask_request",
        "on_unmasked",
    ):
        timers.wrap(ServerRound, name, "protocol")
    timers.wrap(ServerRound, "result", "unmask")
    timers.wrap(Quantizer, "decode", "unmask")
    timers.wrap(simulation, "evaluate", "evaluate")
    for name in ("write_history", "write_model", "save_checkpoint"):
        timers.wrap(experiment, name, "save")
    return timers


def deployment(n: int, mode: str, args, workdir: Path, timers: Timers, profile: bool) -> dict:
    name = f"{mode}-{n}" + ("-profiled" if profile else "")
    config = Config(
        dataset="fashion-mnist",
        model="mlp",
        num_clients=n,
        clients_per_round=n,
        local_epochs=1,
        batch_size=32,
        lr=0.01,
        rounds=args.rounds,
        out_dir=str(workdir),
        name=name,
    )
    secure = SecureAggregation() if mode == "secure" else None
    if secure is not None:
        secure.check(config, n)
    tokens = workdir / f"{name}-tokens.json"
    secrets = {i: enroll(tokens, i) for i in range(n)}
    settings = {k: v for k, v in config.__dict__.items() if v is not None}  # what serve() welcomes clients with
    # CPU time (time.thread_time), not wall: the round loop mostly waits for clients, and on shared cores wall
    # time lands on whichever call the OS preempted.
    profiler = cProfile.Profile(time.thread_time) if profile else None
    meter = Meter(timers, profiler)
    hub = Hub(load_tokens(tokens), welcome={"config": settings}, max_message_bytes=256 << 20)
    hub.events = CountingQueue(meter)
    send = hub.send

    def counted_send(session, data, **kwargs):
        ok = send(session, data, **kwargs)
        if ok:
            meter.sent(session.client_id, len(data))
        return ok

    hub.send = counted_send
    save_checkpoint = experiment.save_checkpoint

    def save_and_mark(*a, **kw):
        save_checkpoint(*a, **kw)
        meter.end()

    port = hub.start("127.0.0.1:0", None)  # tls None: an insecure (plaintext) channel
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    ids = list(range(n))
    groups = [
        context.Process(
            target=client_group, args=(port, {i: secrets[i] for i in ids[g :: args.groups]}, n, settings, out)
        )
        for g in range(min(args.groups, n))
    ]
    final = Message(Kind.SHUTDOWN, {"status": "failed", "reason": "the benchmark stopped"})
    reports = []
    started = time.perf_counter()
    try:
        for g in groups:
            g.start()
        if not hub.wait_for_clients(n, timeout=args.connect_timeout):
            raise SystemExit(f"{name}: only {len(hub.sessions)} of {n} clients connected in {args.connect_timeout} s")
        connected = time.perf_counter() - started
        engine = MeteredEngine(hub, meter, round_timeout=args.round_timeout, min_fit_clients=n, secure=secure)
        experiment.save_checkpoint = save_and_mark
        try:
            experiment.run_experiment(config, engine=engine, progress=False, verbose=False)
        finally:
            experiment.save_checkpoint = save_checkpoint
        final = Message(Kind.SHUTDOWN, {"status": "done"})
    finally:
        hub.stop(final)
        for _ in groups:
            try:
                reports.append(out.get(timeout=60))
            except queue.Empty:
                break
        for g in groups:
            g.join(30)
            if g.is_alive():
                g.terminate()
                g.join()
    codes = {i: c for r in reports for i, c in r["codes"].items()}
    bad = {i: c for i, c in codes.items() if c != 0}
    if len(codes) != n or bad:
        raise SystemExit(f"{name}: clients did not all finish cleanly ({len(codes)} reported; {bad})")
    rounds = meter.rounds
    if len(rounds) != args.rounds or any(r["attempts"] != 1 for r in rounds):
        raise SystemExit(f"{name}: {len(rounds)} rounds completed, attempts {[r['attempts'] for r in rounds]}")
    client_cpu = defaultdict(float)
    for r in reports:
        for k, v in r["cpu"].items():
            client_cpu[k] += v
    per_round = len(rounds)

    def mean(key):
        return sum(r[key] for r in rounds) / per_round

    return {
        "n": n,
        "mode": mode,
        "connect": connected,
        "up": sum(meter.up.values()) / (n * per_round),
        "down": sum(meter.down.values()) / (n * per_round),
        "up_min": min(sum(v for (r, c), v in meter.up.items() if c == i) for i in range(n)) / per_round,
        "up_max": max(sum(v for (r, c), v in meter.up.items() if c == i) for i in range(n)) / per_round,
        "loop": mean("loop"),
        "engine": mean("engine"),
        "engine_wall": mean("engine_wall"),
        "proc": mean("proc"),
        "wall": mean("wall"),
        "by_round": [(r["loop"], r["engine"]) for r in rounds],
        "parts": {k: sum(r["parts"][k] for r in rounds) / per_round for k in SERVER_PARTS},
        "stages": {k: sum(r["stages"][k] for r in rounds) / per_round for k in STAGES},
        "client": {k: client_cpu.get(k, 0.0) / (n * per_round) for k in CLIENT_PARTS},
        "profile": profiler,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100], help="n: clients (all per round)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--groups", type=int, default=2, help="processes the clients run in (as threads)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: n = 5 10, 1 round")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then one more secure run at the largest n, its round "
        "loop under cProfile (CPU time); print its top functions",
    )
    parser.add_argument("--round-timeout", type=float, default=600.0)
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.rounds = [5, 10], 1
    torch.set_num_threads(1)
    timers = instrument_server()
    params = sum(v.numel() for v in build_model("mlp", (1, 28, 28), 10).state_dict().values() if v.is_floating_point())
    f32 = 4 * params
    print(
        f"MLP on Fashion-MNIST, {params:,} float32 parameters (float32 update {f32:,} B); n clients = n per round, "
        f"E=1, B=32, {args.rounds} round(s); server in this process, clients as threads in {args.groups} processes; "
        f"127.0.0.1, plaintext gRPC",
        flush=True,
    )
    results: dict[tuple[int, str], dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            for mode in MODES:
                t0 = time.perf_counter()
                r = results[n, mode] = deployment(n, mode, args, Path(tmp), timers, profile=False)
                print(
                    f"  {mode} n={n}: {time.perf_counter() - t0:.0f} s (clients connected in {r['connect']:.1f} s; "
                    f"{r['wall']:.2f} s/round; loop/engine CPU s by round: "
                    f"{', '.join(f'{a:.3f}/{b:.3f}' for a, b in r['by_round'])})",
                    flush=True,
                )
        total = time.perf_counter() - started
        profiled = None
        if args.profile:  # a run of its own: the profiler's overhead would distort the table's seconds
            profiled = deployment(max(args.clients), "secure", args, Path(tmp), timers, profile=True)

    print()
    print(
        "| n | mode | up B/client | x f32 | x plain | down B/client | loop CPU s | engine CPU s | proc CPU s "
        "| wall s | loop CPU s/p | engine CPU s/p | proc CPU s/p | wall s/p |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.clients:
        p = results[n, "plain"]
        for mode in MODES:
            r = results[n, mode]
            ratios = (
                (
                    f"{r['loop'] / p['loop']:.2f} | {r['engine'] / p['engine']:.2f} | {r['proc'] / p['proc']:.2f} | "
                    f"{r['wall'] / p['wall']:.2f}"
                )
                if mode == "secure"
                else " | | | "
            )
            print(
                f"| {n} | {mode} | {r['up']:,.0f} | {r['up'] / f32:.4f} | {r['up'] / p['up']:.4f} | "
                f"{r['down']:,.0f} | {r['loop']:.3f} | {r['engine']:.3f} | {r['proc']:.3f} | {r['wall']:.2f} | "
                f"{ratios} |"
            )

    print()
    print(
        "Server round-loop CPU s/round by part (wire: encode/decode; check: validating plain updates; protocol: "
        "ServerRound's stages; unmask: rebuilding secrets, removing masks, decoding the sum):"
    )
    print()
    print("| n | mode | " + " | ".join(SERVER_PARTS) + " | other |")
    print("|---:|---|" + "---:|" * (len(SERVER_PARTS) + 1))
    for (n, mode), r in results.items():
        other = r["loop"] - sum(r["parts"].values())
        print(f"| {n} | {mode} | " + " | ".join(f"{r['parts'][k]:.3f}" for k in SERVER_PARTS) + f" | {other:.3f} |")

    print()
    print(
        "Wall s/round: the engine (tasks out to updates in: training included) and, secure, its four exchanges "
        "by the answer awaited (keys; shares: the clients train first; masked inputs; unmasking shares):"
    )
    print()
    print("| n | mode | round | engine | keys | shares | masked | unmasking |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for (n, mode), r in results.items():
        stages = " | ".join(f"{r['stages'][k]:.2f}" for k in STAGES) if mode == "secure" else " | | "
        print(f"| {n} | {mode} | {r['wall']:.2f} | {r['engine_wall']:.2f} | {stages} |")

    print()
    print("Client CPU s per client and round:")
    print()
    print("| n | mode | neighbours | " + " | ".join(CLIENT_PARTS) + " |")
    print("|---:|---|---:|" + "---:|" * len(CLIENT_PARTS))
    for (n, mode), r in results.items():
        k = degree_for(n, SecureAggregation().neighbours) if mode == "secure" else "-"
        print(f"| {n} | {mode} | {k} | " + " | ".join(f"{r['client'][p]:.4f}" for p in CLIENT_PARTS) + " |")

    print()
    masked = 4 * (params + COUNTERS)
    ns = args.clients
    print(
        "Growth with n (secure): bytes up per client "
        + ", ".join(f"{results[n, 'secure']['up']:,.0f} at n={n}" for n in ns)
        + " (plain: "
        + ", ".join(f"{results[n, 'plain']['up']:,.0f}" for n in ns)
        + f"); beyond the masked vector ({masked:,} B): "
        + ", ".join(
            f"{(results[n, 'secure']['up'] - masked) / degree_for(n, None):,.0f} B per neighbour"
            f" x {degree_for(n, None)}"
            for n in ns
        )
        + "."
    )
    print(
        "Client-side secure aggregation CPU per client and round: "
        + ", ".join(
            f"{results[n, 'secure']['client']['secagg'] * 1e3:.1f} ms at n={n} ({degree_for(n, None)} neighbours)"
            for n in ns
        )
        + "; its training: "
        + ", ".join(f"{results[n, 'secure']['client']['train'] * 1e3:.0f} ms" for n in ns)
        + " (the data per client is 60,000/n)."
    )
    print(f"Whole benchmark: {total:.0f} s.")

    if profiled is not None:
        text = io.StringIO()
        pstats.Stats(profiled["profile"], stream=text).sort_stats("tottime").print_stats(25)
        print(
            f"\ncProfile of the secure round loop at n={profiled['n']}, a separate run of {args.rounds} round(s) "
            f"(CPU seconds, profiler overhead included: {profiled['loop']:.3f} loop CPU s/round profiled), by own "
            f"time:"
        )
        print(text.getvalue())


if __name__ == "__main__":
    main()
