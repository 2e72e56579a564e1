"""Ray engine benchmark: `--engine ray` (2 workers of 1 CPU) against `--engine auto` in process, in one run.

W2  cross-device: Fashion-MNIST, 1,000 clients from a Dirichlet(0.3) partition, 100 per round,
    E=1, B=10, lr 0.01, MLP.
W3  scale: 10,000 clients (IID, 6 examples each), 1,000 per round, E=1, B=10, MLP.

Each case runs in a child process, through the CLI's own path (a Config; `experiment.load` and
`make_run_engine`, so the Ray workers load the data themselves), while this process samples the
memory of the child and of every process under it (Ray's: its GCS, raylet, and the workers) every
0.2 s, from /proc. Reported: seconds per round (median of the rounds after the first, which for Ray includes
the workers' first pool build and model fetch; and the first round alone), of which training;
the start (data, model, and for Ray its start and the workers' loading); and the peak of the sum
over those processes of the resident set (RSS: shared libraries, torch's among them, counted once
per process that maps them) and of its anonymous part (tensors, Python heaps: what each process
holds of its own). The two engines' final weights are compared too (they train the same clients on
the same batches). With `--flower PYTHON`, W2 also runs on Flower's own simulation (flower_run.py, in
an environment of its own: `pip install 'flwr[simulation]==1.42.0' torch==2.13.0`), with the same
clients, in turn with the engines (so that a busy spell of the machine falls on both alike); its
rounds are timed between its centralized evaluations, and the ratio is given for each pair of
neighbouring runs as well as for the medians.

    python benchmarks/ray_scale.py                 # W2 and W3, both engines, 3 runs each
    python benchmarks/ray_scale.py --only w2 --rounds 5 --repeats 1
    python benchmarks/ray_scale.py --flower /tmp/flwr/bin/python   # and Flower on W2 (flower_run.py)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORKLOADS = {
    "w2": dict(num_clients=1000, partition="dirichlet", alpha=0.3, clients_per_round=100),
    "w3": dict(num_clients=10_000, partition="iid", clients_per_round=1000),
}


def case(workload: str, engine: str, rounds: int, out: str) -> dict:
    """One run in this process (a child): the per-round timings, and the final weights saved to `out`."""
    import torch

    from fedforge.config import Config
    from fedforge.experiment import load, make_run_engine
    from fedforge.models import build_model
    from fedforge.simulation import simulate

    if engine == "auto:1":  # the in-process engine on one thread, as each Ray worker trains
        torch.set_num_threads(1)
        engine = "auto"
    started = time.perf_counter()
    config = Config(
        dataset="fashion-mnist",
        download=False,
        model="mlp",
        rounds=rounds,
        local_epochs=1,
        batch_size=10,
        lr=0.01,
        engine=engine,
        ray_workers=2,
        ray_cpus_per_worker=1.0,
        ray_engine="auto",
        seed=0,
        **WORKLOADS[workload],
    )
    dataset, data = load(config, progress=False)
    model = build_model(config.model, dataset.input_shape, dataset.num_classes, seed=config.seed)
    run_engine = make_run_engine(config, combine=True)  # as `fedforge run` without trackers
    ready = time.perf_counter() - started
    try:
        result = simulate(
            model,
            data,
            rounds=rounds,
            clients_per_round=config.clients_per_round,
            client=config.client_config(),
            strategy=config.strategy_object(),
            scenario=config.scenario(),
            engine=run_engine,
            seed=config.seed,
        )
    finally:
        run_engine.close()
    torch.save(result.state.params, out)
    records = result.history.records[1:]
    return {
        "start": ready,
        "first_round": records[0].seconds,
        "per_round": statistics.median(r.seconds for r in records[1:]),
        "training": statistics.median(r.train_seconds for r in records[1:]),
        "accuracy": result.history.final.test_accuracy,
    }


def _descendants(root: int) -> list[int]:
    """`root` and every process under it, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) of one process in bytes, from /proc/PID/status; (0, 0) when it is gone.

    Not PSS: reading /proc/PID/smaps_rollup walks the page tables under the process's mmap lock, and
    sampling it every 0.2 s made the in-process engine 40x slower (its page faults wait on the lock)."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "RssAnon:")):
                name, value, _ = line.split()
                fields[name] = int(value) * 1024
    except (OSError, ValueError):
        pass
    return fields.get("VmRSS:", 0), fields.get("RssAnon:", 0)


class MemoryPeak:
    """Samples the memory of a process and of all its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.root, self.interval = pid, interval
        self.rss = self.anon = self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            pids = _descendants(self.root)
            rss, anon = (sum(values) for values in zip(*map(_memory, pids), strict=True))
            self.rss, self.anon = max(self.rss, rss), max(self.anon, anon)
            self.processes = max(self.processes, len(pids))
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join()


def w2_partition() -> list:
    """W2's clients, the same Dirichlet partition as fedforge's run."""
    from fedforge.config import Config
    from fedforge.experiment import load

    _, data = load(Config(dataset="fashion-mnist", download=False, seed=0, **WORKLOADS["w2"]), progress=False)
    return data.partition


def flower_spec(path: str, partition: list, *, per_round: int, batch_size: int, model) -> str:
    """A Fashion-MNIST workload for flower_run.py: the clients' indices, the clients per round, the batch
    size, where the data is, and the initial model (`model`, saved whole beside `path`)."""
    import numpy as np
    import torch

    from fedforge.data.datasets import DATASETS, locate

    spec = DATASETS["fashion-mnist"]
    torch.save(model, path + ".model.pt")
    np.savez(
        path,
        order=np.concatenate(partition),
        starts=np.cumsum([0, *map(len, partition)]),
        per_round=per_round,
        batch_size=batch_size,
        model=path + ".model.pt",
        folder=str(locate(spec, download_missing=False, progress=False)),
        mean=spec.mean,
        std=spec.std,
    )
    return path


def _child(argv: list[str], what: str) -> tuple[dict, MemoryPeak]:
    """Run `argv`, sampling the memory of it and its descendants; its last line of output as JSON."""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = MemoryPeak(child.pid)
    stdout, stderr = child.communicate()
    peak.stop()
    if child.returncode != 0:
        raise SystemExit(f"{what} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), peak


def _peak_fields(peak: MemoryPeak) -> dict:
    return {"peak_rss_gib": peak.rss / 2**30, "peak_anon_gib": peak.anon / 2**30, "processes": peak.processes}


def measure_flower(python: str, rounds: int, spec: str) -> dict:
    """Flower's simulation of a workload (`spec`, from flower_spec) in its own environment, measured as the
    fedforge cases are."""
    result, peak = _child([python, str(Path(__file__).with_name("flower_run.py")), spec, str(rounds)], "flower")
    seconds = result["round_seconds"]
    return {
        "per_round": statistics.median(seconds[1:]),
        "training": float("nan"),
        "first_round": seconds[0],
        "start": float("nan"),
        "accuracy": result["accuracy"],
        **_peak_fields(peak),
    }


def measure(workload: str, engine: str, rounds: int, out: str) -> dict:
    result, peak = _child(
        [sys.executable, __file__, "--case", workload, engine, str(rounds), out], f"{workload} {engine}"
    )
    return {**result, **_peak_fields(peak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case, alternating the engines")
    parser.add_argument("--engines", default="auto,ray", help="auto, ray, auto:1 (in process on one thread)")
    parser.add_argument(
        "--flower",
        metavar="PYTHON",
        help="also W2 on Flower's simulation, run by this Python (an environment with flwr[simulation] and torch)",
    )
    parser.add_argument("--case", nargs=4, metavar=("WORKLOAD", "ENGINE", "ROUNDS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        workload, engine, rounds, out = args.case
        print(json.dumps(case(workload, engine, int(rounds), out)))
        return
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads in process; ray: 2 workers x 1 CPU, engine "
        f"auto in each; {args.rounds} rounds, medians of the rounds after the first; {args.repeats} runs each"
    )
    header = (
        f"{'':4} {'engine':6} {'s/round':>8} {'train':>7} {'round 1':>8} {'start':>7} {'peak RSS':>9} "
        f"{'peak anon':>9} {'procs':>5}  accuracy  load"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for workload in [args.only] if args.only else list(WORKLOADS):
            engines = args.engines.split(",") + (["flower"] if args.flower and workload == "w2" else [])
            spec = None
            if "flower" in engines:
                from fedforge.models import build_model

                model = build_model("mlp", (1, 28, 28), 10, seed=0)
                spec = flower_spec(str(Path(tmp) / "w2.npz"), w2_partition(), per_round=100, batch_size=10, model=model)
            runs: dict[str, list[dict]] = {engine: [] for engine in engines}
            for repeat in range(args.repeats):
                # Alternate, so that a busy spell of the machine falls on every engine (and Flower) alike.
                for engine in engines if repeat % 2 == 0 else engines[::-1]:
                    load = os.getloadavg()[0]
                    if engine == "flower":
                        r = measure_flower(args.flower, args.rounds, spec)
                    else:
                        r = measure(workload, engine, args.rounds, str(Path(tmp) / f"{workload}-{engine}.pt"))
                    runs[engine].append(r)
                    print(row(workload, engine, r) + f"  {load:4.1f}", flush=True)
            medians = {e: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for e, rs in runs.items()}
            for engine, r in medians.items():
                print(row(workload, engine, r) + "  median")
            if "flower" in medians and "ray" in medians:
                f, ray = medians["flower"], medians["ray"]
                print(
                    f"W2   flower/ray: {f['per_round'] / ray['per_round']:.1f}x per round, "
                    f"{f['peak_rss_gib'] / ray['peak_rss_gib']:.2f}x peak RSS, "
                    f"{f['peak_anon_gib'] / ray['peak_anon_gib']:.2f}x peak anon; run by run: "
                    + ", ".join(
                        f"{a['per_round'] / b['per_round']:.1f}x"
                        for a, b in zip(runs["flower"], runs["ray"], strict=True)
                    ),
                    flush=True,
                )
            if "ray" not in runs:
                continue
            for base in (e for e in engines if e not in ("ray", "flower")):
                a, b = (torch.load(str(Path(tmp) / f"{workload}-{e}.pt")) for e in (base, "ray"))
                difference = max(float((a[k] - b[k]).abs().max()) for k in a)
                ray, auto = medians["ray"], medians[base]
                print(
                    f"{workload.upper():4} ray/{base}: {ray['per_round'] / auto['per_round']:.2f}x per round, "
                    f"{ray['peak_rss_gib'] / auto['peak_rss_gib']:.2f}x peak RSS, "
                    f"{ray['peak_anon_gib'] / auto['peak_anon_gib']:.2f}x peak anon; final weights differ by at "
                    f"most {difference:.1e}",
                    flush=True,
                )


def row(workload: str, engine: str, r: dict) -> str:
    return (
        f"{workload.upper():4} {engine:6} {r['per_round']:8.3f} {r['training']:7.3f} {r['first_round']:8.3f} "
        f"{r['start']:7.2f} {r['peak_rss_gib']:7.2f} G {r['peak_anon_gib']:7.2f} G {r['processes']:5.0f}  "
        f"{r['accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
