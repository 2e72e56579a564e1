"""Virtual time to accuracy, synchronous against asynchronous aggregation (issue 27, item 4).

Fashion-MNIST, `--clients` (100; the issue's setting is 1,000) clients of a Dirichlet(0.3) split,
the MLP, E=1, B=32, SGD lr 0.05, seed 0. Device speeds lognormal(sigma `--sigma`, 1.5: a heavy
tail), uplink 1 MB/s, downlink 4 MB/s, the default step cost (0.05 virtual seconds a step at speed
1); with `--availability`, each client online in windows (e.g. periodic:period=600,online=0.5).
On the same seed:

sync             FedAvg, 10 clients a round, every round waits for its slowest client; `--rounds`
over-select      a round deadline of `--deadline` virtual seconds (3) and 30 % over-selection;
                 `--over-select-rounds` (default 3 x rounds: its rounds are shorter)
fedbuff          FedBuff: a step every K = 10 updates, M = `--concurrency` (30) clients at work,
                 staleness weight 1/sqrt(1+s), the FedAvg step (server lr 1); `--fedbuff-steps`
                 (default 8 x rounds)
fedasync         FedAsync: each update mixed in with alpha 0.6 x 1/sqrt(1+s), 10 clients at
                 work; `--fedasync-steps` (default 30 x rounds)

The asynchronous runs are evaluated every `--eval-every` (10) steps. Each run is given enough
steps to cover about the virtual time of the synchronous one (with the defaults), so that time to
a target compares runs that had the same virtual time to reach it, not the same updates.

It prints compare's table (virtual seconds to `--target`) and writes the comparison outputs to
`--out` (comparison.png against virtual time).
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
    parser.add_argument("--concurrency", type=int, default=30)
    parser.add_argument("--availability", default="always")
    parser.add_argument("--over-select-rounds", type=int)
    parser.add_argument("--fedbuff-steps", type=int)
    parser.add_argument("--fedasync-steps", type=int)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/async-time")
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
        "device_availability": args.availability,
        "quiet": True,
    }
    variants = {
        "sync": {},
        "over-select": {
            "round_deadline": args.deadline,
            "over_select": 0.3,
            "rounds": args.over_select_rounds or 3 * args.rounds,
        },
        "fedbuff": {
            "aggregation": "fedbuff",
            "buffer_size": 10,
            "concurrency": args.concurrency,
            "rounds": args.fedbuff_steps or 8 * args.rounds,
            "eval_every": args.eval_every,
        },
        "fedasync": {
            "aggregation": "fedasync",
            "concurrency": 10,
            "rounds": args.fedasync_steps or 30 * args.rounds,
            "eval_every": args.eval_every,
        },
    }
    runs = compare(base, variants, out_dir=args.out)
    print(write_comparison(runs, args.out, target=args.target, title="asynchronous aggregation", x="virtual_time"))


if __name__ == "__main__":
    main()
