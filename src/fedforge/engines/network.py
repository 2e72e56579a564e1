"""The network engine: the selected clients train over the network, everything else is the simulation's.

The round loop (`simulation.simulate`), strategies and evaluation are the same as in simulation;
only where clients train differs. Every update is checked against the task it answers before it
reaches a strategy: its entries, shapes and dtypes are the global model's, its values finite, its
metrics finite and in range, and its example and step counts consistent with the work the task
asked for (so a client cannot take over a weighted average by claiming 10**30 examples).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator, Sequence

from torch import nn

from ..client import ClientConfig, ClientUpdate, State, all_finite
from ..network.hub import Event, EventKind, Hub, Session
from ..network.wire import Kind, Message, WireError, decode, encode
from .base import ClientTask, RoundFailed

log = logging.getLogger("fedforge.server")

DEFAULT_MAX_CLIENT_EXAMPLES = 10_000_000
MAX_METRIC = 1e15  # a finite loss past this is refused as implausible (and would overflow a weighted sum)
MAX_METRICS = 32  # named metrics in one update


def task_message(task_id: int, task: ClientTask, global_state: State) -> Message:
    plan = task.plan
    header = {"task": task_id, "seed": task.seed, "epochs": plan.epochs, "max_steps": plan.max_steps,
              "proximal_mu": plan.proximal_mu, "measure_initial_loss": plan.measure_initial_loss,
              "clip": plan.clip, "noise_multiplier": plan.noise_multiplier}
    tensors = {f"global/{k}": v for k, v in global_state.items()}
    if plan.correction is not None:
        tensors.update({f"correction/{k}": v for k, v in plan.correction.items()})
    return Message(Kind.TASK, header, tensors)


def _number(header: dict, key: str, low: float, high: float, *, optional: bool = False) -> float | None:
    value = header.get(key)
    if value is None and optional:
        return None
    if type(value) not in (int, float) or not low <= value <= high:
        raise ValueError(f"{key} {value!r} is not a number in [{low:g}, {high:g}]")
    return float(value)


def update_from(message: Message, task: ClientTask, config: ClientConfig, global_state: State, *,
                max_examples: int = DEFAULT_MAX_CLIENT_EXAMPLES) -> ClientUpdate:
    """The ClientUpdate in `message`, the answer to `task`, or ValueError with the reason it is refused."""
    h = message.header
    delta = {k[len("delta/"):]: v for k, v in message.tensors.items() if k.startswith("delta/")}
    if delta.keys() != global_state.keys() or len(delta) != len(message.tensors):
        raise ValueError(f"entries {sorted(message.tensors)[:5]}... differ from the global model's")
    for k, v in delta.items():
        if v.shape != global_state[k].shape or v.dtype != global_state[k].dtype:
            raise ValueError(f"{k}: {tuple(v.shape)} {v.dtype} instead of {tuple(global_state[k].shape)} "
                             f"{global_state[k].dtype}")
    if not all_finite(delta.values()):
        raise ValueError("it holds NaN or infinite values")
    n, steps = h.get("num_examples"), h.get("num_steps")
    if type(n) is not int or not 1 <= n <= max_examples:
        raise ValueError(f"num_examples {n!r} is not between 1 and {max_examples}")
    expected = task.plan.num_steps(n, config)
    if type(steps) is not int or steps != expected:
        raise ValueError(f"num_steps {steps!r} is not the {expected} steps its task asks of {n} examples")
    loss = _number(h, "train_loss", -MAX_METRIC, MAX_METRIC)
    accuracy = _number(h, "train_accuracy", 0.0, 1.0, optional=True)
    initial = _number(h, "initial_loss", -MAX_METRIC, MAX_METRIC, optional=True)
    metrics = h.get("metrics", {})
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS or \
            not all(isinstance(k, str) and 0 < len(k) <= 64 for k in metrics):
        raise ValueError(f"metrics must be at most {MAX_METRICS} named numbers")
    metrics = {k: _number(metrics, k, -MAX_METRIC, MAX_METRIC) for k in metrics}
    if metrics and metrics.get("loss") != loss:
        raise ValueError("metrics disagree with train_loss")
    return ClientUpdate(task.client_id, {k: v.to(global_state[k].device) for k, v in delta.items()}, n, steps,
                        loss, accuracy, initial, metrics)


class NetworkEngine:
    """Sends each selected client its task over the network and collects the updates.

    A round ends when every selected client has answered, or at `round_timeout`. Clients that
    are not connected, disconnect, or send an update that is refused count as not reporting;
    fewer than `min_fit_clients` updates fail the round (RoundFailed), and the round loop
    retries it with a new selection. A client that reconnects while it owes an update (its
    old connection broke) is sent its task again. Only the session that holds a task counts:
    news of a client's older sessions is ignored. Updates are handed on in task order, as the
    simulation's engines do, so that a run with every client alive equals the simulation.
    """

    name = "network"
    clients_privatize = True  # under differential privacy the clients clip (and noise) before sending

    def __init__(self, hub: Hub, *, round_timeout: float, min_fit_clients: int,
                 max_client_examples: int = DEFAULT_MAX_CLIENT_EXAMPLES):
        self.hub = hub
        self.round_timeout = round_timeout
        self.min_fit_clients = min_fit_clients
        self.max_client_examples = max_client_examples
        self._task_id = 0

    def run(self, model: nn.Module, global_state: State, tasks: Sequence[ClientTask], config: ClientConfig
            ) -> Iterator[ClientUpdate]:
        # After an outage (a round retried for want of clients) wait for enough of them to be back.
        if not self.hub.wait_for_clients(self.min_fit_clients, timeout=self.round_timeout):
            raise RoundFailed(f"fewer than {self.min_fit_clients} clients connected for {self.round_timeout:.0f} s")
        self._task_id += 1
        task_id = self._task_id
        global_cpu = {k: v.detach().cpu() for k, v in global_state.items()}
        by_client = {task.client_id: task for task in tasks}
        holders: dict[int, Session] = {}  # the session each pending task was sent to
        messages: dict[int, bytes] = {}
        for task in tasks:
            data = encode(task_message(task_id, task, global_cpu))
            session = self.hub.current(task.client_id)
            if session is not None and self.hub.send(session, data):
                holders[task.client_id], messages[task.client_id] = session, data
            else:
                log.warning("task %d: client %d is not connected; it will not report", task_id, task.client_id)
        updates: dict[int, ClientUpdate] = {}
        deadline = time.monotonic() + self.round_timeout
        while holders and (remaining := deadline - time.monotonic()) > 0:
            try:
                event = self.hub.events.get(timeout=remaining)
            except queue.Empty:
                break
            client_id = event.session.client_id
            holder = holders.get(client_id)
            if event.kind == EventKind.CONNECTED:
                if holder is not None and event.session is not holder and self.hub.send(event.session,
                                                                                         messages[client_id]):
                    log.info("task %d: client %d reconnected; its task is sent again", task_id, client_id)
                    holders[client_id] = event.session
                continue
            if event.session is not holder:  # an older session's news, or a client without a task
                if event.kind == EventKind.MESSAGE:
                    log.warning("task %d: discarded a message from client %d: late, not selected or from an "
                                "old session", task_id, client_id)
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
        if holders:
            log.warning("task %d: no update from %s within %.0f s", task_id, sorted(holders), self.round_timeout)
        if len(updates) < self.min_fit_clients:
            raise RoundFailed(f"{len(updates)} updates arrived, the quorum is {self.min_fit_clients}")
        log.info("task %d: %d of %d updates", task_id, len(updates), len(tasks))
        return (updates[t.client_id] for t in tasks if t.client_id in updates)

    def _accept(self, event: Event, task_id: int, task: ClientTask, config: ClientConfig, global_state: State
                ) -> ClientUpdate | None | bool:
        """The update in `event`; None when it is refused; False when it answers another task."""
        client_id = task.client_id
        try:
            message = decode(event.data, max_bytes=self.hub.max_message_bytes)
        except WireError as e:
            log.warning("task %d: refused a message from client %d: %s", task_id, client_id, e)
            return None
        if message.kind != Kind.UPDATE or message.header.get("task") != task_id:
            log.warning("task %d: discarded a %s from client %d for task %r: late or not an update", task_id,
                        message.kind.name, client_id, message.header.get("task"))
            return False
        try:
            return update_from(message, task, config, global_state, max_examples=self.max_client_examples)
        except ValueError as e:
            log.warning("task %d: refused the update of client %d: %s", task_id, client_id, e)
            return None
