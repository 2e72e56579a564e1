"""`fedforge` command line: parse arguments and config, call the library, print one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from ._options import checked, closest, did_you_mean, field_types, flatten
from .config import ALIASES, GROUPS, Config, checked_settings, config_types, settings
from .errors import ConfigError, DivergenceError, FedforgeError, OutputError

if typing.TYPE_CHECKING:
    from .app import ClientApp
    from .compare import RoundDone

log = logging.getLogger("fedforge")

EXIT_USAGE = 2
EXIT_DIVERGED = 1
EXIT_FAILED = 1  # an output could not be written
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # No abbreviations: --mu would be read as --multikrum-m, not refused.
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):  # one line, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        """As argparse's, but an unknown flag is an error here, naming the close one."""
        namespace, extras = super().parse_known_args(args, namespace)
        flags = [a.partition("=")[0] for a in extras if a.startswith("--")]
        if flags:
            known = [o[2:].replace("-", "_") for o in self._option_string_actions if o.startswith("--")]
            close = closest(flags[0][2:].replace("-", "_"), known)
            hint = f"; did you mean --{close.replace('_', '-')}?" if close else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace, extras


def _count_or_fraction(text: str) -> int | float:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 5 or a fraction like 0.1, got {text!r}") from None


def _flag_type(tp):
    options = [t for t in typing.get_args(tp) if t is not type(None)] or [tp]  # X | None -> X
    if set(options) == {int, float}:
        return _count_or_fraction
    return options[0]


def _add_config_flags(parser: argparse.ArgumentParser, keys: Sequence[str] | None = None) -> None:
    """One flag per Config field (but -q/--quiet, which has its short form)."""
    names = [f.name for f in dataclasses.fields(Config) if keys is None or f.name in keys]
    _add_flags(parser, Config, [k for k in names if k != "quiet"])


def _add_quiet_flag(parser: argparse.ArgumentParser, help_: str) -> None:
    """-q/--quiet: Config's quiet (a config file may give it), with its short form."""
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=help_)


def _add_flags(parser: argparse.ArgumentParser, group: type, keys: Sequence[str] | None = None) -> None:
    """One flag per field of the settings `group` (those in `keys`); defaults are suppressed so
    that only given flags override the config file."""
    types_ = field_types(group)
    for f in dataclasses.fields(group):
        if keys is not None and f.name not in keys:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"]
        if f.metadata["choices"]:
            help_ += f"; one of: {', '.join(f.metadata['choices'])}"
        if f.default not in (None, ()):
            help_ += f" (default: {f.default})"
        help_ = help_.replace("%", "%%")
        tp = types_[f.name]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
            continue
        metavar = f.metadata["metavar"] or f.name.upper()
        if typing.get_origin(tp) is tuple:  # repeatable
            parser.add_argument(flag, action="append", default=argparse.SUPPRESS, help=help_, metavar=metavar)
            continue
        if f.metadata["const"] is not None:  # the flag alone means const (--mlflow: the default store)
            parser.add_argument(
                flag, nargs="?", const=f.metadata["const"], default=argparse.SUPPRESS, help=help_, metavar=metavar
            )
            continue
        parser.add_argument(flag, type=_flag_type(tp), default=argparse.SUPPRESS, help=help_, metavar=metavar)


_TRACKING_KEYS = ("tensorboard", "mlflow")


def _trackers(settings: Config | dict, out_dir: str, comparison: str | None = None) -> list:
    """The trackers the settings' tensorboard and mlflow ask for; a comparison's runs grouped under its name."""
    from .tracking import MLflowTracker, TensorBoardTracker, Tracker, default_mlflow_uri

    tensorboard, mlflow = (
        (settings.get(k) if isinstance(settings, dict) else getattr(settings, k)) for k in _TRACKING_KEYS
    )
    trackers: list[Tracker] = []
    if tensorboard is not None:
        trackers.append(TensorBoardTracker(Path(tensorboard, comparison or "")))
    if mlflow is not None:
        uri = default_mlflow_uri(out_dir) if mlflow in ("", "default") else mlflow
        trackers.append(MLflowTracker(uri, experiment=comparison or "fedforge"))
    return trackers


def _config(args: argparse.Namespace, keys: Sequence[str]) -> Config:
    overrides = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    return Config.load(args.config, overrides)


_CONFIG_KEYS = [f.name for f in dataclasses.fields(Config)]
# compare's own --target is the accuracy to reach: there a dataset's target column is set in --config.
# Nor does it sign its runs' checkpoints (checkpoint_key_file: run and server only).
_COMPARE_KEYS = [k for k in _CONFIG_KEYS if k not in ("target", "checkpoint_key_file")]


def _overrides(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in _CONFIG_KEYS if hasattr(args, k)}


def _run_config(args: argparse.Namespace, file_values: dict | None = None) -> Config:
    """The settings of a new run, or with --resume RUN_DIR those saved in RUN_DIR, with --config
    (or `file_values`, the run's part of it) and flags on top: only settings that do not change
    what the rounds compute may differ (EXECUTION_KEYS: more rounds, another engine, ...); any
    other is refused by name."""
    from .experiment import check_resumable
    from .strategies.settings import check_given

    changes = settings(args.config) if file_values is None else file_values
    if not args.resume:
        config = Config(**{**changes, **checked_settings(_overrides(args), "command line")})
    else:
        run_dir = Path(args.resume)
        config = Config.load(run_dir / "config.toml", {**changes, **_overrides(args)})
        config = config.replace(out_dir=str(run_dir.parent), name=run_dir.name)
        check_resumable(run_dir, config)
    check_given([*changes, *_overrides(args)], config.strategy)
    return config


def _deployment_settings(args: argparse.Namespace, group: type, table: str, file_values: dict) -> Any:
    """The `group` settings (ServerSettings, ClientNodeSettings) from the config file's values
    and the flags given (which override them)."""
    names = [f.name for f in dataclasses.fields(group)]
    flags = {k: getattr(args, k) for k in names if hasattr(args, k)}
    values = {**checked(file_values, field_types(group), f"{args.config} [{table}]"), **flags}
    return group(**values)


def _split_file(path: str | None, group: type, table: str) -> tuple[dict, dict]:
    """The settings in the TOML file at `path`: the run's (checked) and those of `group` (the
    server's: at the top or in the table `table`)."""
    if path is None:
        return {}, {}
    from .config import own_strategy_keys, read_toml

    values = flatten(own_strategy_keys(read_toml(path)), {**GROUPS, table: group}, path, ALIASES)
    own = {f.name for f in dataclasses.fields(group)}
    known = own | set(config_types())
    for key in values:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}{did_you_mean(key, known)}")
    run = checked_settings({k: v for k, v in values.items() if k not in own}, path)
    return run, {k: v for k, v in values.items() if k in own}


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _checkpoint_key(config: Config) -> bytes | None:
    from .checkpoint import read_key

    return read_key(config.checkpoint_key_file) if config.checkpoint_key_file else None


def _cmd_run(args: argparse.Namespace) -> int:
    from .experiment import run_experiment
    from .report import headline

    config = _run_config(args)
    outcome = run_experiment(
        config,
        progress=not config.quiet,
        resume=bool(args.resume),
        trackers=_trackers(config, config.out_dir),
        checkpoint_key=_checkpoint_key(config),
    )
    final = outcome.history.final
    print(f"engine: {outcome.engine}")  # which one trained the clients: auto's pick, or a fallback and why
    print(
        f"final {headline(final, config.client_config().task.primary)} after {final.round} rounds; "
        f"outputs in {outcome.run_dir}"
    )
    return 0


PARTITION_KEYS = (
    "dataset",
    "data_dir",
    "download",
    "num_clients",
    "partition",
    "alpha",
    "shards_per_client",
    "sigma",
    "client_test_fraction",
    "seed",
    "synthetic_alpha",
    "synthetic_beta",
    "target",
    "task",
)


def _cmd_partition(args: argparse.Namespace) -> int:
    from .data.datasets import one_tensor
    from .data.partition import label_histogram
    from .experiment import load
    from .report import partition_table, plot_partition

    config = _config(args, PARTITION_KEYS)
    dataset, data = load(config, progress=not args.quiet)
    labels = one_tensor(dataset.train.y, "the targets a partition counts").numpy()
    hist = label_histogram(labels, data.partition, dataset.num_classes)
    print(partition_table(hist))
    if args.plot:
        plot_partition(hist, args.plot, title=f"{config.dataset}: {config.partition}, {config.num_clients} clients")
        print(f"plot written to {args.plot}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import time

    from .compare import compare, variant_configs, variants_from_file, write_comparison

    # The shared settings, checked key by key; as a whole only within each run, which may complete
    # them (a --noise-multiplier for runs that each set dp in the runs file).
    base = settings(args.config, {k: getattr(args, k) for k in _COMPARE_KEYS if hasattr(args, k)})
    # A run's label is its folder's name: my_strategies:Halfway -> my_strategies_Halfway.
    variants = {re.sub(r"[^\w.-]", "_", name): {"strategy": name} for name in args.strategies or []}
    if args.runs:
        variants.update(variants_from_file(args.runs))
    if base.get("checkpoint_key_file"):
        raise ConfigError("checkpoint_key_file is a setting of run and server: compare does not sign checkpoints")
    if args.resume and not base.get("name"):
        raise ConfigError("--resume needs --name: the comparison whose runs to continue")
    name = base.pop("name", None) or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    root = base.get("out_dir", Config.__dataclass_fields__["out_dir"].default)
    out_dir = Path(root) / name
    configs = variant_configs(base, variants, out_dir=out_dir)
    if args.x_axis == "virtual_time" and (unclocked := [label for label, c in configs.items() if not c.clocked]):
        raise ConfigError(f"--x-axis virtual_time: run {unclocked[0]!r} has no device profiles (--device-speeds)")
    rounds = sum(c.rounds for c in configs.values())
    with _RoundsShown(rounds, quiet=base.get("quiet", False)) as shown:
        runs = compare(
            base,
            variants,
            out_dir=out_dir,
            jobs=args.jobs,
            resume=args.resume,
            trackers=_trackers(base, root, comparison=name),
            on_round=shown,
        )
    print(write_comparison(runs, out_dir, target=args.target, title=name, x=args.x_axis))
    print(f"outputs in {out_dir}: comparison.md, comparison.csv, comparison.png, and a folder per run")
    return 0


class _RoundsShown:
    """compare's progress: a line per finished round of each run, or on a terminal one bar over
    every run's rounds (`rounds` in all) showing the latest; nothing when `quiet`."""

    def __init__(self, rounds: int, *, quiet: bool):
        from tqdm.auto import tqdm

        self.quiet = quiet
        self.bar = tqdm(total=rounds, unit="round", leave=False) if sys.stdout.isatty() and not quiet else None

    def __call__(self, done: RoundDone) -> None:
        if self.bar is not None:
            self.bar.update(1 if done.record.round else 0)
            self.bar.set_postfix_str(done.line())
        elif not self.quiet:
            print(done.line(), flush=True)

    def __enter__(self) -> _RoundsShown:
        return self

    def __exit__(self, *_exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_server(args: argparse.Namespace) -> int:
    from .network.auth import load_tokens
    from .network.settings import ServerSettings
    from .report import headline
    from .server import serve

    run_values, server_values = _split_file(args.config, ServerSettings, "server")
    config = _run_config(args, run_values)
    server = _deployment_settings(args, ServerSettings, "server", server_values)
    _set_threads(server.threads)
    tls = server.tls()
    if tls is None:
        log.warning("plaintext mode (--insecure): updates and secrets cross the network unencrypted")
    assert server.tokens is not None  # ServerSettings requires it
    outcome = serve(
        config,
        address=server.address,
        tokens=load_tokens(server.tokens),
        tls=tls,
        min_clients=server.min_clients,
        min_fit_clients=server.min_fit_clients,
        round_timeout=server.round_timeout,
        max_message_bytes=int(server.max_message_mb * 2**20),
        resume=bool(args.resume),
        progress=not config.quiet,
        on_listening=lambda port: print(f"fedforge server: listening on port {port}", flush=True),
        keepalive=server.keepalive,
        max_client_examples=server.max_client_examples,
        secure=server.secure(),
        min_available_clients=server.min_available_clients,
        trackers=_trackers(config, config.out_dir),
        dashboard=server.dashboard_settings(),
        on_dashboard=lambda url: print(f"fedforge server: dashboard at {url}", flush=True),
        checkpoint_key=_checkpoint_key(config),
        server_eval=server.server_eval,
        evaluate_fraction=server.evaluate_fraction,
    )
    print(f"final {headline(outcome.history.final, config.client_config().task.primary)}; outputs in {outcome.run_dir}")
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    from .models import check_model_name
    from .network.auth import read_secret
    from .network.client import LocalData, PartitionOf, run_client
    from .network.settings import ClientNodeSettings
    from .network.welcome import References
    from .tasks import make_task

    # [node]: [client] is the run's ClientSettings in a server's file; read here too, as before.
    tables = {"node": ClientNodeSettings, "client": ClientNodeSettings}
    values = flatten(_read_toml_or_empty(args.config), tables, str(args.config))
    node = _deployment_settings(args, ClientNodeSettings, "node", values)
    _set_threads(node.threads)
    data: ClientApp | PartitionOf | LocalData
    if node.app:
        from .app import load_app

        data = load_app(node.app)
    else:
        data = PartitionOf.parse(node.partition_of) if node.partition_of else LocalData(node.data)
    if node.model is not None:  # the operator's own code: imported now, so that a typo is one line here
        check_model_name(node.model)
    if node.task is not None:
        make_task(node.task)
    secret = read_secret(node.token_file)
    if node.insecure:
        log.warning("plaintext mode (--insecure): this client's secret and updates cross the network unencrypted")
    return run_client(
        node.server,
        node.client_id,
        secret,
        data,
        root_cert=node.root_certificate(),
        compression=node.compress,
        max_message_bytes=int(node.max_message_mb * 2**20),
        give_up_after=node.give_up_after,
        retry_on_server_failure=node.retry_on_server_failure,
        secagg_floor=node.floor(),
        limits=node.limits(),
        references=References(model=node.model, task=node.task, allow=frozenset(node.allow)),
        state_dir=node.state_dir,
    )


def _read_toml_or_empty(path: str | None) -> dict:
    from .config import read_toml

    return read_toml(path) if path is not None else {}


def _cmd_enroll(args: argparse.Namespace) -> int:
    from .network.auth import enroll, write_secret

    secret = enroll(args.tokens, args.client_id)
    out = args.out or f"client-{args.client_id}.token"
    write_secret(out, secret)
    print(f"client {args.client_id} enrolled in {args.tokens}; its secret is in {out} (give it to that client only)")
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from .network.certs import make_certificates

    paths = make_certificates(args.out, args.host or ["localhost", "127.0.0.1"])
    print(
        f"CA: {paths['ca']} (clients: --root-cert)  server: {paths['cert']}, {paths['key']} "
        f"(--tls-cert, --tls-key); for testing only"
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .history import History
    from .network.dashboard import report_page
    from .report import round_line

    run_dir = Path(args.run_dir)
    if args.out and not args.html:
        raise ConfigError("--out needs --html")
    if args.html:
        from ._io import atomic_write

        out = Path(args.out or run_dir / "dashboard.html")
        page = report_page(run_dir)
        with atomic_write(out, "wb") as f:
            f.write(page.encode())
        print(f"dashboard of {run_dir} written to {out}")
        return 0
    try:
        history = History.from_json((run_dir / "history.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} holds no history.json: not a run's folder, or no round completed") from None
    config = run_dir / "config.toml"  # the run's task, whose primary metric the lines show
    metric = Config.load(config).client_config().task.primary if config.exists() else "accuracy"
    for record in history.records:
        print(round_line(record, history.final.round, metric=metric))
    return 0


_QUIET_HELP = "no progress bars (shown only on a terminal: the run's clients, a dataset's download)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedforge", description="Federated learning simulations and deployments.")
    parser.add_argument("--version", action="version", version=f"fedforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a federated experiment (defaults: the tutorial's)")
    run.add_argument("--config", help="TOML file of settings; flags override it")
    _add_quiet_flag(run, _QUIET_HELP)
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last completed round (flags may change e.g. --rounds)",
    )
    _add_config_flags(run)
    run.set_defaults(handler=_cmd_run)

    comp = sub.add_parser(
        "compare",
        help="run several strategies or settings on the same partition, seed and selected clients; one plot, one table",
    )
    comp.add_argument("--config", help="TOML file of the base settings; flags override it")
    comp.add_argument(
        "--strategies",
        nargs="+",
        metavar="STRATEGY",
        help="one run per strategy, e.g. fedavg fedprox my_strategies:Halfway (labelled my_strategies_Halfway)",
    )
    comp.add_argument("--runs", metavar="FILE", help="TOML file of named runs: [label] then the settings it changes")
    comp.add_argument(
        "--target",
        type=float,
        help="report the round each run first reaches this value of the "
        "task's test metric (accuracy, r2, ...; at most, for perplexity) (a csv:, parquet: or hf: "
        "dataset's target column: set target in --config)",
    )
    comp.add_argument(
        "--x-axis",
        choices=("round", "virtual_time"),
        default="round",
        help="the plot's x-axis: round, or virtual_time (runs with device profiles) (default: round)",
    )
    comp.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default: 1)")
    comp.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs already in OUT_DIR/NAME from their last "
        "completed round (finished ones are reported as they are); needs --name",
    )
    _add_quiet_flag(comp, "no progress (a line per finished round, or a bar on a terminal)")
    _add_config_flags(comp, _COMPARE_KEYS)
    comp.set_defaults(handler=_cmd_compare)

    from .network.settings import ClientNodeSettings, ServerSettings

    srv = sub.add_parser("server", help="run an experiment with clients that connect over the network")
    srv.add_argument(
        "--config", help="TOML file of settings: the run's, and the server's (flat or in [server]); flags override it"
    )
    srv.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last completed round")
    _add_quiet_flag(srv, _QUIET_HELP)
    _add_flags(srv, ServerSettings)
    _add_config_flags(srv)
    srv.set_defaults(handler=_cmd_server)

    cli = sub.add_parser("client", help="train for a server, keeping the data here")
    cli.add_argument("--config", help="TOML file of this client's settings (flat or in [node]); flags override it")
    _add_flags(cli, ClientNodeSettings)
    cli.set_defaults(handler=_cmd_client)

    enr = sub.add_parser("enroll", help="issue a secret for a client id")
    enr.add_argument("--tokens", required=True, help="the server's secrets file (created if missing)")
    enr.add_argument("--client-id", type=int, required=True)
    enr.add_argument("--out", help="where to write the client's secret (default: client-ID.token)")
    enr.set_defaults(handler=_cmd_enroll)

    crt = sub.add_parser("certs", help="create a self-signed CA and a server certificate (testing)")
    crt.add_argument("--out", default="certs", help="folder for ca.pem, server.pem, server.key")
    crt.add_argument(
        "--host", action="append", help="host name or IP of the server (repeatable; default: localhost and 127.0.0.1)"
    )
    crt.set_defaults(handler=_cmd_certs)

    part = sub.add_parser("partition", help="show how a partition splits the data across clients")
    part.add_argument("--config", help="TOML file of settings; flags override it")
    part.add_argument("--plot", help="write a per-client label histogram to this PNG")
    part.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar for a dataset's download (shown only on a terminal)"
    )
    _add_config_flags(part, PARTITION_KEYS)
    part.set_defaults(handler=_cmd_partition)

    rep = sub.add_parser("report", help="a finished run's rounds, or with --html its dashboard as one HTML file")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder (OUT_DIR/NAME)")
    rep.add_argument(
        "--html",
        action="store_true",
        help="write the dashboard page with the run's history inside (static: it fetches nothing)",
    )
    rep.add_argument("--out", metavar="FILE", help="where to write it (default: RUN_DIR/dashboard.html)")
    rep.set_defaults(handler=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's C core logs to stderr on its own (a client that knocks with the wrong TLS setting puts
    # a handshake line on the server's console); fedforge logs what matters itself. Set before grpc
    # is imported; GRPC_VERBOSITY=ERROR (or DEBUG) in the environment brings them back.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return args.handler(args)
    except DivergenceError as e:
        print(f"fedforge: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except OutputError as e:
        print(f"fedforge: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except FedforgeError as e:
        print(f"fedforge: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedforge: interrupted; the completed rounds are saved", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
