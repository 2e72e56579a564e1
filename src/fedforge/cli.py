"""`fedforge` command line: parse arguments and config, call the library, print one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, field_types, settings
from .errors import ConfigError, DivergenceError, FedforgeError, OutputError

if TYPE_CHECKING:  # imported where used, so that each command loads only what it needs
    from .app import ClientApp

log = logging.getLogger("fedforge")

EXIT_USAGE = 2
EXIT_DIVERGED = 1
EXIT_FAILED = 1  # an output could not be written
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
        if (keys is not None and f.name not in keys) or f.name in _TRACKING_KEYS:  # flags of their own
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
                flag,
                type=_flag_type(types_[f.name]),
                default=argparse.SUPPRESS,
                help=help_,
                metavar=f.name.upper(),
            )


_TRACKING_KEYS = ("tensorboard", "mlflow")


def _add_tracking_flags(parser: argparse.ArgumentParser, *, compare: bool = False) -> None:
    """--tensorboard and --mlflow: Config's settings of the same names (a config file may give them)."""
    where = "DIR/NAME/LABEL, a folder per run of the comparison NAME" if compare else "DIR/NAME"
    experiment = "the experiment NAME, a run per label" if compare else "the experiment fedforge, a run named NAME"
    parser.add_argument(
        "--tensorboard",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help=f"log to TensorBoard in {where}: each round's numbers "
        "(those of history.json) as scalars, the clients' training metrics as histograms "
        "(tensorboard --logdir DIR; pip install 'fedforge[tracking]')",
    )
    parser.add_argument(
        "--mlflow",
        nargs="?",
        const="default",
        metavar="URI",
        default=argparse.SUPPRESS,
        help=f"log to MLflow, in {experiment}: the "
        "settings as parameters, each round's numbers as metrics (step: the round), model.pt and "
        "accuracy.png as artifacts; URI default: sqlite:///OUT_DIR/mlflow.db, artifacts in "
        "OUT_DIR/mlartifacts (pip install 'fedforge[tracking]'; its UI needs the full mlflow "
        "package: mlflow ui --backend-store-uri URI)",
    )


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
_COMPARE_KEYS = [k for k in _CONFIG_KEYS if k != "target"]


def _overrides(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in _CONFIG_KEYS if hasattr(args, k)}


def _run_config(args: argparse.Namespace) -> Config:
    """The settings of a new run, or with --resume RUN_DIR those saved in RUN_DIR, with --config
    and flags on top: only settings that do not change what the rounds compute may differ
    (EXECUTION_KEYS: more rounds, another engine, ...); any other is refused by name."""
    from .experiment import check_resumable

    if not args.resume:
        return _config(args, _CONFIG_KEYS)
    run_dir = Path(args.resume)
    changes = settings(args.config)
    config = Config.load(run_dir / "config.toml", {**changes, **_overrides(args)})
    config = config.replace(out_dir=str(run_dir.parent), name=run_dir.name)
    check_resumable(run_dir, config)
    return config


def _checkpoint_key(args: argparse.Namespace) -> bytes | None:
    from .checkpoint import read_key

    return read_key(args.checkpoint_key_file) if args.checkpoint_key_file else None


def _cmd_run(args: argparse.Namespace) -> int:
    from .experiment import run_experiment
    from .report import headline

    config = _run_config(args)
    outcome = run_experiment(
        config,
        progress=not args.quiet,
        resume=bool(args.resume),
        trackers=_trackers(config, config.out_dir),
        checkpoint_key=_checkpoint_key(args),
    )
    final = outcome.history.final
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

    from .compare import compare, variants_from_file, write_comparison

    # The shared settings, checked key by key; as a whole only within each run, which may complete
    # them (a --noise-multiplier for runs that each set dp in the runs file).
    base = settings(args.config, {k: getattr(args, k) for k in _COMPARE_KEYS if hasattr(args, k)})
    variants = {name: {"strategy": name} for name in args.strategies or []}
    if args.runs:
        variants.update(variants_from_file(args.runs))
    if args.resume and not base.get("name"):
        raise ConfigError("--resume needs --name: the comparison whose runs to continue")
    name = base.pop("name", None) or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    root = base.get("out_dir", Config.__dataclass_fields__["out_dir"].default)
    out_dir = Path(root) / name
    runs = compare(
        base,
        variants,
        out_dir=out_dir,
        jobs=args.jobs,
        resume=args.resume,
        trackers=_trackers(base, root, comparison=name),
    )
    print(write_comparison(runs, out_dir, target=args.target, title=name))
    print(f"outputs in {out_dir}: comparison.md, comparison.csv, comparison.png, and a folder per run")
    return 0


def _secure_aggregation(args: argparse.Namespace):
    from .secagg import SecureAggregation

    if not args.secure_aggregation:
        given = [
            flag
            for flag, value in (
                ("--secagg-threshold", args.secagg_threshold),
                ("--secagg-neighbours", args.secagg_neighbours),
                ("--secagg-clip", args.secagg_clip),
                ("--secagg-max-examples", args.secagg_max_examples),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(f"{', '.join(given)} without --secure-aggregation")
        return None
    threshold = args.secagg_threshold or "0.5"
    try:
        threshold = int(threshold) if threshold.isdigit() else float(threshold)
    except ValueError:
        raise ConfigError(f"--secagg-threshold must be a count or a fraction, got {threshold!r}") from None
    defaults = SecureAggregation()
    return SecureAggregation(
        threshold=threshold,
        neighbours=args.secagg_neighbours,
        clip=defaults.clip if args.secagg_clip is None else args.secagg_clip,
        max_examples=args.secagg_max_examples or defaults.max_examples,
    )


def _dashboard(args: argparse.Namespace):
    from .network.auth import read_secret
    from .network.dashboard import DashboardSettings

    if args.dashboard is None:
        if args.dashboard_address or args.dashboard_token_file:
            raise ConfigError("--dashboard-address and --dashboard-token-file need --dashboard PORT")
        return None
    token = read_secret(args.dashboard_token_file) if args.dashboard_token_file else None
    return DashboardSettings(args.dashboard, args.dashboard_address or "127.0.0.1", token)


def _cmd_server(args: argparse.Namespace) -> int:
    from .network.auth import load_tokens
    from .server import serve

    config = _run_config(args)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("give both --tls-cert and --tls-key")
    if not args.tls_cert and not args.insecure:
        raise ConfigError("give --tls-cert and --tls-key, or --insecure for plaintext (testing only)")
    tls = None
    if args.tls_cert:
        tls = (_read(args.tls_key), _read(args.tls_cert))
    else:
        log.warning("plaintext mode (--insecure): updates and secrets cross the network unencrypted")
    _check_message_mb(args.max_message_mb)
    outcome = serve(
        config,
        address=args.address,
        tokens=load_tokens(args.tokens),
        tls=tls,
        min_clients=args.min_clients,
        min_fit_clients=args.min_fit_clients,
        round_timeout=args.round_timeout,
        max_message_bytes=int(args.max_message_mb * 2**20),
        resume=bool(args.resume),
        progress=not args.quiet,
        on_listening=lambda port: print(f"fedforge server: listening on port {port}", flush=True),
        keepalive=args.keepalive,
        max_client_examples=args.max_client_examples,
        secure=_secure_aggregation(args),
        min_available_clients=args.min_available_clients,
        trackers=_trackers(config, config.out_dir),
        dashboard=_dashboard(args),
        on_dashboard=lambda url: print(f"fedforge server: dashboard at {url}", flush=True),
        checkpoint_key=_checkpoint_key(args),
    )
    from .report import headline

    print(f"final {headline(outcome.history.final, config.client_config().task.primary)}; outputs in {outcome.run_dir}")
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    from .models import model_factory
    from .network.auth import read_secret
    from .network.client import LocalData, PartitionOf, run_client
    from .network.welcome import ClientLimits, References
    from .tasks import make_task

    if not args.root_cert and not args.insecure:
        raise ConfigError("give --root-cert (the CA that signed the server's certificate), or --insecure")
    if not args.give_up_after > 0:
        raise ConfigError(f"--give-up-after must be a number of seconds > 0 (inf: never), got {args.give_up_after}")
    floor = _secagg_floor(args)
    if sum(map(bool, (args.partition_of, args.data, args.app))) != 1:
        raise ConfigError(
            "give one of --app package.module:object (your own code), --data DIR (this client's own "
            "data) or --partition-of DATASET:INDEX/N"
        )
    data: ClientApp | PartitionOf | LocalData
    if args.app:
        from .app import load_app

        data = load_app(args.app)
    else:
        data = PartitionOf.parse(args.partition_of) if args.partition_of else LocalData(args.data)
    _check_message_mb(args.max_message_mb)
    if args.model is not None:  # the operator's own code: imported now, so that a typo is one line here
        model_factory(args.model)
    if args.task is not None:
        make_task(args.task)
    secret = read_secret(args.token_file)
    if args.insecure:
        log.warning("plaintext mode (--insecure): this client's secret and updates cross the network unencrypted")
    return run_client(
        args.server,
        args.client_id,
        secret,
        data,
        root_cert=_read(args.root_cert) if args.root_cert else None,
        compression=args.compress,
        max_message_bytes=int(args.max_message_mb * 2**20),
        give_up_after=args.give_up_after,
        retry_on_server_failure=args.retry_on_server_failure,
        secagg_floor=floor,
        limits=ClientLimits(
            max_epochs=args.max_epochs,
            max_steps=args.max_steps,
            max_batch_size=args.max_batch_size,
            max_round_seconds=args.max_round_seconds,
            min_noise=args.dp_min_noise,
        ),
        references=References(model=args.model, task=args.task, allow=frozenset(args.allow)),
    )


def _check_message_mb(value: float) -> None:
    if not 0 < value < 2048:  # gRPC's limits are 32-bit byte counts
        raise ConfigError(f"--max-message-mb must be > 0 and < 2048, got {value}")


def _secagg_floor(args: argparse.Namespace):
    from .secagg.protocol import Floor

    try:
        return Floor(
            args.secagg_min_clients, args.secagg_min_neighbours, args.secagg_min_threshold, args.secagg_max_neighbours
        )
    except ValueError as e:
        raise ConfigError(str(e).replace("the secure round floor's ", "--secagg-min-")) from None


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
    for record in history.records:
        print(round_line(record, history.final.round))
    return 0


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None


_KEY_HELP = (
    "sign the run's checkpoints with the secret in FILE (HMAC-SHA256; kept outside the run folder), "
    "and resume only a checkpoint signed with it"
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedforge", description="Federated learning simulations and deployments.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a federated experiment (defaults: the tutorial's)")
    run.add_argument("--config", help="TOML file of settings; flags override it")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last completed round (flags may change e.g. --rounds)",
    )
    run.add_argument("--checkpoint-key-file", metavar="FILE", help=_KEY_HELP)
    _add_tracking_flags(run)
    _add_config_flags(run)
    run.set_defaults(handler=_cmd_run)

    comp = sub.add_parser(
        "compare",
        help="run several strategies or settings on the same partition, seed and selected clients; one plot, one table",
    )
    comp.add_argument("--config", help="TOML file of the base settings; flags override it")
    comp.add_argument("--strategies", nargs="+", metavar="STRATEGY", help="one run per strategy, e.g. fedavg fedprox")
    comp.add_argument("--runs", metavar="FILE", help="TOML file of named runs: [label] then the settings it changes")
    comp.add_argument(
        "--target",
        type=float,
        help="report the round each run first reaches this value of the "
        "task's test metric (accuracy, r2, ...; at most, for perplexity) (a csv:, parquet: or hf: "
        "dataset's target column: set target in --config)",
    )
    comp.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default: 1)")
    comp.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs already in OUT_DIR/NAME from their last "
        "completed round (finished ones are reported as they are); needs --name",
    )
    comp.add_argument("-q", "--quiet", action="store_true", help="(runs never show progress bars)")
    _add_tracking_flags(comp, compare=True)
    _add_config_flags(comp, _COMPARE_KEYS)
    comp.set_defaults(handler=_cmd_compare)

    srv = sub.add_parser("server", help="run an experiment with clients that connect over the network")
    srv.add_argument("--config", help="TOML file of settings; flags override it")
    srv.add_argument("--address", default="0.0.0.0:8080", help="host:port to listen on (port 0: any free port)")
    srv.add_argument("--tokens", required=True, help="client secrets file (fedforge enroll)")
    srv.add_argument("--tls-cert", help="server certificate (PEM)")
    srv.add_argument("--tls-key", help="server private key (PEM)")
    srv.add_argument("--insecure", action="store_true", help="plaintext, no TLS: for testing only")
    srv.add_argument("--min-clients", type=int, default=2, help="clients to wait for before round 1")
    srv.add_argument(
        "--min-fit-clients",
        type=int,
        help="updates a round needs, else it is retried with a new selection (default: half the clients per round)",
    )
    srv.add_argument(
        "--min-available-clients",
        type=int,
        help="clients each round waits for (up to --round-timeout) "
        "before it selects (default: the quorum, --min-fit-clients)",
    )
    srv.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round waits for updates")
    srv.add_argument(
        "--keepalive",
        type=float,
        default=20.0,
        help="seconds without traffic before the server pings a "
        "client; a client that leaves a ping unanswered for half that long is dropped (default: 20)",
    )
    srv.add_argument("--max-message-mb", type=float, default=256.0, help="largest update accepted")
    srv.add_argument(
        "--max-client-examples",
        type=int,
        default=10_000_000,
        help="largest example count an update "
        "may claim (it weighs the average); the step count must also match it (default: 10000000)",
    )
    srv.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="sum each round's updates under secure "
        "aggregation (SecAgg+): the server learns only the sum (docs/secure-aggregation.md)",
    )
    srv.add_argument(
        "--secagg-threshold",
        metavar="T",
        help="shares that rebuild a client's secrets: a fraction of "
        "its neighbours and itself (default 0.5: a majority) or a count; a round completes while T of "
        "each client's holders survive",
    )
    srv.add_argument(
        "--secagg-neighbours",
        type=int,
        metavar="K",
        help="neighbours each client pairs with (default: "
        "every other client up to 64 per round, 2*ceil(2*log2 n) above)",
    )
    srv.add_argument(
        "--secagg-clip",
        type=float,
        metavar="C",
        help="bound on each update's L2 norm, the fixed "
        "point's range (default 10; --dp's clip under differential privacy)",
    )
    srv.add_argument(
        "--secagg-max-examples",
        type=int,
        metavar="N",
        help="largest example count an update weighs "
        "(larger ones are capped; default 65536); with the clip it sets the fixed point's precision",
    )
    srv.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last completed round")
    srv.add_argument("--checkpoint-key-file", metavar="FILE", help=_KEY_HELP)
    srv.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    srv.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    srv.add_argument(
        "--dashboard",
        type=int,
        metavar="PORT",
        help="serve a live dashboard (clients, the round, "
        "accuracy and loss, refusals) at http://127.0.0.1:PORT/ (0: any free port)",
    )
    srv.add_argument(
        "--dashboard-address",
        metavar="HOST",
        help="listen for the dashboard on HOST instead of "
        "127.0.0.1; any other than loopback only with --tls-cert/--tls-key and --dashboard-token-file",
    )
    srv.add_argument(
        "--dashboard-token-file",
        metavar="FILE",
        help="a token (16+ characters) every dashboard request "
        "must carry: Authorization: Bearer TOKEN, or open https://HOST:PORT/?token=TOKEN",
    )
    _add_tracking_flags(srv)
    _add_config_flags(srv)
    srv.set_defaults(handler=_cmd_server)

    from .network.welcome import ClientLimits

    cli = sub.add_parser("client", help="train for a server, keeping the data here")
    cli.add_argument("--server", required=True, help="host:port of the server")
    cli.add_argument("--client-id", type=int, required=True)
    cli.add_argument("--token-file", required=True, help="this client's secret (fedforge enroll)")
    cli.add_argument(
        "--data",
        metavar="DIR",
        help="this client's own data: DIR/train.npz (x, y) or the IDX "
        "pair train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]",
    )
    cli.add_argument(
        "--app",
        metavar="PACKAGE.MODULE:OBJECT",
        help="your own code: a fedforge.ClientApp giving this "
        "client's data (and optionally its task and model), imported from the current folder or the "
        "installed packages",
    )
    cli.add_argument(
        "--partition-of",
        metavar="DATASET:INDEX/N",
        help="demos and tests: train on part INDEX of the run's N-way partition of DATASET",
    )
    cli.add_argument("--root-cert", help="CA certificate that signed the server's certificate (PEM)")
    cli.add_argument("--insecure", action="store_true", help="plaintext, no TLS: for testing only")
    cli.add_argument("--compress", choices=["fp16", "int8"], help="compress updates (lossy)")
    cli.add_argument(
        "--max-message-mb",
        type=float,
        default=256.0,
        help="largest message accepted from the server, in MiB (default: 256)",
    )
    cli.add_argument(
        "--model",
        metavar="NAME",
        help="the model this client trains, instead of the server's: a built-in or package.module:factory of your own",
    )
    cli.add_argument(
        "--task",
        metavar="NAME",
        help="the task this client trains, instead of the server's: a built-in or package.module:object of your own",
    )
    cli.add_argument(
        "--allow",
        metavar="PACKAGE.MODULE:OBJECT",
        action="append",
        default=[],
        help="code the server "
        "may name as its model or task, which this client then imports and runs (repeatable; by "
        "default a client imports only its own --app, --model and --task)",
    )
    cli.add_argument(
        "--max-epochs",
        type=int,
        default=ClientLimits.max_epochs,
        help="most local epochs a server may ask for (default: %(default)s)",
    )
    cli.add_argument(
        "--max-steps",
        type=int,
        default=ClientLimits.max_steps,
        help="most optimizer steps a server may ask for in one round (default: %(default)s)",
    )
    cli.add_argument(
        "--max-batch-size",
        type=int,
        default=ClientLimits.max_batch_size,
        help="largest batch size a server may ask for (default: %(default)s)",
    )
    cli.add_argument(
        "--max-round-seconds",
        type=float,
        default=ClientLimits.max_round_seconds,
        help="seconds of "
        "training one round may take; past them the client leaves that round and sends nothing "
        "(default: %(default)s)",
    )
    cli.add_argument(
        "--dp-min-noise",
        type=float,
        metavar="Z",
        help="local differential privacy this client "
        "insists on: refuse (exit status 3, sending nothing) a task asking for a noise multiplier below "
        "Z, for no clip bound, or opening a secure aggregation round (default: none; the client "
        "applies whatever clip and noise the server asks for)",
    )
    cli.add_argument(
        "--give-up-after",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="exit with status 2 after this many seconds without a server (default: %(default)g; inf: never)",
    )
    cli.add_argument(
        "--retry-on-server-failure",
        action="store_true",
        help="when the server reports that its run "
        "failed, keep reconnecting (for a server that will be restarted with --resume) instead of "
        "exiting with status 3",
    )
    cli.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's choice; give 1 when several clients share a machine)",
    )
    cli.add_argument(
        "--secagg-min-clients",
        type=int,
        default=3,
        metavar="N",
        help="decline a secure aggregation "
        "round of fewer participants (default 3: with 2, the other may be the server's own key)",
    )
    cli.add_argument(
        "--secagg-min-neighbours",
        type=int,
        default=2,
        metavar="K",
        help="decline a secure aggregation round in which this client masks with fewer neighbours (default 2)",
    )
    cli.add_argument(
        "--secagg-min-threshold",
        type=int,
        default=2,
        metavar="T",
        help="decline a secure aggregation round whose threshold is below T (default 2)",
    )
    cli.add_argument(
        "--secagg-max-neighbours",
        type=int,
        default=1000,
        metavar="K",
        help="decline a secure aggregation round that gives this client more than K neighbours (each "
        "costs a key agreement, shares and a mask; default 1000)",
    )
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
    part.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
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
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
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
