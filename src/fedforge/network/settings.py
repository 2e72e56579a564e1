"""The settings of a deployment's server and of each of its clients, as flags and TOML.

`fedforge server --config server.toml` reads the run's settings (as `fedforge run` does) and
these, flat or in the table [server]; `fedforge client --config client.toml` reads a client's,
flat or in the table [node]. Flags override the file.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._options import option
from ..errors import ConfigError
from .welcome import ClientLimits


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None


def check_message_mb(value: float) -> None:
    if not 0 < value < 2048:  # gRPC's limits are 32-bit byte counts
        raise ConfigError(f"--max-message-mb must be > 0 and < 2048, got {value}")


@dataclass(frozen=True)
class ServerSettings:
    """Where a deployment's server listens, whom it admits, its quorum and its protections."""

    address: str = option("0.0.0.0:8080", "host:port to listen on (port 0: any free port)")
    tokens: str | None = option(None, "client secrets file (fedforge enroll); required", metavar="FILE")
    tls_cert: str | None = option(None, "server certificate (PEM)", metavar="FILE")
    tls_key: str | None = option(None, "server private key (PEM)", metavar="FILE")
    insecure: bool = option(False, "plaintext, no TLS: for testing only")
    min_clients: int = option(2, "clients to wait for before round 1")
    min_fit_clients: int | None = option(
        None, "updates a round needs, else it is retried with a new selection (default: half the clients per round)"
    )
    min_available_clients: int | None = option(
        None,
        "clients each round waits for (up to --round-timeout) before it selects (default: the quorum, "
        "--min-fit-clients)",
    )
    round_timeout: float = option(600.0, "seconds a round waits for updates")
    keepalive: float = option(
        20.0,
        "seconds without traffic before the server pings a client; a client that leaves a ping "
        "unanswered for half that long is dropped",
    )
    max_message_mb: float = option(256.0, "largest update accepted, in MiB")
    max_client_examples: int = option(
        10_000_000,
        "largest example count an update may claim (it weighs the average); the step count must also match it",
    )
    server_eval: bool = option(
        True,
        "evaluate the global model on the server's own test data; --no-server-eval: the server has none, "
        "its clients evaluate it on their held-out examples (federated_* only)",
    )
    evaluate_fraction: float | None = option(
        None,
        "fraction of the connected clients that evaluate each round's global model on their held-out "
        "examples, taken in turn (default: 1 with --no-server-eval, else 0: the server evaluates)",
        metavar="F",
    )
    secure_aggregation: bool = option(
        False,
        "sum each round's updates under secure aggregation (SecAgg+): the server learns only the sum "
        "(docs/secure-aggregation.md)",
    )
    secagg_threshold: int | float | None = option(
        None,
        "shares that rebuild a client's secrets: a fraction of its neighbours and itself (default 0.5: "
        "a majority) or a count; a round completes while T of each client's holders survive",
        metavar="T",
    )
    secagg_neighbours: int | None = option(
        None,
        "neighbours each client pairs with (default: every other client up to 64 per round, 2*ceil(2*log2 n) above)",
        metavar="K",
    )
    secagg_clip: float | None = option(
        None,
        "bound on each update's L2 norm, the fixed point's range (default 10; --dp's clip under differential privacy)",
        metavar="C",
    )
    secagg_max_examples: int | None = option(
        None,
        "largest example count an update weighs (larger ones are capped; default 65536); with the clip "
        "it sets the fixed point's precision",
        metavar="N",
    )
    dashboard: int | None = option(
        None,
        "serve a live dashboard (clients, the round, accuracy and loss, refusals) at "
        "http://127.0.0.1:PORT/ (0: any free port)",
        metavar="PORT",
    )
    dashboard_address: str | None = option(
        None,
        "listen for the dashboard on HOST instead of 127.0.0.1; any other than loopback only with "
        "--tls-cert/--tls-key and --dashboard-token-file",
        metavar="HOST",
    )
    dashboard_token_file: str | None = option(
        None,
        "a token (16+ characters) every dashboard request must carry: Authorization: Bearer TOKEN, or "
        "open https://HOST:PORT/?token=TOKEN",
        metavar="FILE",
    )
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")

    def __post_init__(self):
        if self.tokens is None:
            raise ConfigError("give --tokens FILE (fedforge enroll writes it), or tokens in the config file")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("give both --tls-cert and --tls-key")
        if not self.tls_cert and not self.insecure:
            raise ConfigError("give --tls-cert and --tls-key, or --insecure for plaintext (testing only)")
        check_message_mb(self.max_message_mb)
        if self.evaluate_fraction is not None and not 0 <= self.evaluate_fraction <= 1:
            raise ConfigError(f"--evaluate-fraction must be in [0, 1], got {self.evaluate_fraction}")
        if not self.secure_aggregation:
            given = [
                "--" + name.replace("_", "-")
                for name in ("secagg_threshold", "secagg_neighbours", "secagg_clip", "secagg_max_examples")
                if getattr(self, name) is not None
            ]
            if given:
                raise ConfigError(f"{', '.join(given)} without --secure-aggregation")
        if self.dashboard is None and (self.dashboard_address or self.dashboard_token_file):
            raise ConfigError("--dashboard-address and --dashboard-token-file need --dashboard PORT")
        self.secure()

    def tls(self) -> tuple[bytes, bytes] | None:
        """The server's (key, certificate), read from their files; None in plaintext mode."""
        return (_read(self.tls_key), _read(self.tls_cert)) if self.tls_key and self.tls_cert else None

    def secure(self):
        """The secure aggregation settings (a `SecureAggregation`), or None without secure_aggregation."""
        from ..secagg import SecureAggregation

        if not self.secure_aggregation:
            return None
        defaults = SecureAggregation()
        return SecureAggregation(
            threshold=0.5 if self.secagg_threshold is None else self.secagg_threshold,
            neighbours=self.secagg_neighbours,
            clip=defaults.clip if self.secagg_clip is None else self.secagg_clip,
            max_examples=self.secagg_max_examples or defaults.max_examples,
        )

    def dashboard_settings(self):
        """Where the dashboard listens and its token (a `DashboardSettings`), or None without one."""
        from .auth import read_secret
        from .dashboard import DashboardSettings

        if self.dashboard is None:
            return None
        token = read_secret(self.dashboard_token_file) if self.dashboard_token_file else None
        return DashboardSettings(self.dashboard, self.dashboard_address or "127.0.0.1", token)


@dataclass(frozen=True)
class ClientNodeSettings:
    """One deployment client: its server, its identity, its data, and what it accepts of the server."""

    server: str | None = option(None, "host:port of the server; required", metavar="HOST:PORT")
    client_id: int | None = option(None, "this client's id (fedforge enroll --client-id); required")
    token_file: str | None = option(None, "this client's secret (fedforge enroll); required", metavar="FILE")
    data: str | None = option(
        None,
        "this client's own data: DIR/train.npz (x, y) or the IDX pair train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz]",
        metavar="DIR",
    )
    app: str | None = option(
        None,
        "your own code: a fedforge.ClientApp giving this client's data (and optionally its task and "
        "model), imported from the current folder or the installed packages",
        metavar="PACKAGE.MODULE:OBJECT",
    )
    partition_of: str | None = option(
        None,
        "demos and tests: train on part INDEX of the run's N-way partition of DATASET",
        metavar="DATASET:INDEX/N",
    )
    root_cert: str | None = option(None, "CA certificate that signed the server's certificate (PEM)", metavar="FILE")
    insecure: bool = option(False, "plaintext, no TLS: for testing only")
    compress: str | None = option(None, "compress updates (lossy)", ("fp16", "int8"))
    max_message_mb: float = option(256.0, "largest message accepted from the server, in MiB")
    model: str | None = option(
        None,
        "the model this client trains, instead of the server's: a built-in or package.module:factory of your own, "
        "or hf:PATH, this client's copy of the server's pretrained transformer (which an hf: run needs)",
        metavar="NAME",
    )
    task: str | None = option(
        None,
        "the task this client trains, instead of the server's: a built-in or package.module:object of your own",
        metavar="NAME",
    )
    allow: tuple[str, ...] = option(
        (),
        "code the server may name as its model or task, which this client then imports and runs "
        "(repeatable; by default a client imports only its own --app, --model and --task)",
        metavar="PACKAGE.MODULE:OBJECT",
    )
    max_epochs: int = option(ClientLimits.max_epochs, "most local epochs a server may ask for")
    max_steps: int = option(ClientLimits.max_steps, "most optimizer steps a server may ask for in one round")
    max_batch_size: int = option(ClientLimits.max_batch_size, "largest batch size a server may ask for")
    max_round_seconds: float = option(
        ClientLimits.max_round_seconds,
        "seconds of training one round may take; past them the client leaves that round and sends nothing",
    )
    dp_min_noise: float | None = option(
        None,
        "local differential privacy this client insists on: refuse (exit status 3, sending nothing) a "
        "task asking for a noise multiplier below Z, for no clip bound, or opening a secure aggregation "
        "round (default: none; the client applies whatever clip and noise the server asks for)",
        metavar="Z",
    )
    give_up_after: float = option(
        600.0, "exit with status 2 after this many seconds without a server (inf: never)", metavar="SECONDS"
    )
    retry_on_server_failure: bool = option(
        False,
        "when the server reports that its run failed, keep reconnecting (for a server that will be "
        "restarted with --resume) instead of exiting with status 3",
    )
    threads: int | None = option(
        None, "CPU threads for torch (default: torch's choice; give 1 when several clients share a machine)"
    )
    state_dir: str = option(
        "fedforge-state",
        "folder where this client keeps what its algorithm keeps between rounds (its personal layers, "
        "SCAFFOLD's control variate, ...) and its optimizer's state, as client-ID.pt, written after each "
        "task it trains and read back when it starts, so that a restarted client goes on where it was",
        metavar="DIR",
    )
    secagg_min_clients: int = option(
        3,
        "decline a secure aggregation round of fewer participants (with 2, the other may be the server's own key)",
        metavar="N",
    )
    secagg_min_neighbours: int = option(
        2, "decline a secure aggregation round in which this client masks with fewer neighbours", metavar="K"
    )
    secagg_min_threshold: int = option(2, "decline a secure aggregation round whose threshold is below T", metavar="T")
    secagg_max_neighbours: int = option(
        1000,
        "decline a secure aggregation round that gives this client more than K neighbours (each costs "
        "a key agreement, shares and a mask)",
        metavar="K",
    )

    def __post_init__(self):
        for name in ("server", "client_id", "token_file"):
            if getattr(self, name) is None:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"give {flag} (or {name} in the config file)")
        if self.compress not in (None, "fp16", "int8"):
            raise ConfigError(f"unknown compress {self.compress!r} (choose from: fp16, int8)")
        if not self.root_cert and not self.insecure:
            raise ConfigError("give --root-cert (the CA that signed the server's certificate), or --insecure")
        if not self.give_up_after > 0:
            raise ConfigError(f"--give-up-after must be a number of seconds > 0 (inf: never), got {self.give_up_after}")
        self.floor()
        if sum(map(bool, (self.partition_of, self.data, self.app))) != 1:
            raise ConfigError(
                "give one of --app package.module:object (your own code), --data DIR (this client's own "
                "data) or --partition-of DATASET:INDEX/N"
            )
        check_message_mb(self.max_message_mb)
        self.limits()

    def floor(self):
        """The smallest secure aggregation round this client joins (a `secagg.protocol.Floor`)."""
        from ..secagg.protocol import Floor

        try:
            return Floor(
                clients=self.secagg_min_clients,
                neighbours=self.secagg_min_neighbours,
                threshold=self.secagg_min_threshold,
                max_neighbours=self.secagg_max_neighbours,
            )
        except ValueError as e:
            raise ConfigError(str(e).replace("the secure round floor's ", "--secagg-min-")) from None

    def limits(self) -> ClientLimits:
        """The most a server may ask of this client, and the least noise it accepts."""
        return ClientLimits(
            max_epochs=self.max_epochs,
            max_steps=self.max_steps,
            max_batch_size=self.max_batch_size,
            max_round_seconds=self.max_round_seconds,
            min_noise=self.dp_min_noise,
        )

    def root_certificate(self) -> bytes | None:
        """The CA certificate's bytes, or None in plaintext mode."""
        return _read(self.root_cert) if self.root_cert else None


__all__ = ["ClientNodeSettings", "ServerSettings", "check_message_mb"]
