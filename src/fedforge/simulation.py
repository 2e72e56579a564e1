"""The round loop: select -> plan -> run clients -> transform -> aggregate -> evaluate -> record."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from . import _seeding
from .contract import ClientConfig, ClientUpdate, OptimizerState
from .data.federated import FederatedData, client_pool
from .engines import ClientTask, Engine, SequentialEngine
from .engines.base import RoundFailed
from .errors import ConfigError, FedforgeError
from .evaluation import evaluate
from .history import History, RoundRecord
from .privacy.run import SAMPLINGS, DifferentialPrivacy, PrivacyRun, sampling_for
from .privacy.sampling import poisson_sample
from .scenarios import Scenario, attack_update, client_work, label_flipped, malicious_clients
from .strategies import FedAvg, LinearStrategy, RunInfo, ServerState, Strategy

log = logging.getLogger("fedforge")


@dataclass(frozen=True)
class SimulationResult:
    history: History
    state: ServerState


def clients_per_round_count(clients_per_round: int | float, num_clients: int) -> int:
    """K from an int (a count) or a float in (0, 1] (a fraction of all clients, at least 1)."""
    if isinstance(clients_per_round, float):
        if not 0 < clients_per_round <= 1:
            raise ConfigError(f"clients_per_round as a fraction must be in (0, 1], got {clients_per_round}")
        return max(1, round(clients_per_round * num_clients))
    if clients_per_round < 1:
        raise ConfigError(f"clients_per_round must be >= 1, got {clients_per_round}")
    if clients_per_round > num_clients:
        raise ConfigError(f"clients_per_round={clients_per_round} is more than num_clients={num_clients}")
    return clients_per_round


def select_clients(num_clients: int, k: int, generator: torch.Generator) -> list[int]:
    """K distinct client ids drawn uniformly, in increasing order."""
    return sorted(torch.randperm(num_clients, generator=generator)[:k].tolist())


class _Tally:
    """Passes updates through, keeping their example-weighted training metrics."""

    def __init__(self, on_client: Callable[[ClientUpdate], None] | None):
        self.on_client = on_client
        self.examples = 0
        self.sums: dict[str, float] = {}

    def tap(self, updates: Iterable[ClientUpdate]) -> Iterator[ClientUpdate]:
        for update in updates:
            self.examples += update.num_examples
            metrics = update.training_metrics()
            for name, value in metrics.items():
                if value is not None:
                    self.sums[name] = self.sums.get(name, 0.0) + value * update.num_examples
            if self.on_client is not None:
                self.on_client(update)
            yield update

    def means(self) -> dict[str, float]:
        return {name: total / self.examples for name, total in self.sums.items()} if self.examples else {}


def _traffic(engine) -> dict[str, int]:
    """The message bytes an engine that counts them (the network's) has received and sent so far."""
    if not hasattr(engine, "bytes_up"):
        return {}
    return {"bytes_up": engine.bytes_up, "bytes_down": engine.bytes_down}


@dataclass(frozen=True)
class _Begun:
    """A round's attempt handed to the engine: who was selected, who dropped out, and the updates to come."""

    selected: Sequence[int]
    dropped: tuple[int, ...]
    updates: Iterator[ClientUpdate]


def _running(
    engine: Engine, model: nn.Module, params, tasks: Sequence[ClientTask], config: ClientConfig
) -> Iterator[ClientUpdate]:
    """`engine.run(...)`; an error it raises at once (an engine that starts its work when called)
    is raised when the updates are read, in the round they belong to."""
    try:
        return engine.run(model, params, tasks, config)
    except Exception as e:
        error = e

        def failed() -> Iterator[ClientUpdate]:
            raise error
            yield  # a generator

        return failed()


def _keep_optimizer_states(updates: Iterable[ClientUpdate], kept: dict) -> Iterator[ClientUpdate]:
    """Passes updates through, keeping each client's new optimizer state (when its task keeps one)."""
    for update in updates:
        if isinstance(update, ClientUpdate) and update.optimizer_state is not None:
            kept[update.client_id] = update.optimizer_state
        yield update


def simulate(
    model: nn.Module,
    data: FederatedData,
    *,
    rounds: int,
    clients_per_round: int | float,
    client: ClientConfig = ClientConfig(),
    strategy: Strategy | None = None,
    engine: Engine | None = None,
    seed: int = 0,
    eval_batch_size: int = 1024,
    eval_train: bool = False,
    scenario: Scenario = Scenario(),
    on_client: Callable[[ClientUpdate], None] | None = None,
    on_round: Callable[[RoundRecord, ServerState], None] | None = None,
    resume: tuple[ServerState, Sequence[RoundRecord]] | None = None,
    max_round_attempts: int = 10,
    privacy: DifferentialPrivacy | None = None,
    sampling: str = "fixed",
) -> SimulationResult:
    """Run federated training of `model` over `data` for `rounds` rounds.

    Each round: select clients -> plan their work (the strategy's local terms, the scenario's
    epochs, stragglers and dropouts) -> run them on `engine` -> transform the updates (the
    scenario's attacks) -> aggregate (`strategy`) -> evaluate -> record. The selected clients,
    each client's batches, and so the final weights depend only on `seed` (and the inputs),
    not on the engine.

    Args:
        model: its current weights are the initial global model; it is used, not changed.
        clients_per_round: a count, or a float in (0, 1] for a fraction of the clients.
        scenario: unequal work, stragglers, dropouts and attacks (none by default).
        eval_train: also evaluate the global model on all clients' training data every round
            (the global objective that FedProx's paper plots).
        on_client: called with each client update as it arrives (a PartialSum stands for several
            clients when the engine sums them, as the Ray engine does for a linear strategy).
        on_round: called after every round (and after the initial evaluation, round 0).
        resume: the state and records of the rounds already completed, to continue a run
            (every random choice derives from the seed and the round, so the continuation is
            the same as an uninterrupted run).
        max_round_attempts: how often a round whose engine raises RoundFailed (too few clients
            reported) is retried with a new selection before the run gives up.
        privacy: user-level differential privacy: a stage between the clients and the strategy
            (clip, noise the sum, the strategy's server optimizer on the noised mean), with an
            accountant; the run stops before a round would pass its epsilon budget.
        sampling: "fixed" (`clients_per_round` clients each round) or "poisson" (each client
            joins a round with probability clients_per_round / num_clients).
    """
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    k = clients_per_round_count(clients_per_round, data.num_clients)
    strategy = strategy or FedAvg()
    engine = engine or SequentialEngine()
    data = replace(
        data, train=client.task.data(data.train), test=client.task.data(data.test) if data.test is not None else None
    )
    device = data.train.device
    model = model.to(device)
    pool, starts = client_pool(data.train, data.partition, flipped=label_flipped(scenario, data.num_clients, seed))
    clients = [pool.rows(a, b) for a, b in itertools.pairwise(starts)]
    malicious = malicious_clients(scenario, data.num_clients, seed)
    # A linear strategy needs only the round's weighted mean, so an engine may send partial sums;
    # not of the clients whose own update a later stage transforms (the scenario's update attacks)
    # or whose optimizer state must come back.
    # The privacy stage clips each client's update: it needs them one by one.
    linear = isinstance(strategy, LinearStrategy) and not client.task.keep_optimizer_state and privacy is None
    transformed = malicious if scenario.attack not in (None, "label_flip") else frozenset()

    def attacked(updates: Iterable[ClientUpdate], round_: int) -> Iterator[ClientUpdate]:
        """The scenario's transform stage: malicious clients' updates as their attack makes them."""
        for update in updates:
            attacker = isinstance(update, ClientUpdate) and update.client_id in malicious
            yield attack_update(update, scenario, seed, round_) if attacker else update

    federated_test = None
    if data.client_test is not None and any(len(part) for part in data.client_test):
        federated_test = data.train.subset(np.concatenate(list(data.client_test)))

    def measure(
        state: ServerState,
        clients_: tuple[int, ...],
        tally: _Tally | None,
        started: float,
        trained: float,
        dropped: tuple[int, ...] = (),
    ) -> RoundRecord:
        def on(test_data):
            return evaluate(model, state.params, test_data, batch_size=eval_batch_size, task=client.task)

        test = on(data.test) if data.test is not None else None
        fed = on(federated_test) if federated_test else None
        on_train = on(pool) if eval_train else None
        train = tally.means() if tally else {}
        # The task's metrics beyond loss and accuracy (which have fields of their own), by name.
        named = {
            f"{where}_{name}": value
            for where, metrics in (
                ("train", train),
                ("test", test and test.metrics),
                ("federated", fed and fed.metrics),
            )
            if metrics
            for name, value in metrics.items()
            if name not in ("loss", "accuracy")
        }
        return RoundRecord(
            round=state.round,
            clients=clients_,
            test_loss=test and test.loss,
            test_accuracy=test and test.accuracy,
            train_loss=train.get("loss"),
            train_accuracy=train.get("accuracy"),
            federated_loss=fed and fed.loss,
            federated_accuracy=fed and fed.accuracy,
            global_train_loss=on_train and on_train.loss,
            seconds=time.perf_counter() - started,
            train_seconds=trained - started,
            dropped=dropped,
            metrics=named,
        )

    # Each client's optimizer state between its rounds, when the task keeps it: it stays here, with
    # the simulated clients, and the next task of the client carries it back.
    optimizer_states: dict[int, OptimizerState] = {}
    started = time.perf_counter()
    run = RunInfo(num_clients=data.num_clients, client_lr=client.lr, client_momentum=client.momentum)
    dp = None
    if privacy is not None:
        privacy.check(strategy, data.num_clients)
        dp = PrivacyRun(
            privacy,
            sampling_for(sampling, data.num_clients, k),
            rounds=rounds,
            seed=seed,
            saved=resume[0].privacy if resume is not None else None,
        )
    elif sampling not in SAMPLINGS:
        raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if resume is not None:
        state, records = resume[0], list(resume[1])
        if client.task.keep_optimizer_state:
            log.warning(
                "resuming: the clients' optimizer states are not in the checkpoint, so they start fresh "
                "(this run differs from an uninterrupted one)"
            )
        if state.run is None:  # a checkpoint written before states carried their run
            state = replace(state, run=run)
    else:
        state = strategy.init({k_: v.detach() for k_, v in model.state_dict().items()}, run)
        records = [measure(state, (), None, started, started)]
        if dp is not None:
            records[-1].metrics.update(dp.metrics())
        if on_round is not None:
            on_round(records[-1], state)
    ahead: _Begun | None = None  # the next round's first attempt, begun while this one was measured

    def begin(r: int, attempt: int) -> _Begun:
        """Round r's selection and tasks (select -> plan), handed to the engine."""
        # A retried round draws a new selection; the first draw is the simulation's.
        keys = (_seeding.SELECTION, r) if attempt == 0 else (_seeding.SELECTION, r, attempt)
        if sampling == "poisson":
            selected = poisson_sample(data.num_clients, k / data.num_clients, _seeding.generator(seed, *keys))
        else:
            selected = select_clients(data.num_clients, k, _seeding.generator(seed, *keys))
        work, dropped = client_work(scenario, selected, [len(clients[c]) for c in selected], client, seed, r)
        kept = [c for c in selected if c not in dropped]
        seeds = _seeding.derive_seeds(seed, _seeding.CLIENT_BATCHES, r, each=kept)
        tasks = [
            ClientTask(
                c,
                clients[c],
                batch_seed,
                pool,
                starts[c],
                replace(
                    strategy.plan(state, c),
                    epochs=work[c].epochs,
                    max_steps=work[c].max_steps,
                    **(dp.client_plan() if dp else {}),
                ),
                optimizer_states.get(c),
                summable=linear and c not in transformed,
            )
            for c, batch_seed in zip(kept, seeds, strict=True)
        ]
        return _Begun(selected, dropped, _running(engine, model, state.params, tasks, client))

    while state.round < rounds:
        started = time.perf_counter()
        r = state.round + 1
        traffic = _traffic(engine)
        if dp is not None and dp.exhausted():
            log.warning(
                "stopping before round %d: it would spend more than the privacy budget (epsilon %.4g spent of %.4g)",
                r,
                dp.epsilon(),
                dp.settings.target_epsilon,
            )
            break
        failure: RoundFailed | None = None
        for attempt in range(max_round_attempts):
            # select -> plan (the strategy's terms, the scenario's work) -> run -> transform
            # (attacks; privacy) -> aggregate
            this, ahead = ahead or begin(r, attempt), None  # only a first attempt is begun ahead
            kept: dict[int, OptimizerState] = {}
            tally = _Tally(on_client)
            try:
                updates = attacked(_keep_optimizer_states(this.updates, kept), r)
                if dp is None:
                    state = strategy.aggregate(state, tally.tap(updates))
                else:
                    if dp.settings.mode != "central" and not getattr(engine, "clients_privatize", False):
                        # Engines that run clients here (not over the network): do what they would.
                        updates = dp.on_clients(updates, r)
                    state = dp.aggregate(strategy, state, tally.tap(updates), r)
                optimizer_states.update(kept)  # only a round that counts moves the clients' optimizers on
                break
            except RoundFailed as e:
                log.warning("round %d, attempt %d failed (%s); retrying with a new selection", r, attempt + 1, e)
                failure = e
        else:
            raise FedforgeError(f"round {r} failed {max_round_attempts} times; the last attempt: {failure}")
        trained = time.perf_counter()
        if getattr(engine, "works_ahead", False) and state.round < rounds and not (dp is not None and dp.exhausted()):
            # Its workers train the next round while this one is evaluated and recorded here.
            try:
                ahead = begin(state.round + 1, 0)
            except Exception:
                ahead = None
        records.append(measure(state, tuple(this.selected), tally, started, trained, this.dropped))
        if dp is not None:
            records[-1].metrics.update(dp.metrics())
        # The round's traffic, its failed attempts' included.
        records[-1].metrics.update({name: total - traffic[name] for name, total in _traffic(engine).items()})
        if on_round is not None:
            on_round(records[-1], state)
    return SimulationResult(History(records), state)
