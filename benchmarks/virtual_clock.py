"""Virtual time to accuracy for synchronous rounds (issue 27, items 1-3): docs/time.md's table.

Fashion-MNIST, `--clients` (100) clients of a Dirichlet(0.3) split, 10 a round, the MLP, E=1, B=32,
SGD lr 0.05, seed 0, `--rounds` (40) rounds. Device speeds lognormal(sigma `--sigma`, 1.5: a heavy
tail, the slowest of 10 clients some 10x slower than the median), uplink 1 MB/s, downlink 4 MB/s,
the default step cost (0.05 virtual seconds a step at speed 1). Runs, on the same seed, clients
and batches:

sync             FedAvg, every round waits for its slowest client
deadline         a round deadline of `--deadline` virtual seconds (3): late clients are dropped
partial          the same deadline, late clients send the steps they finished by it
over-select      the deadline and 30 % over-selection: 13 selected, the first 10 to finish kept

It prints compare's table (rounds and virtual seconds to `--target`) and writes the usual
comparison outputs to runs/virtual-clock (comparison.png against virtual time).
"""

from __future__ import annotations

import argparse

import torch

from fedforge.compare import compare, write_comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--sigma", type=float, default=1.5)
    parser.add_argument("--deadline", type=float, default=3.0)
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/virtual-clock")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = {
        "dataset": "fashion-mnist",
        "download": False,
        "num_clients": args.clients,
        "clients_per_round": 10,
        "partition": "dirichlet",
        "alpha": 0.3,
        "model": "mlp",
        "lr": 0.05,
        "rounds": args.rounds,
        "seed": 0,
        "device_speeds": f"lognormal:sigma={args.sigma}",
        "quiet": True,
    }
    deadline = {"round_deadline": args.deadline}
    variants = {
        "sync": {},
        "deadline": deadline,
        "partial": {**deadline, "late_clients": "partial"},
        "over-select": {**deadline, "over_select": 0.3},
    }
    runs = compare(base, variants, out_dir=args.out)
    print(write_comparison(runs, args.out, target=args.target, title="virtual clock", x="virtual_time"))


if __name__ == "__main__":
    main()
