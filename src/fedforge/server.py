"""`fedforge server`: run an experiment whose clients connect over the network.

Everything that can be checked without clients is checked before the server listens: the
settings, the data and the model, the output folder (writable), and on `--resume` every value of
the checkpoint (checkpoint.check_checkpoint). When the run ends, every connected client is told
how: finished (with the last round in which its update counted, which settles the state its last
task left: network/state.py), or failed with the reason (a full disk, an interrupt), so a client
never takes a failed run for a finished one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

from .engines.network import DEFAULT_MAX_CLIENT_EXAMPLES, NetworkEngine
from .errors import ConfigError
from .experiment import prepare, run_experiment
from .network.dashboard import Dashboard, DashboardSettings
from .network.hub import DEFAULT_KEEPALIVE, Hub
from .network.inputs import InputSummary
from .network.welcome import MAX_LR, MAX_ROUNDS, welcome_header
from .network.wire import Kind, Message
from .secagg import SecureAggregation
from .simulation import clients_per_round_count
from .tracking import Tracker

log = logging.getLogger("fedforge.server")


def serve(
    config,
    *,
    address: str,
    tokens: dict[int, str],
    tls: tuple[bytes, bytes] | None,
    min_clients: int,
    min_fit_clients: int | None,
    round_timeout: float,
    max_message_bytes: int,
    resume: bool = False,
    progress: bool = True,
    on_listening=None,
    keepalive: float = DEFAULT_KEEPALIVE,
    max_client_examples: int = DEFAULT_MAX_CLIENT_EXAMPLES,
    secure: SecureAggregation | None = None,
    min_available_clients: int | None = None,
    trackers: Sequence[Tracker] = (),
    dashboard: DashboardSettings | None = None,
    on_dashboard=None,
    checkpoint_key: bytes | None = None,
    server_eval: bool = True,
    evaluate_fraction: float | None = None,
):
    """Run `config` with the clients that connect to `address`; returns the run's outcome.

    `min_fit_clients` (the quorum of a round) defaults to half the clients per round, rounded up.
    With `secure`, every round is summed under secure aggregation: the server sees no update.
    `trackers` (TensorBoard, MLflow) log the run as `run_experiment`'s do, with each round's bytes.
    `dashboard`: serve the live dashboard there (network/dashboard.py); `on_dashboard(url)` once it listens.
    `checkpoint_key`: checkpoints signed with it, as `run_experiment`'s.
    `server_eval` False: the server has no test data of its own; it evaluates the global model on
    nothing (no test_* in the history), and its clients evaluate it instead.
    `evaluate_fraction`: the fraction of connected clients that evaluate each round's global model
    on their held-out examples (the round's federated_* then are theirs); default 1 without
    `server_eval`, else 0 (the server evaluates on its own copy of the clients' held-out rows).
    """
    per_round = clients_per_round_count(config.clients_per_round, config.num_clients)
    if min_fit_clients is None:
        min_fit_clients = math.ceil(per_round / 2)
    if not 1 <= min_fit_clients <= per_round:
        raise ConfigError(
            f"min_fit_clients must be between 1 and the {per_round} clients per round, got {min_fit_clients}"
        )
    if min_available_clients is not None and not min_fit_clients <= min_available_clients <= per_round:
        raise ConfigError(
            f"min_available_clients must be between the quorum ({min_fit_clients}) and the {per_round} "
            f"clients per round, got {min_available_clients}"
        )
    if min_clients < 1:
        raise ConfigError(f"min_clients must be >= 1, got {min_clients}")
    if not keepalive >= 1:
        raise ConfigError(f"keepalive must be >= 1 second, got {keepalive}")
    if not round_timeout > 0:
        raise ConfigError(f"round_timeout must be > 0 seconds, got {round_timeout}")
    if max_client_examples < 1:
        raise ConfigError(f"max_client_examples must be >= 1, got {max_client_examples}")
    if config.profiled:  # a deployment's clients take the time they take
        raise ConfigError("device profiles and the virtual clock are for simulations: a deployment runs in real time")
    if config.aggregation != "sync":
        raise ConfigError(f"aggregation {config.aggregation} is simulated only: fedforge server runs rounds (for now)")
    if config.rounds > MAX_ROUNDS:  # every task names the run's rounds, and clients refuse more
        raise ConfigError(f"rounds must be at most {MAX_ROUNDS:,} in a deployment, got {config.rounds}")
    if config.lr > MAX_LR:  # each task's lr is at most the run's (schedules only lower it)
        raise ConfigError(f"lr must be at most {MAX_LR:g} in a deployment, got {config.lr}")
    if evaluate_fraction is None:
        evaluate_fraction = 0.0 if server_eval else 1.0
    if not 0 <= evaluate_fraction <= 1:
        raise ConfigError(f"evaluate_fraction must be in [0, 1], got {evaluate_fraction}")
    if not server_eval and not evaluate_fraction:
        raise ConfigError(
            "without server evaluation (--no-server-eval) and with --evaluate-fraction 0 nothing evaluates "
            "the global model: give a fraction of clients > 0"
        )
    if secure is not None:
        secure.check(config, per_round)
    board = Dashboard(dashboard, tls=tls) if dashboard is not None else None  # unsafe settings: refused here
    for tracker in trackers:  # a missing library: say so before the data loads
        tracker.prepare()
    # The data, the model, the output folder and on resume every value of the checkpoint: a
    # mistake is one line now, not once clients have come.
    prepared = prepare(config, resume=resume, progress=progress, checkpoint_key=checkpoint_key)
    if not server_eval:  # no test data of its own: the clients' evaluation is the run's only one
        prepared = dataclasses.replace(prepared, data=dataclasses.replace(prepared.data, test=None))
    if secure is not None and evaluate_fraction:
        log.warning(
            "under secure aggregation each evaluating client still reports its own metrics of the global "
            "model on its held-out examples in the clear (not its update); --evaluate-fraction 0 to ask none"
        )
    config, run_dir = prepared.config, prepared.run_dir
    welcome = welcome_header(config)
    if (inputs := evaluated_inputs(config, prepared.data)) is not None:
        welcome["test_inputs"] = inputs.to_header()
    hub = Hub(tokens, welcome=welcome, max_message_bytes=max_message_bytes, keepalive=keepalive)
    port = hub.start(address, tls)
    final: Message | Callable[[int], Message] = Message(
        Kind.SHUTDOWN, {"status": "failed", "reason": "the server stopped"}
    )
    try:
        if on_listening is not None:
            on_listening(port)
        if board is not None:
            url = board.start(config, hub.clients, history=run_dir / "history.json" if resume else None)
            if on_dashboard is not None:
                on_dashboard(url)
        log.info("waiting for %d clients", min_clients)
        hub.wait_for_clients(min_clients)
        engine = NetworkEngine(
            hub,
            round_timeout=round_timeout,
            min_fit_clients=min_fit_clients,
            max_client_examples=max_client_examples,
            secure=secure,
            min_available_clients=min_available_clients,
            watcher=board.state if board is not None else None,
            evaluate_fraction=evaluate_fraction,
        )
        # Differential privacy's noise from the OS's cryptographic source: a deployment's noise must not
        # be replayable from the run's seed (which config.toml records).
        outcome = run_experiment(
            config,
            progress=progress,
            engine=engine,
            resume=resume,
            secure_noise=True,
            trackers=[*trackers, board.tracker] if board is not None else trackers,
            prepared=prepared,
            checkpoint_key=checkpoint_key,
        )
        counted = outcome.kept.counted

        def done(client_id: int) -> Message:  # which of its updates counted last: it settles its last task's state
            return Message(Kind.SHUTDOWN, {"status": "done", "counted": counted.get(client_id, 0)})

        final = done
        return outcome
    except BaseException as e:
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e) or type(e).__name__
        final = Message(Kind.SHUTDOWN, {"status": "failed", "reason": reason[:500]})
        raise
    finally:
        hub.stop(final)
        if board is not None:
            board.stop()


def evaluated_inputs(config, data) -> InputSummary | None:
    """The shape, mean and spread of the inputs the server evaluates on (its test split), which its
    welcome tells clients so that one whose data are prepared otherwise can say so
    (network/inputs.py); None where they are not one tensor of floats, and for the synthetic
    dataset, whose clients' inputs are shifted by design."""
    if config.dataset == "synthetic":
        return None
    return InputSummary.of(data.test.x) if data.test is not None else None
