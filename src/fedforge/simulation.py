"""The round loop: select -> plan -> run clients -> transform -> aggregate -> evaluate -> record.

`simulate` is the driver; each stage is a function of its own, in the order a round calls them:
`_setup` (once: check the settings, build the clients' pool and the privacy stage), `_start`
(round 0, or a resumed run's state), then per round `_train_round` (`_round_config`,
`_select_and_plan`, `_run_clients`, `_transform`, `_aggregate`, retried with a new selection when too few clients
report), `_begin_ahead` (an engine that works ahead starts the next round now), `_evaluate` and
`_record`. The stages read one frozen `_Run`; what changes from round to round (the server
state, what the clients keep: `Kept`) is passed from stage to stage, and after each round the
`checkpoint` callback gets all of it (`Progress`), which `resume=` continues from exactly. A
round's updates are never held all at once: they stream through `_transform` into `_aggregate`,
one by one as they arrive, and `_Tally` keeps what the round needs of them as they pass (what
the clients keep, training metrics).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeGuard

import numpy as np
import torch
from torch import nn

from . import _seeding
from .algorithms import FROZEN, SHARED, ClientState, RoleMap, nbytes
from .client import personal_model
from .clock import Clock, RoundTiming, Work, synchronous_round
from .contract import ClientConfig, ClientPlan, ClientUpdate, OptimizerState, State
from .data.datasets import TensorData
from .data.federated import FederatedData, client_pool
from .devices import Devices
from .engines import ClientTask, Engine, SequentialEngine
from .engines.base import RoundFailed, Traffic, as_engine
from .errors import ConfigError, FedforgeError
from .evaluation import Evaluation, evaluate
from .history import History, RoundRecord, personalized_summary
from .privacy.run import SAMPLINGS, DifferentialPrivacy, PrivacyRun, sampling_for
from .privacy.sampling import poisson_sample
from .reductions import Update, client_ids, example_weighted
from .scenarios import Scenario, attack_update, client_work, label_flipped, malicious_clients
from .schedules import RoundConfig
from .strategies import FedAvg, LinearStrategy, RunInfo, ServerState, Strategy, client_algorithm

log = logging.getLogger("fedforge")


@dataclass(frozen=True)
class Kept:
    """What the clients keep between their rounds, by client id: their optimizer states (when the
    task keeps them, `Task.keep_optimizer_state`) and their client states (`algorithms.ClientState`:
    personal entries, SCAFFOLD's c_i, Ditto's copy). In simulation they stay with the round loop,
    so that a checkpoint holds them, or with the engine when it keeps them where its clients train
    (`Engine.keeps_client_state`: the Ray engine's workers), which hands them over for a checkpoint;
    a deployment's clients keep their own. `counted`: the last round in which each client's update
    counted (arrived in a round that was aggregated), the rounds whose states these are: a
    deployment's server tells each client its own in every task, so that the client keeps the
    state of exactly the updates that counted (network/state.py)."""

    optimizer_states: Mapping[int, OptimizerState] = field(default_factory=dict)
    client_states: Mapping[int, ClientState] = field(default_factory=dict)
    counted: Mapping[int, int] = field(default_factory=dict)

    def updated(
        self,
        optimizer_states: Mapping[int, OptimizerState],
        client_states: Mapping[int, ClientState],
        counted: Mapping[int, int],
    ) -> Kept:
        """These, with the round's clients' new ones."""
        return Kept(
            {**self.optimizer_states, **optimizer_states},
            {**self.client_states, **client_states},
            {**self.counted, **counted},
        )


@dataclass(frozen=True)
class Progress:
    """Where a run stands after a round: everything that continues it exactly (`simulate(resume=)`):
    the server's state, the records of the rounds so far (round 0 first), and what the clients keep."""

    state: ServerState
    records: Sequence[RoundRecord]
    kept: Kept = field(default_factory=Kept)


# What `simulate(resume=)` takes: a Progress, or the older (state, records), which keeps nothing of the clients.
Resume = Progress | tuple[ServerState, Sequence[RoundRecord]]


@dataclass(frozen=True)
class SimulationResult:
    history: History
    state: ServerState
    kept: Kept = field(default_factory=Kept)  # what the clients keep at the end


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


# An evaluation of the user's own on the server: (the model with the global weights, round) -> numbers by name.
EvaluateFn = Callable[[nn.Module, int], Mapping[str, float]]


@dataclass(frozen=True)
class _Settings:
    """How a run goes, beyond what it trains: its length, selection, retries and evaluation, and
    who hears of each update."""

    rounds: int
    sampling: str
    max_round_attempts: int
    eval_batch_size: int
    eval_train: bool
    on_client: Callable[[Update], None] | None
    round_config: RoundConfig | None
    personalized_eval: bool | None
    evaluate_fn: EvaluateFn | None


@dataclass(frozen=True)
class _Run:
    """What every stage of one run reads: its settings, checked, and what `_setup` builds from
    them once (the clients' pool, who is malicious, the privacy stage)."""

    model: nn.Module  # on the data's device
    data: FederatedData  # train and test as the task's TensorData
    client: ClientConfig  # its algorithm the run's (the strategy's own, when it has one)
    roles: RoleMap  # the model's entries' roles by the algorithm: the server state holds the shared ones
    fixed: State  # the initial model's other entries (personal ones' initial values, frozen ones)
    strategy: Strategy
    engine: Engine
    scenario: Scenario
    seed: int
    k: int  # clients a round (on average, under Poisson sampling)
    pool: TensorData  # every client's training examples side by side (`client_pool`)
    starts: list[int]  # client c's rows of `pool` start at starts[c]
    clients: list[TensorData]  # each client's rows of `pool`
    malicious: frozenset[int]
    summable: bool  # the round needs only the weighted mean of the updates of clients not `transformed`
    transformed: frozenset[int]  # clients whose own update the transform stage changes (update attacks)
    federated_test: TensorData | None  # the clients' held-out examples side by side
    personal_test: list[TensorData] | None  # each client's held-out examples, under personalized evaluation
    dp: PrivacyRun | None
    settings: _Settings
    clock: Clock | None = None  # the clients' devices' clock (None: no device profiles)
    devices: Devices | None = None  # the deadline and over-selection of its rounds


@dataclass(frozen=True)
class _Planned:
    """A round's attempt before it runs: its clients' config, who was selected, who dropped out
    (or, on the clock, was late), the others' tasks, and when it ends on the virtual clock."""

    config: ClientConfig
    selected: Sequence[int]
    dropped: tuple[int, ...]
    tasks: Sequence[ClientTask]
    timing: RoundTiming | None = None


@dataclass(frozen=True)
class _Begun:
    """A round's attempt handed to the engine: its clients' config, who was selected, who dropped
    out, and the updates to come."""

    config: ClientConfig
    selected: Sequence[int]
    dropped: tuple[int, ...]
    updates: Iterator[Update]
    payload_down: int  # bytes of the tensors the tasks send (the shared entries, the algorithm's inputs)
    timing: RoundTiming | None = None


@dataclass(frozen=True)
class _Trained:
    """A round aggregated: the new state, its clients' config, the clients, their example-weighted
    training metrics and new optimizer states, and when it ended."""

    state: ServerState
    config: ClientConfig
    selected: Sequence[int]
    dropped: tuple[int, ...]
    metrics: dict[str, float]
    optimizer_states: dict[int, OptimizerState]
    client_states: dict[int, ClientState]
    counted: set[int]  # the clients whose updates arrived: this round counted them
    personalized: list[tuple[Mapping[str, float], int]]
    payload: dict[str, int]  # payload_down, payload_up: bytes of the tensors sent to and by the clients
    at: float
    timing: RoundTiming | None = None  # on the virtual clock


@dataclass(frozen=True)
class _Evaluated:
    """The global model on the centralized test set, the clients' held-out examples, and all training data."""

    test: Evaluation | None
    federated: Evaluation | None
    train: Evaluation | None
    own: Mapping[str, float]  # evaluate_fn's numbers, by name


class _Tally:
    """What a round keeps of its updates as they stream past, one by one: each client's new
    optimizer state and client state as it arrives from the engine (and, under personalized
    evaluation, its personal model's metrics on its held-out examples, from `personalize`), and
    the training metrics of each update as it goes into the aggregate (their example-weighted
    means), which `on_client` hears of."""

    def __init__(
        self,
        on_client: Callable[[Update], None] | None,
        personalize: Callable[[ClientUpdate], tuple[Mapping[str, float], int]] | None = None,
    ):
        self.on_client = on_client
        self.personalize = personalize
        self.optimizer_states: dict[int, OptimizerState] = {}
        self.client_states: dict[int, ClientState] = {}
        self.counted: set[int] = set()
        self.personalized: list[tuple[Mapping[str, float], int]] = []
        self.metrics: list[tuple[Mapping[str, float | None], int]] = []
        self.payload_up = 0  # bytes of the tensors the clients sent

    def arrived(self, updates: Iterable[Update]) -> Iterator[Update]:
        """Passes updates through, keeping what each client keeps (its optimizer state when its task
        keeps one, its client state), that it arrived (`counted`) and, under personalized
        evaluation, its personal metrics."""
        for update in updates:
            self.counted.update(client_ids(update))
            if isinstance(update, ClientUpdate):
                if update.optimizer_state is not None:
                    self.optimizer_states[update.client_id] = update.optimizer_state
                if update.client_state is not None:
                    self.client_states[update.client_id] = update.client_state
                if update.personalized is not None:  # its own evaluation (a network engine's client)
                    self.personalized.append(update.personalized)
                elif self.personalize is not None:
                    self.personalized.append(self.personalize(update))
            self.payload_up += _payload_up(update)
            yield update

    def aggregated(self, updates: Iterable[Update]) -> Iterator[Update]:
        """Passes updates through, keeping their training metrics and examples."""
        for update in updates:
            self.metrics.append((update.training_metrics(), update.num_examples))
            if self.on_client is not None:
                self.on_client(update)
            yield update

    def means(self) -> dict[str, float]:
        """The training metrics' means over the updates aggregated, weighted by their examples."""
        return example_weighted(self.metrics)


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
    on_client: Callable[[Update], None] | None = None,
    on_round: Callable[[RoundRecord, ServerState], None] | None = None,
    checkpoint: Callable[[Progress], None] | None = None,
    resume: Resume | None = None,
    max_round_attempts: int = 10,
    privacy: DifferentialPrivacy | None = None,
    sampling: str = "fixed",
    round_config: RoundConfig | None = None,
    personalized_eval: bool | None = None,
    evaluate_fn: EvaluateFn | None = None,
    devices: Devices | None = None,
) -> SimulationResult:
    """Run federated training of `model` (its weights the initial global model; they are not
    changed, but the model is moved to the data's device, in place) over `data` for `rounds`
    rounds; the selected clients, their batches and so the final weights depend only on `seed`
    and the inputs, not on the engine (`engine`: any `Engine`).

    Each round: select and plan -> run the clients -> transform (attacks, client-side privacy) ->
    aggregate (server-side privacy, then the strategy) -> evaluate -> record; one function each.

    Args:
        clients_per_round: a count, or a float in (0, 1] for a fraction of the clients.
        scenario: unequal work, stragglers, dropouts and attacks (none by default).
        eval_train: also evaluate the global model on all training data every round (the
            global objective that FedProx's paper plots).
        on_client: called with each update as it arrives (a PartialSum stands for several
            clients when the engine sums them, as the Ray engine does for a linear strategy).
        on_round: called after every round (and after the initial evaluation, round 0).
        checkpoint: called after every round (round 0 too), before `on_round`, with the run's
            `Progress`: all that `resume` needs (`fedforge run` writes it to checkpoint.pt).
        resume: a `Progress` to continue the run from, exactly. The older form (state, records)
            continues without what the clients keep: their optimizer and client states start afresh.
        max_round_attempts: how often a round whose engine raises RoundFailed is retried with a
            new selection before the run gives up.
        privacy: user-level differential privacy, a stage between the clients and the strategy;
            the run stops before a round would pass its epsilon budget.
        sampling: "fixed" (`clients_per_round` each round) or "poisson" (each client joins a
            round with probability clients_per_round / num_clients).
        round_config: the clients' config of each round, `round_config(r, config)` from the round r
            (counted from 1) and `client` with its `round` and `rounds` set: a learning-rate
            schedule (`fedforge.schedules`, e.g. `Cosine(warmup=5).round_config`), local epochs
            or any option by round. A function of the round only, so a resumed run follows it
            from where it left off. None: `client` every round (with `round` and `rounds` set).
            The round's lr and momentum are also what SCAFFOLD, q-FedAvg and FedNova aggregate
            with, and each round's record keeps its lr (`metrics["lr"]`).
        personalized_eval: each client that trains in a round evaluates its personal model (its
            model at the end of its training, personal entries included, or its algorithm's personal
            copy) on its held-out examples (`client_test`), and the round's record keeps their
            example-weighted means (`personalized_accuracy`, ...) and spread (`_p10`, `_p50`,
            `_p90`). None: on when the clients' algorithm keeps a model of its own and they hold
            examples out.
        evaluate_fn: an evaluation of your own on the server, every round (round 0 included):
            `evaluate_fn(module, round)` gets the model loaded with the global weights (in eval
            mode) and returns numbers by name, which the round's record keeps as `eval_<name>`
            (e.g. your own data's F1 as `eval_f1`).
        devices: the clients' devices (speeds, bandwidths, availability: `fedforge.devices`) and
            the virtual clock's rounds: a deadline, over-selection. Each round's record then holds
            `virtual_time`, the virtual seconds since the run's start when the round ended
            (`fedforge.clock`). None: no clock, and no `virtual_time`.

    The clients run `client.algorithm` (`fedforge.algorithms`), or the strategy's own client
    algorithm when it has one (FedProx, SCAFFOLD, FedDyn); the returned state's `params` hold the
    shared entries of the model, the ones the strategy aggregates.
    """
    settings = _Settings(
        rounds,
        sampling,
        max_round_attempts,
        eval_batch_size,
        eval_train,
        on_client,
        round_config,
        personalized_eval,
        evaluate_fn,
    )
    run = _setup(
        model, data, client, strategy, engine, scenario, seed, clients_per_round, privacy, resume, settings, devices
    )
    state, records, kept = _start(run, resume, checkpoint, on_round)
    kept = _handed(run, kept)  # the clients' own: here, or where the engine's clients are
    ahead: _Begun | None = None  # the next round's first attempt, begun while this one was evaluated
    while state.round < rounds and not _out_of_budget(run, state.round + 1):
        started, traffic = time.perf_counter(), run.engine.traffic()
        now = records[-1].metrics.get("virtual_time", 0.0)  # on the virtual clock: when the last round ended
        trained = _train_round(run, state, ahead, kept, now)  # select, plan, run, transform, aggregate
        state = trained.state
        kept = kept.updated(
            trained.optimizer_states, trained.client_states, dict.fromkeys(trained.counted, state.round)
        )
        saved = _gathered(run, kept) if checkpoint is not None else kept  # before the workers train on
        ahead = _begin_ahead(run, state, kept, trained.timing.end if trained.timing else 0.0)
        records.append(_record(run, state, _evaluate(run, state), trained, started, _traffic(run.engine, traffic)))
        _recorded(records, state, saved, checkpoint, on_round)
    return SimulationResult(History(records), state, _gathered(run, kept))


def _handed(run: _Run, kept: Kept) -> Kept:
    """What the round loop keeps of the clients from now: `kept`, or nothing when the engine keeps
    it where its clients train (`Engine.keeps_client_state`): then it is handed to the engine."""
    if not run.engine.keeps_client_state:
        return kept
    run.engine.restore(kept.optimizer_states, kept.client_states)
    return Kept(counted=kept.counted)


def _gathered(run: _Run, kept: Kept) -> Kept:
    """Everything the clients keep, for a checkpoint and the result: `kept`, or what the engine keeps."""
    return Kept(*run.engine.gather(), counted=kept.counted) if run.engine.keeps_client_state else kept


def _recorded(
    records: list[RoundRecord],
    state: ServerState,
    kept: Kept,
    checkpoint: Callable[[Progress], None] | None,
    on_round: Callable[[RoundRecord, ServerState], None] | None,
) -> None:
    """The round just recorded, told: to `checkpoint` first (all that continues the run), then `on_round`."""
    if checkpoint is not None:
        checkpoint(Progress(state, tuple(records), kept))
    if on_round is not None:
        on_round(records[-1], state)


def _setup(
    model: nn.Module,
    data: FederatedData,
    client: ClientConfig,
    strategy: Strategy | None,
    engine: Engine | None,
    scenario: Scenario,
    seed: int,
    clients_per_round: int | float,
    privacy: DifferentialPrivacy | None,
    resume: Resume | None,
    settings: _Settings,
    devices: Devices | None,
) -> _Run:
    """Check the run's settings and build what its rounds share: the task's data on its device,
    the clients' pool, the malicious clients, the privacy stage and the clients' devices' clock."""
    if settings.rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {settings.rounds}")
    k = clients_per_round_count(clients_per_round, data.num_clients)
    clock = _clock(devices, data.num_clients, seed, settings.sampling, privacy)
    strategy = strategy or FedAvg()
    client = replace(client, algorithm=client_algorithm(strategy, client.algorithm))
    roles = client.algorithm.roles.assign(model)
    _check_roles(roles, strategy)
    data = replace(
        data, train=client.task.data(data.train), test=client.task.data(data.test) if data.test is not None else None
    )
    pool, starts = client_pool(data.train, data.partition, flipped=label_flipped(scenario, data.num_clients, seed))
    malicious = malicious_clients(scenario, data.num_clients, seed)
    # A linear strategy needs only the round's weighted mean, so an engine may send partial sums;
    # not of the clients whose own update a later stage transforms (the scenario's update attacks)
    # or whose optimizer state must come back.
    # The privacy stage clips each client's update: it needs them one by one.
    federated_test = personal_test = None
    if data.client_test is not None and any(len(c) for c in data.client_test):
        federated_test = data.train.subset(np.concatenate(list(data.client_test)))
        if settings.personalized_eval is not False and (settings.personalized_eval or client.algorithm.personalizes):
            personal_test = [data.train.subset(np.asarray(rows)) for rows in data.client_test]
    elif settings.personalized_eval:
        raise ConfigError("personalized evaluation needs held-out examples on each client (client_test_fraction > 0)")
    # Clients that keep state or are evaluated one by one send their own updates, never a partial sum.
    linear = (
        isinstance(strategy, LinearStrategy)
        and not client.task.keep_optimizer_state
        and privacy is None
        and personal_test is None
        and not client.algorithm.keeps_state
    )
    model = model.to(data.train.device)
    return _Run(
        model=model,
        data=data,
        client=client,
        roles=roles,
        fixed=_fixed(model, roles),
        strategy=strategy,
        engine=as_engine(engine or SequentialEngine()),
        scenario=scenario,
        seed=seed,
        k=k,
        pool=pool,
        starts=starts,
        clients=[pool.rows(a, b) for a, b in itertools.pairwise(starts)],
        malicious=malicious,
        summable=linear,
        transformed=malicious if scenario.attack not in (None, "label_flip") else frozenset(),
        federated_test=federated_test,
        personal_test=personal_test,
        dp=_privacy_run(privacy, strategy, data.num_clients, k, seed, resume, settings),
        settings=settings,
        clock=clock,
        devices=devices,
    )


def _clock(
    devices: Devices | None, num_clients: int, seed: int, sampling: str, privacy: DifferentialPrivacy | None
) -> Clock | None:
    """The clock of the clients' devices (None without them), its rounds' settings checked against the run's."""
    if devices is None:
        return None
    if devices.over_select > 0 and sampling != "fixed":
        raise ConfigError("over_select selects a fixed number of clients: it needs sampling fixed")
    if devices.over_select > 0 and privacy is not None:
        raise ConfigError(
            "over_select with differential privacy: the accountant assumes the clients sampled are the clients "
            "that count, which over-selection breaks"
        )
    return Clock(devices.profiles(num_clients, seed), devices.step_seconds)


def _check_roles(roles: RoleMap, strategy: Strategy) -> None:
    """A one-line ConfigError when `strategy` needs every entry of the model and some stay on the
    clients, or when no entry is shared at all."""
    if not roles.shared:
        raise ConfigError("no entry of the model is shared: there is nothing to federate")
    needs = getattr(strategy, "needs_every_entry", None)
    if needs and not roles.all_shared:
        kept = [n for n, role in roles.roles.items() if role != SHARED]
        raise ConfigError(
            f"strategy {strategy.name} cannot run with personal or frozen entries ({kept[0]}, ...): {needs}"
        )


def _privacy_run(
    privacy: DifferentialPrivacy | None,
    strategy: Strategy,
    num_clients: int,
    k: int,
    seed: int,
    resume: Resume | None,
    settings: _Settings,
) -> PrivacyRun | None:
    """The run's privacy stage (None without differential privacy), where a resumed run's left off."""
    if privacy is None:
        if settings.sampling not in SAMPLINGS:
            raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {settings.sampling!r}")
        return None
    privacy.check(strategy, num_clients)
    return PrivacyRun(
        privacy,
        sampling_for(settings.sampling, num_clients, k),
        rounds=settings.rounds,
        seed=seed,
        saved=_progress(resume).state.privacy if resume is not None else None,
    )


def _progress(resume: Resume) -> Progress:
    """`resume` as a Progress: the older (state, records) with nothing of the clients."""
    return resume if isinstance(resume, Progress) else Progress(*resume)


def _start(
    run: _Run,
    resume: Resume | None,
    checkpoint: Callable[[Progress], None] | None,
    on_round: Callable[[RoundRecord, ServerState], None] | None,
) -> tuple[ServerState, list[RoundRecord], Kept]:
    """The state, records and clients' keep the rounds go on from: a resumed run's, or the
    strategy's initial state with the initial model's record (round 0), which `checkpoint` and
    `on_round` hear of."""
    started = time.perf_counter()
    info = RunInfo(num_clients=run.data.num_clients, client_lr=run.client.lr, client_momentum=run.client.momentum)
    if resume is not None:
        progress = _progress(resume)
        state = progress.state
        keeps = run.client.task.keep_optimizer_state or run.client.algorithm.keeps_state
        if keeps and state.round > 0 and not isinstance(resume, Progress):
            log.warning(
                "resuming at round %d from (state, records), without what the clients keep (their optimizer "
                "or client states: resume from a Progress for those), so they start afresh",
                state.round,
            )
        if state.run is None:  # a checkpoint written before states carried their run
            state = replace(state, run=info)
        return state, list(progress.records), progress.kept
    shared = {name: v.detach() for name, v in run.model.state_dict().items() if name not in run.fixed}
    state = run.strategy.init(shared, info)
    records = [_record(run, state, _evaluate(run, state), None, started, {})]
    if run.clock is not None:  # the run starts at virtual time 0
        records[0] = replace(records[0], metrics={**records[0].metrics, "virtual_time": 0.0})
    _recorded(records, state, Kept(), checkpoint, on_round)
    return state, records, Kept()


def _out_of_budget(run: _Run, r: int) -> bool:
    """Whether round r would spend more than the privacy budget: the run then stops before it."""
    if run.dp is None or not run.dp.exhausted():
        return False
    log.warning(
        "stopping before round %d: it would spend more than the privacy budget (epsilon %.4g spent of %.4g)",
        r,
        run.dp.epsilon(),
        run.dp.settings.target_epsilon,
    )
    return True


def _train_round(run: _Run, state: ServerState, ahead: _Begun | None, kept: Kept, now: float) -> _Trained:
    """Round `state.round + 1`: select and plan -> run -> transform -> aggregate. An attempt whose
    engine raises RoundFailed (too few clients reported) is retried with a new selection.

    `ahead`: the round's first attempt, when it was begun while the round before was evaluated;
    `now`: when the round before ended, on the virtual clock.
    """
    r = state.round + 1
    config = _round_config(run, r)
    failure: RoundFailed | None = None
    for attempt in range(run.settings.max_round_attempts):
        if attempt > 0 or ahead is None:  # only a first attempt is begun ahead
            ahead = _run_clients(run, state, _select_and_plan(run, state, r, attempt, kept, config, now))
        begun, ahead = ahead, None
        # The updates stream through the stages once, as they arrive: the server never holds them all.
        # The server evaluates the clients' personal models, unless the clients do it themselves.
        own = run.personal_test and not run.engine.clients_evaluate
        tally = _Tally(run.settings.on_client, _personalize(run, state) if own else None)
        try:
            updates = tally.arrived(begun.updates)  # each client's new optimizer state kept
            updates = _transform(run, updates, r)  # attacks, client-side privacy
            updates = tally.aggregated(updates)  # training metrics, on_client
            aggregated = _aggregate(run, state, updates, r, begun.config)  # server-side privacy, the strategy
        except RoundFailed as e:
            log.warning("round %d, attempt %d failed (%s); retrying with a new selection", r, attempt + 1, e)
            failure = e
            continue
        # Only a round that counts moves the clients' optimizers and states on.
        run.engine.commit(r, [c for c in begun.selected if c not in begun.dropped])
        return _Trained(
            aggregated,
            begun.config,
            begun.selected,
            begun.dropped,
            tally.means(),
            tally.optimizer_states,
            tally.client_states,
            tally.counted,
            tally.personalized,
            {"payload_down": begun.payload_down, "payload_up": tally.payload_up},
            time.perf_counter(),
            begun.timing,
        )
    raise FedforgeError(f"round {r} failed {run.settings.max_round_attempts} times; the last attempt: {failure}")


def _round_config(run: _Run, r: int) -> ClientConfig:
    """Round r's client config: the run's with its round and rounds, as `round_config` makes it."""
    config = replace(run.client, round=r, rounds=run.settings.rounds)
    if run.settings.round_config is None:
        return config
    made = run.settings.round_config(r, config)
    if not isinstance(made, ClientConfig):
        raise TypeError(f"round_config must return a ClientConfig, got {type(made).__name__} for round {r}")
    if (made.round, made.rounds) != (r, run.settings.rounds):
        raise ConfigError(
            f"round_config changed the round of round {r} to {made.round} (of {made.rounds}): it sets what "
            f"a round's clients do, not which round it is"
        )
    return made


def _select_and_plan(
    run: _Run,
    state: ServerState,
    r: int,
    attempt: int,
    clients_keep: Kept,
    config: ClientConfig,
    now: float = 0.0,
) -> _Planned:
    """Round r's selection, who of it drops out (or, on the virtual clock from `now`, is late), and
    the others' tasks: the strategy's plan (its local terms), the scenario's work (epochs, steps),
    and what privacy asks of the clients."""
    # A retried round draws a new selection; the first draw is the simulation's.
    keys = (_seeding.SELECTION, r) if attempt == 0 else (_seeding.SELECTION, r, attempt)
    n, generator = run.data.num_clients, _seeding.generator(run.seed, *keys)
    start = _round_start(run, now)
    profiles = run.clock.profiles if run.clock is not None and not run.clock.profiles.always else None
    if run.settings.sampling == "poisson":
        selected = poisson_sample(n, run.k / n, generator)
        if profiles is not None:
            selected = [c for c in selected if profiles.online_until(c, start) is not None]
    elif profiles is None:
        selected = select_clients(n, _selecting(run), generator)
    else:  # the first of a random order that are online
        order = torch.randperm(n, generator=generator).tolist()
        online = (c for c in order if profiles.online_until(c, start) is not None)
        selected = sorted(itertools.islice(online, _selecting(run)))
    sizes = [len(run.clients[c]) for c in selected]
    work, dropped = client_work(run.scenario, selected, sizes, config, run.seed, r)
    privacy = run.dp.client_plan() if run.dp else None  # clip and noise, for the clients to do
    plans = {
        c: replace(run.strategy.plan(state, c), epochs=work[c].epochs, max_steps=work[c].max_steps, **(privacy or {}))
        for c in selected
        if c not in dropped
    }
    timing = None
    if run.clock is not None:
        timing = _timed(run, state, config, plans, start, missing=bool(dropped))
        dropped = tuple(sorted({*dropped, *timing.late}))
        plans = {c: _capped(plans[c], len(run.clients[c]), config, timing.partial.get(c)) for c in timing.kept}
    kept = [c for c in selected if c not in dropped]
    seeds = _seeding.derive_seeds(run.seed, _seeding.CLIENT_BATCHES, r, each=kept)
    tasks = [
        ClientTask(
            c,
            run.clients[c],
            batch_seed,
            run.pool,
            run.starts[c],
            plans[c],
            clients_keep.optimizer_states.get(c),
            summable=run.summable and c not in run.transformed,
            client_state=clients_keep.client_states.get(c),
            counted=clients_keep.counted.get(c, 0),
            evaluate=run.settings.eval_batch_size if run.personal_test and run.engine.clients_evaluate else None,
        )
        for c, batch_seed in zip(kept, seeds, strict=True)
    ]
    return _Planned(config, selected, dropped, tasks, timing)


def _selecting(run: _Run) -> int:
    """How many clients a round selects: k, or ceil(k(1 + x)) under over-selection (at most all)."""
    x = run.devices.over_select if run.devices is not None else 0.0
    return run.k if x == 0 else min(run.data.num_clients, math.ceil(run.k * (1 + x)))


def _round_start(run: _Run, now: float) -> float:
    """When a round that may start at virtual time `now` starts: then, or when the first client
    comes online if none is online then (the server waits)."""
    if run.clock is None or run.clock.profiles.always:
        return now
    profiles, clients = run.clock.profiles, range(run.data.num_clients)
    if any(profiles.online_until(c, now) is not None for c in clients):
        return now
    start = min(profiles.next_online(c, now) for c in clients)
    if not math.isfinite(start):
        raise FedforgeError(f"no client is online at virtual time {now:.6g} or later: the trace's windows have ended")
    return start


def _timed(
    run: _Run,
    state: ServerState,
    config: ClientConfig,
    plans: Mapping[int, ClientPlan],
    start: float,
    *,
    missing: bool,
) -> RoundTiming:
    """The round on the virtual clock from `start`: who counts, by the deadline and over-selection.
    A client receives the shared entries and its plan's inputs, and sends an update of as many bytes."""
    assert run.clock is not None and run.devices is not None, "called on the virtual clock"
    shared = nbytes(state.params)
    work = {}
    for c, plan in plans.items():
        sent = shared + nbytes(plan.inputs or {})
        work[c] = Work(sum(plan.phase_steps(len(run.clients[c]), config)), sent, sent)
    devices = run.devices
    return synchronous_round(
        run.clock,
        start,
        work,
        keep=run.k if devices.over_select > 0 else None,
        deadline=devices.deadline,
        partial=devices.late == "partial",
        missing=missing,
    )


def _capped(plan: ClientPlan, size: int, config: ClientConfig, steps: int | None) -> ClientPlan:
    """`plan` with its local steps cut to `steps` in all (None: as it is): the largest max_steps
    whose phases' steps add up to no more."""
    if steps is None:
        return plan
    low, high = 1, steps  # sum(phase_steps) grows with max_steps, and is at least max_steps' for one phase
    while low < high:
        mid = (low + high + 1) // 2
        if sum(replace(plan, max_steps=mid).phase_steps(size, config)) <= steps:
            low = mid
        else:
            high = mid - 1
    return replace(plan, max_steps=low)


def _run_clients(run: _Run, state: ServerState, planned: _Planned) -> _Begun:
    """The planned tasks handed to the engine. An error it raises at once (an engine that starts
    its work when called) is raised when the updates are read, in the round they belong to."""
    try:
        updates = run.engine.run(run.model, _whole(run, state), planned.tasks, planned.config)
    except Exception as e:
        updates = _raising(e)
    shared = nbytes(state.params)
    down = sum(shared + nbytes(task.plan.inputs or {}) for task in planned.tasks)
    return _Begun(planned.config, planned.selected, planned.dropped, updates, down, planned.timing)


def _payload_up(update: Update) -> int:
    """Bytes of the tensors a client sends (its shared delta and its algorithm's extras); a partial
    sum stands for each client it sums."""
    if isinstance(update, ClientUpdate):
        return nbytes(update.delta) + nbytes(update.extras)
    return len(update.client_ids) * nbytes(update.mean_delta)


def _transform(run: _Run, updates: Iterable[Update], r: int) -> Iterator[Update]:
    """Each update as the server receives it: a malicious client's as its attack makes it; under
    differential privacy in client or local mode, clipped (and noised) as the clients do before
    sending, when the engine's clients do not."""
    updates = (
        attack_update(update, run.scenario, run.seed, r) if _attacker(update, run) else update for update in updates
    )
    if run.dp is not None and run.dp.settings.mode != "central" and not run.engine.clients_privatize:
        # No partial sums under differential privacy: `_setup` lets no engine sum then.
        updates = run.dp.on_clients(_each_client(updates), r)
    return updates


def _aggregate(run: _Run, state: ServerState, updates: Iterable[Update], r: int, config: ClientConfig) -> ServerState:
    """The next state: under differential privacy the server's part first (clip, noise the sum,
    the accountant spends the round), then the strategy, which sees the round's client lr and
    momentum as the run's facts (SCAFFOLD's control scale under a schedule: the round's lr)."""
    strategy, facts = run.strategy, state.run
    if facts is not None and (facts.client_lr, facts.client_momentum) != (config.lr, config.momentum):
        state = replace(state, run=replace(facts, client_lr=config.lr, client_momentum=config.momentum))
    if isinstance(strategy, LinearStrategy):  # it takes partial sums, which engines send only for one
        new = strategy.aggregate(state, updates) if run.dp is None else run.dp.aggregate(strategy, state, updates, r)
    else:  # Not linear: no differential privacy (`_setup`'s privacy.check refused it), no partial sums.
        new = strategy.aggregate(state, _each_client(updates))
    return new if new.run is facts else replace(new, run=facts)  # the run's facts stay the run's


def _begin_ahead(run: _Run, state: ServerState, kept: Kept, now: float) -> _Begun | None:
    """The next round's first attempt, begun now when the engine works ahead (`Engine.works_ahead`):
    its workers train it while this round is evaluated and recorded here (`now`: when this round
    ended on the virtual clock)."""
    if not run.engine.works_ahead or state.round >= run.settings.rounds or (run.dp is not None and run.dp.exhausted()):
        return None
    try:
        r = state.round + 1
        return _run_clients(run, state, _select_and_plan(run, state, r, 0, kept, _round_config(run, r), now))
    except Exception:  # the round begins again in its turn, and raises then
        return None


def _fixed(model: nn.Module, roles: RoleMap) -> State:
    """The initial model's entries that are not shared: personal ones copied (their initial values),
    frozen ones the model's own tensors, never written by any stage (a pretrained base held once)."""
    return {
        n: v.detach() if roles.roles[n] == FROZEN else v.detach().clone()
        for n, v in model.state_dict().items()
        if roles.roles[n] != SHARED
    }


def _whole(run: _Run, state: ServerState) -> State:
    """The model's whole state: the server's shared entries, the initial model's others (the
    personal entries' initial values, the frozen ones), in the model's order."""
    if not run.fixed:
        return state.params
    return {n: state.params[n] if role == SHARED else run.fixed[n] for n, role in run.roles.roles.items()}


def _personalize(run: _Run, state: ServerState) -> Callable[[ClientUpdate], tuple[Mapping[str, float], int]]:
    """How a client's personal model fares on its held-out examples: its model at the end of its
    training (the round's global model plus its update, its personal entries), or its personal
    copy (Ditto's)."""
    whole = _whole(run, state)
    assert run.personal_test is not None, "called under personalized evaluation"
    held_out = run.personal_test

    def personalize(update: ClientUpdate) -> tuple[Mapping[str, float], int]:
        data = held_out[update.client_id]
        evaluation = evaluate(
            run.model,
            personal_model(whole, update),
            data,
            batch_size=run.settings.eval_batch_size,
            task=run.client.task,
        )
        return evaluation.metrics, len(data)

    return personalize


def _evaluate(run: _Run, state: ServerState) -> _Evaluated:
    """The global model on the test set, on the clients' held-out examples (by the clients
    themselves where the engine's clients evaluate it), and (eval_train) on all training data."""

    whole = _whole(run, state)

    def on(data: TensorData) -> Evaluation:
        return evaluate(run.model, whole, data, batch_size=run.settings.eval_batch_size, task=run.client.task)

    if run.engine.clients_evaluate_global:  # a deployment's clients, on their own held-out examples
        federated = run.engine.evaluate_global(run.model, state.params, run.client, state.round)
    else:
        federated = on(run.federated_test) if run.federated_test else None
    return _Evaluated(
        test=on(run.data.test) if run.data.test is not None else None,
        federated=federated,
        train=on(run.pool) if run.settings.eval_train else None,
        own=_own_evaluation(run, whole, state.round),
    )


def _own_evaluation(run: _Run, whole: State, r: int) -> dict[str, float]:
    """`evaluate_fn`'s numbers for the model with `whole`, checked: names, and finite or not, numbers."""
    evaluate_fn = run.settings.evaluate_fn
    if evaluate_fn is None:
        return {}
    module = run.model
    training = module.training
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        module.load_state_dict(whole)
        module.eval()
        with torch.no_grad():
            found = evaluate_fn(module, r)
    finally:
        module.load_state_dict(saved)
        module.train(training)
    if not isinstance(found, Mapping) or not all(
        isinstance(k, str) and k.isidentifier() and isinstance(v, (int, float)) and not isinstance(v, bool)
        for k, v in found.items()
    ):
        raise ConfigError(f"evaluate_fn must return numbers by name (a dict like {{'f1': 0.8}}), got {found!r:.80}")
    return {k: float(v) for k, v in found.items()}


def _record(
    run: _Run,
    state: ServerState,
    evaluated: _Evaluated,
    trained: _Trained | None,
    started: float,
    traffic: dict[str, int],
) -> RoundRecord:
    """The round's record (round 0: the initial model's, `trained` None): its clients, the clients'
    training metrics, the evaluations, its timing, and the privacy stage's and the engine's figures."""
    test, fed, on_train = evaluated.test, evaluated.federated, evaluated.train
    train = trained.metrics if trained else {}
    # The task's metrics beyond loss and accuracy (which have fields of their own), by name.
    named = {
        f"{where}_{name}": value
        for where, metrics in (("train", train), ("test", test and test.metrics), ("federated", fed and fed.metrics))
        if metrics
        for name, value in metrics.items()
        if name not in ("loss", "accuracy")
    }
    return RoundRecord(
        round=state.round,
        clients=tuple(trained.selected) if trained else (),
        test_loss=test.loss if test else None,
        test_accuracy=test.accuracy if test else None,
        train_loss=train.get("loss"),
        train_accuracy=train.get("accuracy"),
        federated_loss=fed.metrics.get("loss") if fed else None,  # a client's own evaluate may have none
        federated_accuracy=fed.accuracy if fed else None,
        global_train_loss=on_train.loss if on_train else None,
        seconds=time.perf_counter() - started,
        train_seconds=(trained.at if trained else started) - started,
        dropped=trained.dropped if trained else (),
        metrics={
            **named,
            **(personalized_summary([(m, n) for m, n in trained.personalized if n > 0]) if trained else {}),
            **{f"eval_{name}": value for name, value in evaluated.own.items()},
            **(trained.payload if trained else {}),
            **_timed_record(trained),
            **_scheduled(run, trained),
            **(run.dp.metrics() if run.dp else {}),
            **traffic,
        },
    )


def _timed_record(trained: _Trained | None) -> dict[str, float]:
    """On the virtual clock: when the round ended (`virtual_time`, seconds since the run's start)
    and how many of its clients were late (missed the deadline, lost to over-selection, went offline)."""
    if trained is None or trained.timing is None:
        return {}
    return {"virtual_time": trained.timing.end, "late_clients": len(trained.timing.late)}


def _scheduled(run: _Run, trained: _Trained | None) -> dict[str, float]:
    """The round's client lr, in a run whose config changes by round (`round_config`)."""
    return {"lr": trained.config.lr} if trained and run.settings.round_config is not None else {}


def _traffic(engine: Engine, before: Traffic | None) -> dict[str, int]:
    """The message bytes the engine moved since `before` (none for an engine that sends no messages);
    a round's failed attempts' included."""
    after = engine.traffic()
    return after.since(before) if after is not None and before is not None else {}


def _each_client(updates: Iterable[Update]) -> Iterator[ClientUpdate]:
    """The updates, each a client's own: where no engine may sum (`ClientTask.summable` False)."""
    for update in updates:
        if not isinstance(update, ClientUpdate):
            raise TypeError(f"the engine sent a partial sum of clients {update.client_ids} where it may not")
        yield update


def _attacker(update: Update, run: _Run) -> TypeGuard[ClientUpdate]:
    """Whether `update` is a malicious client's own (a partial sum is never an attacker's)."""
    return isinstance(update, ClientUpdate) and update.client_id in run.malicious


def _raising(error: Exception) -> Iterator[Update]:
    """Updates that are an error: `error` is raised when the first is read."""
    raise error
    yield  # a generator
