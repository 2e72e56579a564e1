"""The network engine: the selected clients train over the network, everything else is the simulation's.

The round loop (`simulation.simulate`), strategies and evaluation are the same as in simulation;
only where clients train differs. Every update is checked against the task it answers before it
reaches a strategy: its entries, shapes and dtypes are the global model's shared ones (only those
travel: a client's personal and frozen entries never leave it), its values finite, its
metrics finite and in range, and its example and step counts consistent with the work the task
asked for (so a client cannot take over a weighted average by claiming 10**30 examples).
The engine counts the message bytes it sends to clients and receives from them (`traffic()`:
`bytes_down`, `bytes_up`; gRPC's framing, TLS and keepalive pings aside): the round loop records each round's.

Federated evaluation (`evaluate_fraction` > 0): after each round (and for the initial model) the
engine sends connected clients the global model (EVALUATE); each evaluates it on its held-out
examples and answers with its metrics and their count (EVALUATION), checked as an update's
metrics are; the round's `federated_<metric>` are their example-weighted means.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..algorithms import describe
from ..client import ClientConfig, ClientPlan, ClientUpdate, State, all_finite
from ..errors import ConfigError
from ..evaluation import Evaluation
from ..network.hub import Event, EventKind, Hub, Session
from ..network.wire import Kind, Message, WireError, decode, encode, is_number
from ..reductions import PartialSum, Update
from ..secagg import SecureAggregation
from ..secagg.protocol import ProtocolError, SecAggFailed, ServerRound
from ..secagg.quantize import QuantizationError
from .base import ClientTask, Engine, RoundFailed, RoundWatcher, Traffic

log = logging.getLogger("fedforge.server")

DEFAULT_MAX_CLIENT_EXAMPLES = 10_000_000
MAX_METRIC = 1e15  # a finite loss past this is refused as implausible (and would overflow a weighted sum)
MAX_METRICS = 32  # named metrics in one update
MAX_EVALUATION_BYTES = 64 << 10  # an EVALUATION holds a few dozen numbers: anything larger is refused


# The fields of a ClientConfig that may change by round (a learning-rate schedule, a round
# configuration): each TASK carries the round's. The others (batch size, task, optimizer) are the
# welcome's, the same every round.
ROUND_FIELDS = ("round", "rounds", "lr", "local_epochs", "momentum", "weight_decay")


def task_message(
    task_id: int, task: ClientTask, global_state: State, config: ClientConfig, secagg: dict | None = None
) -> Message:
    """The TASK for `task` in a round of client config `config` (its ROUND_FIELDS travel); with
    `secagg` (a round's settings for this client) it opens the secure aggregation protocol, and the
    client answers with its keys, not its update. It names the client algorithm (a built-in and
    its role patterns, `algorithms.describe`) and carries its inputs. `global_state` holds the
    entries that travel: the shared ones (personal and frozen ones never leave a client's disk or
    the server). "counted" is the last round in which this client's update counted (0: none): the
    client keeps the state its training of that round left, and drops any of a later task."""
    plan = task.plan
    header: dict[str, object] = {
        "task": task_id,
        "seed": task.seed,
        "counted": task.counted,
        **{name: getattr(config, name) for name in ROUND_FIELDS},
        "epochs": plan.epochs,
        "max_steps": plan.max_steps,
        "algorithm": describe(config.algorithm),
        "measure_initial_loss": plan.measure_initial_loss,
        "clip": plan.clip,
        "noise_multiplier": plan.noise_multiplier,
    }
    if secagg is not None:
        header["secagg"] = secagg
    tensors = {f"global/{k}": v for k, v in global_state.items()}
    if plan.inputs is not None:
        tensors.update({f"inputs/{k}": v for k, v in plan.inputs.items()})
    return Message(Kind.TASK, header, tensors)


def evaluate_message(task_id: int, global_state: State, config: ClientConfig) -> Message:
    """The EVALUATE asking a client to evaluate the global model on its held-out examples: its
    shared entries (as a TASK's `global/`) and the client algorithm that says which those are
    (the client fills the others from its own model, as the round loop's `_whole` does)."""
    header = {"task": task_id, "algorithm": describe(config.algorithm)}
    return Message(Kind.EVALUATE, header, {f"global/{k}": v for k, v in global_state.items()})


def evaluation_from(
    message: Message, *, max_examples: int = DEFAULT_MAX_CLIENT_EXAMPLES
) -> tuple[dict[str, float], int]:
    """The metrics and held-out example count in an EVALUATION, or ValueError with the reason it
    is refused: no tensors, at most MAX_METRICS finite numbers in range, a count between 0 (no
    held-out examples, and then no metrics) and `max_examples`."""
    h = message.header
    if message.tensors or set(h) != {"task", "client", "metrics", "num_examples"}:
        raise ValueError("an evaluation is {task, client, metrics, num_examples} and no tensors")
    n = h["num_examples"]
    if type(n) is not int or not 0 <= n <= max_examples:
        raise ValueError(f"num_examples {n!r} is not between 0 and {max_examples}")
    metrics = _metrics(h["metrics"], "evaluation metrics")
    if bool(n) != bool(metrics):
        raise ValueError(f"{len(metrics)} metrics of {n} examples")
    return metrics, n


def pooled(evaluations: Sequence[tuple[Mapping[str, float], int]]) -> Evaluation | None:
    """The clients' evaluations as one: each metric's mean weighted by the examples of the clients
    that report it (a metric's sum over all examples when it is a mean over examples, as loss
    and accuracy are); None without examples."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for metrics, n in evaluations:
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value * n
            weights[name] = weights.get(name, 0) + n
    total = sum(n for _, n in evaluations)
    if not total:
        return None
    means = {name: sums[name] / weights[name] for name in sums}
    return Evaluation(means.get("loss", math.nan), means.get("accuracy"), total, means)


def evaluators(sessions: Sequence[Session], fraction: float, r: int) -> list[Session]:
    """The connected clients' sessions (by client id) that evaluate round r's global model:
    `fraction` of them rounded up, the next ones in turn each round (all of them at 1)."""
    count = min(len(sessions), math.ceil(fraction * len(sessions)))
    start = r * count % len(sessions) if sessions else 0
    return [*sessions[start:], *sessions[:start]][:count]


def reported_steps(plan: ClientPlan, config: ClientConfig, num_examples: int) -> int:
    """The optimizer steps an update of `num_examples` examples reports: those of its algorithm's
    phases that train the model it sends (all but a personal copy's: Ditto's), each phase's
    epochs its own where it names them (FedRep's head)."""
    phases = config.algorithm.phases
    return sum(
        steps for phase, steps in zip(phases, plan.phase_steps(num_examples, config), strict=True) if not phase.copy
    )


def _number(header: dict, key: str, low: float, high: float) -> float:
    value = header.get(key)
    if not (is_number(value) and low <= value <= high):
        raise ValueError(f"{key} {value!r} is not a number in [{low:g}, {high:g}]")
    return float(value)


def _optional_number(header: dict, key: str, low: float, high: float) -> float | None:
    return None if header.get(key) is None else _number(header, key, low, high)


def update_from(
    message: Message,
    task: ClientTask,
    config: ClientConfig,
    global_state: State,
    *,
    max_examples: int = DEFAULT_MAX_CLIENT_EXAMPLES,
) -> ClientUpdate:
    """The ClientUpdate in `message`, the answer to `task`, or ValueError with the reason it is
    refused. `global_state` holds the shared entries the task sent: the delta covers exactly those."""
    h = message.header
    delta = {k[len("delta/") :]: v for k, v in message.tensors.items() if k.startswith("delta/")}
    extras = {k[len("extras/") :]: v for k, v in message.tensors.items() if k.startswith("extras/")}
    expected_extras = config.algorithm.extras_like(global_state)
    if delta.keys() != global_state.keys() or len(delta) + len(extras) != len(message.tensors):
        raise ValueError(f"entries {sorted(message.tensors)[:5]}... differ from the global model's shared ones")
    if extras.keys() != expected_extras.keys():
        raise ValueError(f"extras {sorted(extras)[:5]} are not the {len(expected_extras)} its algorithm sends")
    for kind, tensors, like in (("delta", delta, global_state), ("extras", extras, expected_extras)):
        for k, v in tensors.items():
            if v.shape != like[k].shape or v.dtype != like[k].dtype:
                raise ValueError(
                    f"{kind}/{k}: {tuple(v.shape)} {v.dtype} instead of {tuple(like[k].shape)} {like[k].dtype}"
                )
        if not all_finite(tensors.values()):
            raise ValueError(
                "it holds NaN or infinite values" if kind == "delta" else "its extras hold NaN or infinite values"
            )
    n, steps = h.get("num_examples"), h.get("num_steps")
    if type(n) is not int or not 1 <= n <= max_examples:
        raise ValueError(f"num_examples {n!r} is not between 1 and {max_examples}")
    expected = reported_steps(task.plan, config, n)
    if type(steps) is not int or steps != expected:
        raise ValueError(f"num_steps {steps!r} is not the {expected} steps its task asks of {n} examples")
    loss = _number(h, "train_loss", -MAX_METRIC, MAX_METRIC)
    accuracy = _optional_number(h, "train_accuracy", 0.0, 1.0)
    initial = _optional_number(h, "initial_loss", -MAX_METRIC, MAX_METRIC)
    if type(h.get("inputs_differ", False)) is not bool:
        raise ValueError(f"inputs_differ {h.get('inputs_differ')!r} is not true or false")
    metrics = _metrics(h.get("metrics", {}), "metrics")
    if metrics and metrics.get("loss") != loss:
        raise ValueError("metrics disagree with train_loss")
    personalized = _personalized(h.get("personalized"), max_examples)
    return ClientUpdate(
        task.client_id,
        {k: v.to(global_state[k].device) for k, v in delta.items()},
        n,
        steps,
        loss,
        accuracy,
        initial,
        metrics,
        extras={k: v.to(like.device) for (k, v), like in zip(extras.items(), expected_extras.values(), strict=True)},
        personalized=personalized,
    )


def _metrics(metrics: object, what: str) -> dict[str, float]:
    """`metrics`, at most MAX_METRICS finite numbers in range by short names; ValueError otherwise."""
    if (
        not isinstance(metrics, dict)
        or len(metrics) > MAX_METRICS
        or not all(isinstance(k, str) and 0 < len(k) <= 64 for k in metrics)
    ):
        raise ValueError(f"{what} must be at most {MAX_METRICS} named numbers")
    return {k: _number(metrics, k, -MAX_METRIC, MAX_METRIC) for k in metrics}


def _personalized(value: object, max_examples: int) -> tuple[dict[str, float], int] | None:
    """An update's personalized evaluation (its personal model's metrics on its held-out examples,
    and their count), checked; None when it has none."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"metrics", "num_examples"}:
        raise ValueError("personalized must be {metrics, num_examples}")
    n = value["num_examples"]
    if type(n) is not int or not 1 <= n <= max_examples:
        raise ValueError(f"personalized num_examples {n!r} is not between 1 and {max_examples}")
    return _metrics(value["metrics"], "personalized metrics"), n


class NetworkEngine(Engine):
    """Sends each selected client its task over the network and collects the updates.

    A round starts once `min_available_clients` are connected (default: the quorum), or after
    `round_timeout` with the quorum. It ends when every selected client has answered, or at
    `round_timeout`. Clients that
    are not connected, disconnect, or send an update that is refused count as not reporting;
    fewer than `min_fit_clients` updates fail the round (RoundFailed), and the round loop
    retries it with a new selection. A client that reconnects while it owes an update (its
    old connection broke) is sent its task again. Only the session that holds a task counts:
    news of a client's older sessions is ignored. Updates are handed on in task order, as the
    simulation's engines do, so that a run with every client alive equals the simulation.

    With `evaluate_fraction` > 0 the clients evaluate the global model (`evaluate_global`): that
    fraction of the connected clients, rounded up (all of them at 1), taken in turn by client id
    from round to round, so that over rounds each client evaluates as often as the others.
    """

    name = "network"
    clients_privatize = True  # under differential privacy the clients clip (and noise) before sending
    clients_evaluate = True  # under personalized evaluation the clients evaluate their own models

    def __init__(
        self,
        hub: Hub,
        *,
        round_timeout: float,
        min_fit_clients: int,
        max_client_examples: int = DEFAULT_MAX_CLIENT_EXAMPLES,
        secure: SecureAggregation | None = None,
        min_available_clients: int | None = None,
        watcher: RoundWatcher | None = None,
        evaluate_fraction: float = 0.0,
    ):
        if not 0 <= evaluate_fraction <= 1:
            raise ConfigError(f"evaluate_fraction must be in [0, 1], got {evaluate_fraction}")
        self.hub = hub
        self.evaluate_fraction = evaluate_fraction
        self.clients_evaluate_global = evaluate_fraction > 0
        self.watcher = watcher or RoundWatcher()  # the server's dashboard, when it has one
        self.round_timeout = round_timeout
        self.min_fit_clients = min_fit_clients
        self.min_available_clients = max(min_fit_clients, min_available_clients or 0)
        self.max_client_examples = max_client_examples
        self.secure = secure
        self._task_id = 0
        self._left_out: dict[int, str] = {}  # clients a failed secure attempt proved misbehaving: out of the retries
        self._inputs_differ: set[int] = set()  # clients that said their inputs differ from the test inputs
        self.bytes_up = 0  # message bytes received from clients, in all rounds
        self.bytes_down = 0  # message bytes sent to clients
        self._config: dict | None = None  # the first round's config, ROUND_FIELDS aside

    def traffic(self) -> Traffic:
        """The message bytes received from clients and sent to them so far, in all rounds."""
        return Traffic(self.bytes_up, self.bytes_down)

    def run(
        self, model: nn.Module, global_state: State, tasks: Sequence[ClientTask], config: ClientConfig
    ) -> Iterator[Update]:
        # Each task carries the round's ROUND_FIELDS; the rest the clients learn once, from the
        # welcome: a round configuration that changes them would not reach them, so it is refused.
        fixed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ROUND_FIELDS}
        if self._config is None:
            self._config = fixed
        elif fixed != self._config:
            changed = sorted(k for k in fixed if fixed[k] != self._config[k])
            raise ConfigError(
                f"the network engine's clients learn {', '.join(changed)} once, when they join: a round "
                "configuration may change only lr, local_epochs, momentum and weight_decay from round to round"
            )
        # Wait for min_available clients (after an outage, for enough of them to be back); past
        # round_timeout the round goes on with those connected, if they make the quorum.
        if not self.hub.wait_for_clients(
            self.min_available_clients, timeout=self.round_timeout
        ) and not self.hub.wait_for_clients(self.min_fit_clients, timeout=0):
            raise RoundFailed(f"fewer than {self.min_fit_clients} clients connected for {self.round_timeout:.0f} s")
        self._task_id += 1
        task_id = self._task_id
        self.watcher.task(task_id, [task.client_id for task in tasks])
        # Only the shared entries travel: each client fills its personal and frozen ones itself.
        shared = config.algorithm.roles.assign(model).shared
        global_state = {k: global_state[k] for k in shared}
        global_cpu = {k: v.detach().cpu() for k, v in global_state.items()}
        if self.secure is not None:
            return iter([self._secure_round(self.secure, task_id, global_state, global_cpu, tasks, config)])
        by_client = {task.client_id: task for task in tasks}
        holders: dict[int, Session] = {}  # the session each pending task was sent to
        messages: dict[int, bytes] = {}
        for task in tasks:
            data = encode(task_message(task_id, task, global_cpu, config))
            session = self.hub.current(task.client_id)
            if session is not None and self._send(session, data):
                holders[task.client_id], messages[task.client_id] = session, data
            else:
                log.warning("task %d: client %d is not connected; it will not report", task_id, task.client_id)
        updates: dict[int, ClientUpdate] = {}
        for event in self._events(time.monotonic() + self.round_timeout, lambda: bool(holders)):
            client_id = event.session.client_id
            holder = holders.get(client_id)
            if event.kind == EventKind.CONNECTED:
                if (
                    holder is not None
                    and event.session is not holder
                    and self._send(event.session, messages[client_id])
                ):
                    log.info("task %d: client %d reconnected; its task is sent again", task_id, client_id)
                    holders[client_id] = event.session
                continue
            if event.session is not holder:  # an older session's news, or a client without a task
                if event.kind == EventKind.MESSAGE:
                    log.warning(
                        "task %d: discarded a message from client %d: late, not selected or from an old session",
                        task_id,
                        client_id,
                    )
                continue
            if event.kind == EventKind.CLOSED:
                log.warning("task %d: client %d disconnected mid-round; dropped from the round", task_id, client_id)
                del holders[client_id]
                continue
            update = self._accept(event, task_id, by_client[client_id], config, global_state)
            if update is not False:  # False: not an answer to this task; the client may still send one
                del holders[client_id]
                if update is not None:
                    updates[client_id] = update
                    self.watcher.arrived(task_id, client_id)
        if holders:
            log.warning("task %d: no update from %s within %.0f s", task_id, sorted(holders), self.round_timeout)
        if len(updates) < self.min_fit_clients:
            raise RoundFailed(f"{len(updates)} updates arrived, the quorum is {self.min_fit_clients}")
        log.info("task %d: %d of %d updates", task_id, len(updates), len(tasks))
        return (updates[t.client_id] for t in tasks if t.client_id in updates)

    def evaluate_global(self, model: nn.Module, global_state: State, config: ClientConfig, r: int) -> Evaluation | None:
        """The global model after round `r` (0: the initial model) evaluated by the clients on their
        held-out examples: the example-weighted means of the metrics they report (`pooled`). A client
        that is not connected, disconnects, answers late (after round_timeout) or answers what
        `evaluation_from` refuses is left out, logged; None when no client reports an example."""
        self._task_id += 1
        task_id = self._task_id
        chosen = evaluators(self.hub.clients(), self.evaluate_fraction, r)
        shared = config.algorithm.roles.assign(model).shared
        message = evaluate_message(task_id, {k: global_state[k].detach().cpu() for k in shared}, config)
        answers = self._exchange(
            task_id,
            {s.client_id: (s, message) for s in chosen},
            Kind.EVALUATION,
            max_bytes=MAX_EVALUATION_BYTES,
            what="evaluation",
        )
        evaluations = []
        for c, answer in answers.items():
            try:
                evaluations.append(evaluation_from(answer, max_examples=self.max_client_examples))
            except ValueError as e:
                log.warning("task %d: refused the evaluation of client %d: %s", task_id, c, e)
                self.watcher.refused(task_id, c, f"evaluation: {e}")
        evaluation = pooled(evaluations)
        if evaluation is None:
            log.warning(
                "task %d: no client evaluated the global model of round %d (%d of %d asked answered)",
                task_id,
                r,
                len(evaluations),
                len(chosen),
            )
        else:
            log.info(
                "task %d: %d of %d clients evaluated the global model of round %d on %d examples",
                task_id,
                len(evaluations),
                len(chosen),
                r,
                evaluation.num_examples,
            )
        return evaluation

    def _send(self, session: Session, data: bytes) -> bool:
        """hub.send, counting the bytes sent."""
        sent = self.hub.send(session, data)
        if sent:
            self.bytes_down += len(data)
        return sent

    def _events(self, deadline: float, waiting: Callable[[], bool]) -> Iterator[Event]:
        """The hub's events while `waiting()` and until `deadline` (time.monotonic()), counting the
        bytes of messages."""
        while waiting() and (remaining := deadline - time.monotonic()) > 0:
            try:
                event = self.hub.events.get(timeout=remaining)
            except queue.Empty:
                return
            if event.data is not None:
                self.bytes_up += len(event.data)
            yield event

    def _accept(
        self, event: Event, task_id: int, task: ClientTask, config: ClientConfig, global_state: State
    ) -> ClientUpdate | Literal[False] | None:
        """The update in `event`; None when it is refused; False when it answers another task."""
        client_id = task.client_id
        assert event.data is not None, "called for MESSAGE events only"
        try:
            message = decode(event.data, max_bytes=self.hub.max_message_bytes)
        except WireError as e:
            log.warning("task %d: refused a message from client %d: %s", task_id, client_id, e)
            self.watcher.refused(task_id, client_id, str(e))
            return None
        if message.kind != Kind.UPDATE or message.header.get("task") != task_id:
            log.warning(
                "task %d: discarded a %s from client %d for task %r: late or not an update",
                task_id,
                message.kind.name,
                client_id,
                message.header.get("task"),
            )
            return False
        try:
            update = update_from(message, task, config, global_state, max_examples=self.max_client_examples)
            self._note_inputs(client_id, message.header.get("inputs_differ") is True)
            return update
        except ValueError as e:
            log.warning("task %d: refused the update of client %d: %s", task_id, client_id, e)
            self.watcher.refused(task_id, client_id, str(e))
            return None

    def _note_inputs(self, client_id: int, differ: bool) -> None:
        """One warning per client (on the console and the dashboard's log) whose update (under
        secure aggregation, its keys) says its training inputs differ markedly from the server's
        test inputs (network/inputs.py)."""
        if differ and client_id not in self._inputs_differ:
            self._inputs_differ.add(client_id)
            log.warning(
                "client %d says its training inputs differ markedly from the server's test inputs (shape, "
                "mean or spread): the test metrics may not reflect its data",
                client_id,
            )

    # -- secure aggregation: the round as the protocol's four exchanges ---------------------------
    def _secure_round(
        self,
        secure: SecureAggregation,
        task_id: int,
        global_state: State,
        global_cpu: State,
        tasks: Sequence[ClientTask],
        config: ClientConfig,
    ) -> PartialSum:
        """The round's clients, their update summed under secure aggregation (secagg/protocol.py):
        one PartialSum, the strategy's only view of the round. RoundFailed, with nothing
        unmasked, when too few clients are left at any stage."""
        sessions = {}
        for task in tasks:
            if task.client_id in self._left_out:
                log.warning(
                    "task %d: client %d is left out of this attempt: %s",
                    task_id,
                    task.client_id,
                    self._left_out[task.client_id],
                )
                self.watcher.refused(task_id, task.client_id, f"left out: {self._left_out[task.client_id]}")
            elif (session := self.hub.current(task.client_id)) is not None:
                sessions[task.client_id] = session
            else:
                log.warning("task %d: client %d is not connected; it will not report", task_id, task.client_id)
        by_client = {task.client_id: task for task in tasks}
        floats = [k for k, v in global_state.items() if v.is_floating_point()]
        size = sum(global_state[k].numel() for k in floats)
        try:
            quantizer = secure.quantizer(len(sessions), tasks[0].plan.clip if tasks else None)
            protocol = ServerRound(
                task_id,
                sorted(sessions),
                threshold=secure.threshold,
                neighbours=secure.neighbours,
                clip=quantizer.clip,
                max_weight=quantizer.max_weight,
            )
        except (SecAggFailed, QuantizationError) as e:
            raise RoundFailed(f"secure aggregation among {len(sessions)} connected clients: {e}") from None

        def exchange(clients, message: Callable[[int], Message], answer: Kind, accept) -> None:
            sent = {c: (sessions[c], message(c)) for c in clients}
            for c, reply in self._exchange(task_id, sent, answer).items():
                try:
                    accept(c, reply)
                except ProtocolError as e:
                    log.warning("task %d: refused the %s of client %d: %s", task_id, answer.name, c, e)
                    self.watcher.refused(task_id, c, f"{answer.name}: {e}")

        def request(kind: Kind, body: Callable[[int], dict]) -> Callable[[int], Message]:
            return lambda c: Message(kind, {"task": task_id, **body(c)})

        def keys(c: int, m: Message) -> None:
            protocol.on_keys(c, m.header)  # inputs_differ included: true, false or absent
            self._note_inputs(c, m.header.get("inputs_differ") is True)

        # 1. the task and the round's settings -> each client's public keys (it then trains)
        exchange(
            sorted(sessions),
            lambda c: task_message(task_id, by_client[c], global_cpu, config, protocol.setup(c).to_header()),
            Kind.SA_KEYS,
            keys,
        )
        self._secure_quorum(task_id, protocol, len(protocol.keys), "sent keys")
        # 2. neighbours' keys -> sealed shares and commitments
        exchange(
            list(protocol.keys),
            request(Kind.SA_NEIGHBOUR_KEYS, protocol.neighbour_keys),
            Kind.SA_SHARES,
            lambda c, m: protocol.on_shares(c, m.header),
        )
        self._secure_quorum(task_id, protocol, len(protocol.sealed), "shared their secrets")
        # 3. the shares addressed to each -> masked inputs
        length = quantizer.length(size)
        exchange(
            list(protocol.sealed),
            request(Kind.SA_INPUT, protocol.input_request),
            Kind.SA_MASKED,
            lambda c, m: protocol.on_input(c, _words(m), length, m.header),
        )
        self._culprits(task_id, protocol.excluded, "out of the round (treated as dropped)")
        for c in sorted(protocol.inputs):  # a masked update counts as arrived
            self.watcher.arrived(task_id, c)
        self._secure_quorum(task_id, protocol, len(protocol.inputs), "sent masked inputs")
        # 4. who survived and who dropped -> the shares that unmask the sum
        exchange(
            sorted(protocol.inputs),
            request(Kind.SA_UNMASK, protocol.unmask_request),
            Kind.SA_UNMASKED,
            lambda c, m: protocol.on_unmasked(c, m.header),
        )
        self._culprits(task_id, protocol.excluded, "left out of a retry of this round")
        try:
            summed = quantizer.decode(protocol.result(), len(protocol.inputs), sum(protocol.weights.values()))
        except SecAggFailed as e:
            self._culprits(task_id, e.culprits, "left out of the retry")
            raise RoundFailed(f"secure aggregation: {e}; nothing was unmasked") from None
        except QuantizationError as e:
            raise RoundFailed(f"secure aggregation: {e}; the round is discarded") from None
        if summed.clamped:
            log.warning(
                "task %d: %d words of the unmasked sum were past what %d clipped inputs can reach: a client "
                "sent words past its bounds (masking hides which); clamped to that reach",
                task_id,
                summed.clamped,
                summed.count,
            )
        if summed.projected:
            log.warning(
                "task %d: the unmasked sum's L2 norm was past what %d clipped inputs can reach: a client sent "
                "an input past its bounds (masking hides which); scaled down to it",
                task_id,
                summed.count,
            )
        self._left_out.clear()  # the round is done: the next one gives every client a fresh chance
        bound = quantizer.error_bound(summed.count, summed.weight)
        log.info(
            "task %d: the sum of %d masked updates (%d dropped; weight %d, at most %d each; weighted mean exact "
            "to %.2g per coordinate)",
            task_id,
            summed.count,
            len(tasks) - summed.count,
            summed.weight,
            quantizer.max_weight,
            bound,
        )
        self.last_error_bound = bound
        mean = torch.from_numpy(summed.weighted_delta / summed.weight)
        delta, offset = {}, 0
        for k, v in global_state.items():
            if v.is_floating_point():
                delta[k] = mean[offset : offset + v.numel()].reshape(v.shape).to(v.dtype).to(v.device)
                offset += v.numel()
            else:  # integer entries (buffers) are not summed: a zero delta
                delta[k] = torch.zeros(v.shape, dtype=torch.float64, device=v.device)
        return PartialSum(
            delta,
            summed.weight,
            0,
            tuple(sorted(protocol.inputs)),
            metrics={"loss": summed.loss},
            unclipped=summed.unclipped,
        )

    def _culprits(self, task_id: int, culprits: dict[int, str], outcome: str) -> None:
        """Log and show each client proven misbehaving, once, and leave it out of retries of this round."""
        for c, why in culprits.items():
            if self._left_out.get(c) != why:
                self._left_out[c] = why
                log.warning("task %d: client %d is %s: %s", task_id, c, outcome, why)
                self.watcher.refused(task_id, c, why)

    def _secure_quorum(self, task_id: int, protocol: ServerRound, count: int, stage: str) -> None:
        need = max(protocol.threshold, self.min_fit_clients)
        if count < need:
            raise RoundFailed(
                f"secure aggregation: {count} clients {stage}, the round needs {need} (threshold "
                f"{protocol.threshold}, quorum {self.min_fit_clients}); nothing was unmasked"
            )

    def _exchange(
        self,
        task_id: int,
        outgoing: dict[int, tuple[Session, Message]],
        answer: Kind,
        *,
        max_bytes: int | None = None,
        what: str = "round",
    ) -> dict[int, Message]:
        """Send each client its message; collect one answer of kind `answer` (at most `max_bytes`,
        default the hub's limit) from each, until all have answered or round_timeout. A client that
        disconnects, sends anything else, or answers in another client's name is out of the round
        (or the `what` it answers for; logged)."""
        pending: dict[int, Session] = {}
        encoded = {id(message): encode(message) for _, message in outgoing.values()}  # one message for many: once
        for c, (session, message) in outgoing.items():
            if self._send(session, encoded[id(message)]):
                pending[c] = session
            else:
                log.warning("task %d: client %d disconnected; dropped from the %s", task_id, c, what)
        answers: dict[int, Message] = {}
        for event in self._events(time.monotonic() + self.round_timeout, lambda: bool(pending)):
            c = event.session.client_id
            if pending.get(c) is not event.session:
                if event.kind == EventKind.MESSAGE:
                    log.warning(
                        "task %d: discarded a message from client %d: late, out of the %s or from an old session",
                        task_id,
                        c,
                        what,
                    )
                continue
            if event.kind == EventKind.CONNECTED:
                continue
            del pending[c]
            if event.kind == EventKind.CLOSED:
                log.warning(
                    "task %d: client %d disconnected before its %s; dropped from the %s", task_id, c, answer.name, what
                )
                continue
            assert event.data is not None, "the events left are MESSAGE events"
            try:
                message = decode(event.data, max_bytes=max_bytes or self.hub.max_message_bytes)
            except WireError as e:
                log.warning("task %d: refused a message from client %d: %s", task_id, c, e)
                self.watcher.refused(task_id, c, str(e))
                continue
            h = message.header
            if message.kind != answer or h.get("task") != task_id or h.get("client") != c:
                log.warning(
                    "task %d: refused a %s from client %d (for task %r, as client %r) where its %s was due",
                    task_id,
                    message.kind.name,
                    c,
                    h.get("task"),
                    h.get("client"),
                    answer.name,
                )
                self.watcher.refused(task_id, c, f"a {message.kind.name} where its {answer.name} was due")
                continue
            answers[c] = message
        if pending:
            log.warning(
                "task %d: no %s from %s within %.0f s", task_id, answer.name, sorted(pending), self.round_timeout
            )
        return answers


def _words(message: Message) -> np.ndarray:
    """The masked input in a SA_MASKED message: one 1-D int32 tensor, read as uint32 words."""
    tensor = message.tensors.get("masked")
    if len(message.tensors) != 1 or tensor is None or tensor.dtype != torch.int32 or tensor.dim() != 1:
        raise ProtocolError("a masked input is one 1-D int32 tensor named 'masked'")
    return tensor.numpy().view(np.uint32)
