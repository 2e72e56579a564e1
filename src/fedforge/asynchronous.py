"""Asynchronous aggregation on the virtual clock: FedBuff and FedAsync, event by event.

No round waits for its slowest client. At most `concurrency` (M) clients train at once, each from
the global model as it was when it was sent its task (its version); its update arrives when the
clock says (`Clock.task`: dispatch + download + training + upload), and the freed slot is given
at once to a client sampled among the idle, online ones. The server applies a step

- FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"):
  after every `buffer_size` (K) updates, of their deltas' mean weighted by their examples and by
  a staleness function of s, the versions since each started: the run's strategy's `apply_mean`
  (its server lr, momentum or adaptive optimizer);
- FedAsync (Xie et al. 2019, "Asynchronous Federated Optimization"): with each update,
  w <- (1 - a) w + a w_client, a = alpha x staleness(s).

An update staler than `max_staleness` is dropped (and logged). Each server step is a "round" of
the history, with its `virtual_time`, its updates' staleness and the clients then in flight.

Deterministic: events are ordered by (virtual time, sequence number), the sequence numbers given
as tasks are sent (a client's in increasing id at one event), so the same seed gives the same
events and the same weights on every engine. A client's update is a function of its start model,
its data and its batch seed only, so it is trained when its task is sent (all the clients sent at
one event in one `Engine.run`: the vectorized engine batches them) and held until it arrives.
The clients sent the first tasks from a version draw as a synchronous round would (its selection
and batch seeds, `_seeding`); with equally fast clients and K = M = clients per round every update
has staleness 0 and FedBuff is synchronous FedAvg (or the strategy's optimizer), exactly.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from . import _seeding
from .algorithms import PERSONAL, nbytes
from .clock import Work
from .contract import ClientConfig, ClientUpdate, State
from .data.federated import FederatedData
from .devices import Devices
from .engines import ClientTask, Engine
from .errors import ConfigError, FedforgeError
from .history import History, RoundRecord
from .privacy.run import DifferentialPrivacy
from .reductions import RunningMean, Update, cast_like, example_weighted
from .scenarios import Scenario
from .schedules import RoundConfig
from .simulation import (
    EvaluateFn,
    Kept,
    Progress,
    Resume,
    _evaluate,
    _Evaluated,
    _record,
    _recorded,
    _round_config,
    _Run,
    _Settings,
    _setup,
    _start,
    _Trained,
    _whole,
)
from .staleness import Asynchronous, FedAsync, FedBuff, parse_staleness
from .strategies import FedAvg, LinearStrategy, ServerState, Strategy, StrategyBase

log = logging.getLogger("fedforge")


@dataclass(frozen=True)
class Event:
    """One thing that happened on the clock: a task sent (`dispatch`), an update that arrived and
    counted (`arrived`), one dropped as too stale (`stale`), or a client gone offline before it
    sent its update (`lost`). `version`: the global model's version the client started from;
    `staleness`: the versions since then, when its update arrived."""

    time: float
    seq: int
    client: int
    version: int
    kind: str
    staleness: int = 0


@dataclass
class _InFlight:
    """A client at work: when its update arrives (or it goes offline), and the update, trained already."""

    arrives: float
    seq: int
    client: int
    version: int
    start: State  # the global model it started from (FedAsync mixes its model, not its delta)
    update: ClientUpdate
    lost: bool

    def __lt__(self, other: _InFlight) -> bool:
        return (self.arrives, self.seq) < (other.arrives, other.seq)


@dataclass
class _Loop:
    """The event loop's state as it goes: the server's state, the clients at work, the buffer,
    the sequence numbers, and what the next record counts."""

    state: ServerState
    now: float = 0.0
    flying: list[_InFlight] = field(default_factory=list)  # a heap
    seq: itertools.count[int] = field(default_factory=itertools.count)
    sent: dict[int, int] = field(default_factory=dict)  # version -> events that sent tasks from it
    buffer: list[tuple[ClientUpdate, float, int]] = field(default_factory=list)  # update, weight, staleness
    stale: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    wake: float = math.inf  # when a free slot can next be filled, with no arrival before


def check(run: _Run, asynchronous: Asynchronous, resume: object) -> None:
    """One-line ConfigErrors for what an asynchronous run cannot do (yet), and why."""
    if resume is not None:
        raise ConfigError("resuming an asynchronous run is not supported yet: start it again (docs/time.md)")
    if run.dp is not None:
        raise ConfigError(
            "differential privacy with asynchronous aggregation: the accountant counts rounds of sampled clients, "
            "not buffers of stale updates (DP per buffer is not implemented yet)"
        )
    if run.engine.clients_evaluate_global or run.engine.clients_privatize:
        raise ConfigError("asynchronous aggregation is simulated here: a deployment's engine cannot run it")
    if run.scenario != Scenario():
        raise ConfigError(
            "asynchronous aggregation with a scenario: clients' speeds are the devices' (device profiles), "
            "and attacks or dropouts are not modelled asynchronously yet"
        )
    if run.settings.sampling != "fixed":
        raise ConfigError("asynchronous aggregation samples clients as slots free up: it needs sampling fixed")
    if run.devices is not None and (run.devices.deadline is not None or run.devices.over_select > 0):
        raise ConfigError("round_deadline and over_select are for synchronous rounds, not asynchronous aggregation")
    if run.client.task.keep_optimizer_state or run.client.algorithm.keeps_state or run.personal_test is not None:
        raise ConfigError(
            "asynchronous aggregation with state kept on the clients (optimizer state, personal entries or "
            "models, personalized evaluation): a client's state would come from a model many versions old"
        )
    if any(role == PERSONAL for role in run.roles.roles.values()):
        raise ConfigError("asynchronous aggregation with personal entries is not supported yet")
    strategy = run.strategy
    if isinstance(asynchronous, FedBuff) and not isinstance(strategy, LinearStrategy):
        reason = strategy.needs_each_update if isinstance(strategy, StrategyBase) else "it is not a LinearStrategy"
        raise ConfigError(
            f"FedBuff steps with the strategy's server optimizer from its buffer's weighted mean; "
            f"strategy {strategy.name} cannot: {reason}"
        )
    if isinstance(asynchronous, FedAsync) and not (type(strategy) is FedAvg and strategy.server_lr == 1):
        raise ConfigError(
            f"FedAsync mixes each client's model into the global one (async_alpha): it has no server optimizer, "
            f"so strategy {strategy.name} (or a server_lr) does not apply: use strategy fedavg"
        )
    n = run.data.num_clients
    if isinstance(asynchronous, FedBuff) and asynchronous.buffer_size is not None and asynchronous.buffer_size > n:
        raise ConfigError(f"buffer_size={asynchronous.buffer_size} is more than num_clients={n}")
    if asynchronous.concurrency is not None and asynchronous.concurrency > n:
        raise ConfigError(f"concurrency={asynchronous.concurrency} is more than num_clients={n}")


def sizes(asynchronous: Asynchronous, k: int, num_clients: int) -> tuple[int, int]:
    """(K, M): the updates a server step takes (1 for FedAsync) and the clients at work at most."""
    if isinstance(asynchronous, FedAsync):
        return 1, asynchronous.concurrency or k
    buffer = asynchronous.buffer_size or k
    return buffer, asynchronous.concurrency or min(num_clients, 2 * buffer)


def run_asynchronous(
    run: _Run,
    asynchronous: Asynchronous,
    state: ServerState,
    records: list[RoundRecord],
    recorded: Callable[[list[RoundRecord], ServerState], None],
) -> tuple[ServerState, list[RoundRecord], list[Event]]:
    """The event loop, from `state` (version `state.round`, at virtual time 0) until `run`'s rounds
    (server steps) are done; `recorded` hears of each step's record. Returns the last state, the
    records and the events."""
    assert run.clock is not None, "an asynchronous run has a clock"
    buffer_size, concurrency = sizes(asynchronous, run.k, run.data.num_clients)
    weight = parse_staleness(asynchronous.staleness)
    loop = _Loop(state)
    _dispatch(run, loop, concurrency)
    while loop.state.round < run.settings.rounds:
        arrives = loop.flying[0].arrives if loop.flying else math.inf
        if loop.wake < arrives:  # a free slot, and an idle client comes online before the next arrival
            loop.now = loop.wake
            _dispatch(run, loop, concurrency)
            continue
        if not math.isfinite(arrives):
            raise FedforgeError(
                f"no client is online at virtual time {loop.now:.6g} or later: the trace's windows have ended"
            )
        loop.now = arrives
        # Every event at this moment, in sequence order, then the freed slots filled at once.
        while loop.flying and loop.flying[0].arrives == loop.now and loop.state.round < run.settings.rounds:
            task = heapq.heappop(loop.flying)
            s = loop.state.round - task.version
            kind = _arrival(task, s, asynchronous.max_staleness)
            loop.events.append(Event(loop.now, task.seq, task.client, task.version, kind, s))
            if kind != "arrived":
                (loop.lost if kind == "lost" else loop.stale).append(task.client)
                continue
            loop.buffer.append((task.update, weight(s), s))
            if run.settings.on_client is not None:
                run.settings.on_client(task.update)
            if len(loop.buffer) < buffer_size:
                continue
            if isinstance(asynchronous, FedAsync):
                new = _mixed(loop.state, task.start, task.update, asynchronous.alpha * weight(s))
            else:
                new = _buffered_step(run, loop.state, loop.buffer)
            records.append(_step_record(run, loop, new, asynchronous.eval_every))
            loop.state = new
            loop.buffer, loop.stale, loop.lost, loop.started = [], [], [], time.perf_counter()
            recorded(records, new)
        if loop.state.round < run.settings.rounds:
            _dispatch(run, loop, concurrency)
    return loop.state, records, loop.events


def _arrival(task: _InFlight, staleness: int, bound: int | None) -> str:
    """What becomes of a task at its event: its client went offline first (`lost`), its update is
    too stale (`stale`: dropped, and logged) or it counts (`arrived`)."""
    if task.lost:
        log.info("client %d went offline before it sent its update", task.client)
        return "lost"
    if bound is not None and staleness > bound:
        log.info("update of client %d dropped: %d versions stale (max_staleness %d)", task.client, staleness, bound)
        return "stale"
    return "arrived"


def _dispatch(run: _Run, loop: _Loop, concurrency: int) -> None:
    """Fill the free slots at `loop.now` with idle, online clients sampled uniformly, all sent the
    current version in one `Engine.run`. The first event that sends from a version draws as the
    synchronous round of that version would; later ones from their own streams. When slots stay
    free, `loop.wake` is when the next idle client comes online."""
    assert run.clock is not None, "an asynchronous run has a clock"
    loop.wake = math.inf
    free = concurrency - len(loop.flying)
    if free <= 0:
        return
    state, n, profiles = loop.state, run.data.num_clients, run.clock.profiles
    r = state.round + 1  # the round (server step) these updates are for
    j = loop.sent.get(state.round, 0)
    busy = {task.client for task in loop.flying}
    keys = (_seeding.SELECTION, r) if j == 0 else (_seeding.ASYNC_DISPATCH, r, j)
    order = torch.randperm(n, generator=_seeding.generator(run.seed, *keys)).tolist()
    always = profiles.always
    idle = (c for c in order if c not in busy and (always or profiles.online_until(c, loop.now) is not None))
    chosen = sorted(itertools.islice(idle, free))
    if len(chosen) < free and not always:
        busy.update(chosen)
        loop.wake = min(
            (
                profiles.next_online(c, loop.now)
                for c in range(n)
                if c not in busy and profiles.online_until(c, loop.now) is None
            ),
            default=math.inf,
        )
    if not chosen:
        return
    loop.sent[state.round] = j + 1
    config = _round_config(run, r)
    batch_keys = (_seeding.CLIENT_BATCHES, r) if j == 0 else (_seeding.ASYNC_DISPATCH, r, j)
    seeds = _seeding.derive_seeds(run.seed, *batch_keys, each=chosen)
    shared = nbytes(state.params)
    tasks, ends = [], {}
    for c, seed in zip(chosen, seeds, strict=True):
        plan = run.strategy.plan(state, c)
        tasks.append(ClientTask(c, run.clients[c], seed, run.pool, run.starts[c], plan))
        sent = shared + nbytes(plan.inputs or {})
        steps = sum(plan.phase_steps(len(run.clients[c]), config))
        arrives = loop.now + run.clock.task(c, Work(steps, sent, sent)).total
        leaves = profiles.online_until(c, loop.now)
        assert leaves is not None, "an idle client chosen is online"
        ends[c] = (leaves, True) if arrives > leaves else (arrives, False)  # gone: its slot frees when it goes
    updates = {}
    for update in run.engine.run(run.model, _whole(run, state), tasks, config):
        if not isinstance(update, ClientUpdate):
            raise TypeError(f"the engine sent a partial sum of clients {update.client_ids} where it may not")
        updates[update.client_id] = update
    for c in chosen:  # in increasing id: the sequence numbers' order
        seq = next(loop.seq)
        loop.events.append(Event(loop.now, seq, c, state.round, "dispatch"))
        at, lost = ends[c]
        heapq.heappush(loop.flying, _InFlight(at, seq, c, state.round, state.params, updates[c], lost))


def _buffered_step(run: _Run, state: ServerState, buffer: Sequence[tuple[ClientUpdate, float, int]]) -> ServerState:
    """FedBuff's step: the strategy's `apply_mean` of sum(w_i n_i delta_i) / sum(n_i), w_i the
    staleness weights and n_i the examples. With every w_i = 1 it is the example-weighted mean
    delta of a synchronous round, computed as `reductions.weighted_mean_delta` does, bit for bit."""
    acc = RunningMean()
    examples = 0
    for update, w, _ in buffer:
        acc.add(update.delta, w * float(update.num_examples))
        examples += update.num_examples
    if acc.total_weight == 0:
        return state.unchanged()
    scale = acc.total_weight / examples
    mean = {k: cast_like(v * scale, state.params[k]) for k, v in acc.mean().items()}
    assert isinstance(run.strategy, LinearStrategy), "checked: FedBuff steps with a linear strategy"
    return run.strategy.apply_mean(state, mean)


def _mixed(state: ServerState, start: State, update: ClientUpdate, a: float) -> ServerState:
    """FedAsync's step: w <- (1 - a) w + a (start + delta) for float entries; integer buffers
    (BatchNorm's count) take the client's value."""
    params = {}
    for k, w in state.params.items():
        client = start[k] + cast_like(update.delta[k], start[k])
        params[k] = (1 - a) * w + a * client if w.is_floating_point() else client
    return state.next(params)


def _step_record(run: _Run, loop: _Loop, new: ServerState, eval_every: int) -> RoundRecord:
    """The server step's record: its updates' clients and training metrics, the evaluation (every
    `eval_every` steps and at the last), and on the clock its virtual time, its updates' staleness,
    the clients in flight and those whose updates were dropped since the last step."""
    staleness = [s for _, _, s in loop.buffer]
    evaluated = (
        _evaluate(run, new)
        if new.round % eval_every == 0 or new.round == run.settings.rounds
        else _Evaluated(None, None, None, {})
    )
    trained = _Trained(
        new,
        run.client,
        tuple(u.client_id for u, _, _ in loop.buffer),
        tuple(loop.stale + loop.lost),
        example_weighted((u.training_metrics(), u.num_examples) for u, _, _ in loop.buffer),
        {},
        {},
        set(),
        [],
        {},
        time.perf_counter(),
    )
    record = _record(run, new, evaluated, trained, loop.started, {})
    timed = {
        "virtual_time": loop.now,
        "staleness_mean": sum(staleness) / len(staleness),
        "staleness_max": float(max(staleness)),
        "in_flight": float(len(loop.flying)),
        "stale_dropped": float(len(loop.stale)),
        "late_clients": float(len(loop.lost)),
    }
    return replace(record, metrics={**record.metrics, **timed})


@dataclass(frozen=True)
class AsyncResult:
    """An asynchronous run: its history (one record per server step), the last state, and every
    event on the clock, in order."""

    history: History
    state: ServerState
    events: Sequence[Event]


def simulate_async(
    model: nn.Module,
    data: FederatedData,
    *,
    asynchronous: Asynchronous,
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
    privacy: DifferentialPrivacy | None = None,
    sampling: str = "fixed",
    round_config: RoundConfig | None = None,
    personalized_eval: bool | None = None,
    evaluate_fn: EvaluateFn | None = None,
    devices: Devices | None = None,
) -> AsyncResult:
    """Train `model` over `data` with asynchronous aggregation (`FedBuff` or `FedAsync`) on the
    virtual clock of `devices` (None: `Devices()`, every client as fast as the base device) for
    `rounds` server steps; `simulate`'s other arguments mean what they mean there.

    `clients_per_round` is the default buffer size (FedBuff) and concurrency (FedAsync). What
    cannot run asynchronously yet is refused in one line (`check`): differential privacy, a
    scenario, state kept on the clients, a resume, a strategy that is not linear (FedBuff) or not
    plain FedAvg (FedAsync), a round deadline and over-selection.
    """
    settings = _Settings(
        rounds, sampling, 1, eval_batch_size, eval_train, on_client, round_config, personalized_eval, evaluate_fn
    )
    devices = devices or Devices()
    run = _setup(
        model, data, client, strategy, engine, scenario, seed, clients_per_round, privacy, None, settings, devices
    )
    run = replace(run, summable=False)  # each update on its own: they arrive one by one
    check(run, asynchronous, resume)
    state, records, _ = _start(run, None, checkpoint, on_round)

    def recorded(records: list[RoundRecord], state: ServerState) -> None:
        _recorded(records, state, Kept(), checkpoint, on_round)

    state, records, events = run_asynchronous(run, asynchronous, state, records, recorded)
    return AsyncResult(History(records), state, tuple(events))


__all__ = ["AsyncResult", "Event", "check", "simulate_async"]
