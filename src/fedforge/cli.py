"""`fedforge` command line: parse arguments and config, call the library, print one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence

from .config import Config, field_types
from .errors import DivergenceError, FedforgeError

EXIT_USAGE = 2
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _count_or_fraction(text: str) -> int | float:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 5 or a fraction like 0.1, got {text!r}") from None


def _flag_type(tp):
    if tp == int | float:
        return _count_or_fraction
    options = [t for t in typing.get_args(tp) if t is not type(None)] or [tp]  # X | None -> X
    return options[0]


def _add_config_flags(parser: argparse.ArgumentParser, keys: Sequence[str] | None = None) -> None:
    """One flag per Config field; defaults are suppressed so only given flags override the file."""
    types_ = field_types()
    for f in dataclasses.fields(Config):
        if keys is not None and f.name not in keys:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"]
        if f.metadata["choices"]:
            help_ += f"; one of: {', '.join(f.metadata['choices'])}"
        if f.default is not None:
            help_ += f" (default: {f.default})"
        if types_[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            parser.add_argument(
                flag, type=_flag_type(types_[f.name]), default=argparse.SUPPRESS, help=help_,
                metavar=f.name.upper(),
            )


def _config(args: argparse.Namespace, keys: Sequence[str]) -> Config:
    overrides = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    return Config.load(args.config, overrides)


def _cmd_run(args: argparse.Namespace) -> int:
    from .experiment import run_experiment

    config = _config(args, [f.name for f in dataclasses.fields(Config)])
    outcome = run_experiment(config, progress=not args.quiet)
    final = outcome.history.final
    print(f"final test accuracy {final.test_accuracy:.4f} after {final.round} rounds; outputs in {outcome.run_dir}")
    return 0


PARTITION_KEYS = ("dataset", "data_dir", "download", "num_clients", "partition", "alpha", "shards_per_client",
                  "sigma", "client_test_fraction", "seed", "synthetic_alpha", "synthetic_beta")


def _cmd_partition(args: argparse.Namespace) -> int:
    from .data.partition import label_histogram
    from .experiment import load
    from .report import partition_table, plot_partition

    config = _config(args, PARTITION_KEYS)
    dataset, data = load(config, progress=not args.quiet)
    hist = label_histogram(dataset.train.y.numpy(), data.partition, dataset.num_classes)
    print(partition_table(hist))
    if args.plot:
        plot_partition(hist, args.plot, title=f"{config.dataset}: {config.partition}, {config.num_clients} clients")
        print(f"plot written to {args.plot}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .compare import compare, variants_from_file, write_comparison

    base = _config(args, [f.name for f in dataclasses.fields(Config)])
    variants = {name: {"strategy": name} for name in args.strategies or []}
    if args.runs:
        variants.update(variants_from_file(args.runs))
    name = base.name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(base.out_dir) / name
    runs = compare(base.replace(name=None), variants, out_dir=out_dir, jobs=args.jobs)
    print(write_comparison(runs, out_dir, target=args.target, title=name))
    print(f"outputs in {out_dir}: comparison.md, comparison.csv, comparison.png, and a folder per run")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedforge", description="Federated learning simulations and deployments.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a federated experiment (defaults: the tutorial's)")
    run.add_argument("--config", help="TOML file of settings; flags override it")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_config_flags(run)
    run.set_defaults(handler=_cmd_run)

    comp = sub.add_parser("compare", help="run several strategies or settings on the same partition, seed "
                                           "and selected clients; one plot, one table")
    comp.add_argument("--config", help="TOML file of the base settings; flags override it")
    comp.add_argument("--strategies", nargs="+", metavar="STRATEGY", help="one run per strategy, e.g. fedavg fedprox")
    comp.add_argument("--runs", metavar="FILE", help="TOML file of named runs: [label] then the settings it changes")
    comp.add_argument("--target", type=float, help="report the round each run first reaches this test accuracy")
    comp.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default: 1)")
    comp.add_argument("-q", "--quiet", action="store_true", help="(runs never show progress bars)")
    _add_config_flags(comp)
    comp.set_defaults(handler=_cmd_compare)

    part = sub.add_parser("partition", help="show how a partition splits the data across clients")
    part.add_argument("--config", help="TOML file of settings; flags override it")
    part.add_argument("--plot", help="write a per-client label histogram to this PNG")
    part.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_config_flags(part, PARTITION_KEYS)
    part.set_defaults(handler=_cmd_partition)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DivergenceError as e:
        print(f"fedforge: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except FedforgeError as e:
        print(f"fedforge: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedforge: interrupted; the completed rounds are saved", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
