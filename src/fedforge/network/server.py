"""The server side of a deployment: gRPC sessions with clients, and the network engine.

The network is one more engine: the round loop (`simulation.simulate`), strategies and
evaluation are the simulation's; only where clients train differs.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from torch import nn

from ..client import ClientConfig, ClientUpdate, State, all_finite
from ..engines.base import ClientTask, RoundFailed
from ..errors import ConfigError
from .auth import verify
from .wire import Kind, Message, WireError, decode, encode

log = logging.getLogger("fedforge.server")

SERVICE = "fedforge.Federation"
METHOD = f"/{SERVICE}/Session"


DEFAULT_KEEPALIVE = 20.0  # seconds


def channel_options(max_message_bytes: int, keepalive: float = DEFAULT_KEEPALIVE) -> list[tuple[str, int]]:
    """gRPC options for both ends: message limits with room for our own, logged, size check,
    and bidirectional keep-alive: a ping after `keepalive` seconds without traffic keeps idle
    connections through NAT open, and one unanswered for half that long closes the connection,
    so a peer that froze or vanished without closing it (power loss, a partitioned network) is
    noticed: the server drops such a client from its round at once."""
    hard_limit = 4 * max_message_bytes + (1 << 20)
    return [
        ("grpc.max_receive_message_length", hard_limit),
        ("grpc.max_send_message_length", hard_limit),
        ("grpc.keepalive_time_ms", int(keepalive * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive * 500)),
        ("grpc.http2.ping_timeout_ms", int(keepalive * 500)),  # gRPC >= 1.6x: the ack deadline of every ping
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ]


@dataclass
class _Connection:
    client_id: int
    outbox: queue.Queue
    alive: bool = True


class Hub:
    """Connected clients: authenticates sessions, carries messages both ways."""

    def __init__(self, tokens: dict[int, str], *, welcome: dict, max_message_bytes: int):
        self.tokens = tokens
        self.welcome = welcome
        self.max_message_bytes = max_message_bytes
        self.changed = threading.Condition()
        self.clients: dict[int, _Connection] = {}
        self.inbox: queue.Queue[tuple[int, Message | None, int]] = queue.Queue()
        self._generation = 0

    # -- the gRPC handler -------------------------------------------------------------------
    def session(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        peer = context.peer()
        try:
            hello = decode(next(requests), max_bytes=self.max_message_bytes)
        except (StopIteration, grpc.RpcError):
            return
        except WireError as e:
            log.warning("refused %s: %s", peer, e)
            yield encode(Message(Kind.REJECT, {"reason": str(e)}))
            return
        client_id, secret = hello.header.get("client_id"), hello.header.get("secret")
        if hello.kind != Kind.HELLO or type(client_id) is not int or not isinstance(secret, str):
            log.warning("refused %s: the first message must be a hello with client_id and secret", peer)
            yield encode(Message(Kind.REJECT, {"reason": "expected hello"}))
            return
        reason = verify(self.tokens, client_id, secret)
        connection = _Connection(client_id, queue.Queue())
        with self.changed:
            if reason is None and client_id in self.clients:
                reason = f"client {client_id} is already connected"
            if reason is None:
                self.clients[client_id] = connection
                self._generation += 1
                generation = self._generation
                self.changed.notify_all()
        if reason is not None:
            log.warning("refused %s: %s", peer, reason)
            yield encode(Message(Kind.REJECT, {"reason": reason}))
            return
        log.info("client %d connected from %s (%d connected)", client_id, peer, len(self.clients))
        context.add_callback(lambda: connection.outbox.put(None))
        reader = threading.Thread(target=self._read, args=(connection, requests, generation), daemon=True)
        reader.start()
        try:
            yield encode(Message(Kind.WELCOME, self.welcome))
            while (item := connection.outbox.get()) is not None:
                yield item
        finally:
            self._drop(connection)

    def _read(self, connection: _Connection, requests: Iterator[bytes], generation: int) -> None:
        try:
            for raw in requests:
                try:
                    message = decode(raw, max_bytes=self.max_message_bytes)
                except WireError as e:
                    log.warning("refused a message from client %d: %s", connection.client_id, e)
                    self.inbox.put((connection.client_id, Message(Kind.REJECT, {"reason": str(e)}), generation))
                    continue
                self.inbox.put((connection.client_id, message, generation))
        except grpc.RpcError:
            pass
        finally:
            self._drop(connection)
            self.inbox.put((connection.client_id, None, generation))

    def _drop(self, connection: _Connection) -> None:
        with self.changed:
            if connection.alive:
                connection.alive = False
                connection.outbox.put(None)
                if self.clients.get(connection.client_id) is connection:
                    del self.clients[connection.client_id]
                    log.info("client %d disconnected (%d connected)", connection.client_id, len(self.clients))
                self.changed.notify_all()

    # -- used by the round loop -------------------------------------------------------------
    def wait_for_clients(self, count: int, timeout: float | None = None) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.clients) >= count, timeout)

    def send(self, client_id: int, data: bytes) -> bool:
        with self.changed:
            connection = self.clients.get(client_id)
            if connection is None or not connection.alive:
                return False
            connection.outbox.put(data)
            return True

    def shutdown(self) -> None:
        with self.changed:
            connections = list(self.clients.values())
        for connection in connections:
            connection.outbox.put(encode(Message(Kind.SHUTDOWN)))
            connection.outbox.put(None)


def task_message(task_id: int, task: ClientTask, global_state: State) -> Message:
    plan = task.plan
    header = {"task": task_id, "seed": task.seed, "epochs": plan.epochs, "max_steps": plan.max_steps,
              "proximal_mu": plan.proximal_mu, "measure_initial_loss": plan.measure_initial_loss}
    tensors = {f"global/{k}": v for k, v in global_state.items()}
    if plan.correction is not None:
        tensors.update({f"correction/{k}": v for k, v in plan.correction.items()})
    return Message(Kind.TASK, header, tensors)


def update_from(message: Message, client_id: int, global_state: State) -> ClientUpdate:
    """The ClientUpdate in `message`, or ValueError with the reason it is refused."""
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
    if type(n) is not int or n < 1 or type(steps) is not int or steps < 0:
        raise ValueError("num_examples / num_steps missing or invalid")
    numbers = [h.get("train_loss"), h.get("train_accuracy")]
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
        raise ValueError("train_loss / train_accuracy missing or invalid")
    initial = h.get("initial_loss")
    if initial is not None and not (isinstance(initial, (int, float)) and math.isfinite(initial)):
        raise ValueError("initial_loss invalid")
    return ClientUpdate(client_id, {k: v.to(global_state[k].device) for k, v in delta.items()}, n, steps,
                        float(numbers[0]), float(numbers[1]), initial)


class NetworkEngine:
    """Sends each selected client its task over the network and collects the updates.

    A round ends when every selected client has answered, or at `round_timeout`. Clients that
    are not connected, disconnect, or send an update that is refused count as not reporting;
    fewer than `min_fit_clients` updates fail the round (RoundFailed), and the round loop
    retries it with a new selection. Updates are handed on in task order, as the simulation's
    engines do, so that a run with every client alive equals the simulation.
    """

    name = "network"

    def __init__(self, hub: Hub, *, round_timeout: float, min_fit_clients: int, compression: str | None = None):
        self.hub = hub
        self.round_timeout = round_timeout
        self.min_fit_clients = min_fit_clients
        self.compression = compression
        self._task_id = 0

    def run(self, model: nn.Module, global_state: State, tasks: Sequence[ClientTask], config: ClientConfig
            ) -> Iterator[ClientUpdate]:
        # After an outage (a round retried for want of clients) wait for enough of them to be back.
        if not self.hub.wait_for_clients(self.min_fit_clients, timeout=self.round_timeout):
            raise RoundFailed(f"fewer than {self.min_fit_clients} clients connected for {self.round_timeout:.0f} s")
        self._task_id += 1
        task_id = self._task_id
        global_cpu = {k: v.detach().cpu() for k, v in global_state.items()}
        pending: set[int] = set()
        for task in tasks:
            data = encode(task_message(task_id, task, global_cpu))
            if self.hub.send(task.client_id, data):
                pending.add(task.client_id)
            else:
                log.warning("task %d: client %d is not connected; it will not report", task_id, task.client_id)
        updates: dict[int, ClientUpdate] = {}
        deadline = time.monotonic() + self.round_timeout
        while pending and (remaining := deadline - time.monotonic()) > 0:
            try:
                client_id, message, _ = self.hub.inbox.get(timeout=remaining)
            except queue.Empty:
                break
            if message is None:
                if client_id in pending:
                    log.warning("task %d: client %d disconnected mid-round; dropped from the round", task_id, client_id)
                    pending.discard(client_id)
                continue
            if message.kind == Kind.REJECT:  # a message from this client that failed to decode
                if client_id in pending:
                    pending.discard(client_id)
                continue
            if message.kind != Kind.UPDATE:
                continue
            if message.header.get("task") != task_id or client_id not in pending:
                log.warning("discarded an update from client %d for task %s (now task %d): late or not selected",
                            client_id, message.header.get("task"), task_id)
                continue
            pending.discard(client_id)
            try:
                updates[client_id] = update_from(message, client_id, global_state)
            except ValueError as e:
                log.warning("task %d: refused the update of client %d: %s", task_id, client_id, e)
        if pending:
            log.warning("task %d: no update from %s within %.0f s", task_id, sorted(pending), self.round_timeout)
        if len(updates) < self.min_fit_clients:
            raise RoundFailed(f"{len(updates)} updates arrived, the quorum is {self.min_fit_clients}")
        log.info("task %d: %d of %d updates", task_id, len(updates), len(tasks))
        return (updates[t.client_id] for t in tasks if t.client_id in updates)


def start_server(hub: Hub, address: str, *, tls: tuple[bytes, bytes] | None, max_message_bytes: int,
                 max_workers: int = 64, keepalive: float = DEFAULT_KEEPALIVE) -> tuple[grpc.Server, int]:
    """Serve `hub` at `address` ("host:port", port 0 for any); returns the server and its port."""
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers),
                         options=channel_options(max_message_bytes, keepalive))
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Session": grpc.stream_stream_rpc_method_handler(hub.session),
    })
    server.add_generic_rpc_handlers((handler,))
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        key, cert = tls
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port


def serve(
    config, *, address: str, tokens: dict[int, str], tls: tuple[bytes, bytes] | None, min_clients: int,
    min_fit_clients: int | None, round_timeout: float, max_message_bytes: int, resume: bool = False,
    progress: bool = True, on_listening=None, keepalive: float = DEFAULT_KEEPALIVE,
):
    """Run `config` with the clients that connect to `address`; returns the run's outcome.

    `min_fit_clients` (the quorum of a round) defaults to half the clients per round, rounded up.
    """
    from ..experiment import run_experiment
    from ..simulation import clients_per_round_count

    per_round = clients_per_round_count(config.clients_per_round, config.num_clients)
    if min_fit_clients is None:
        min_fit_clients = math.ceil(per_round / 2)
    if not 1 <= min_fit_clients <= per_round:
        raise ConfigError(f"min_fit_clients must be between 1 and the {per_round} clients per round, "
                          f"got {min_fit_clients}")
    if min_clients < 1:
        raise ConfigError(f"min_clients must be >= 1, got {min_clients}")
    if not keepalive >= 1:
        raise ConfigError(f"keepalive must be >= 1 second, got {keepalive}")
    settings = {k: v for k, v in config.__dict__.items() if v is not None}
    hub = Hub(tokens, welcome={"config": settings}, max_message_bytes=max_message_bytes)
    server, port = start_server(hub, address, tls=tls, max_message_bytes=max_message_bytes,
                                max_workers=max(64, 2 * config.num_clients + 16), keepalive=keepalive)
    try:
        if on_listening is not None:
            on_listening(port)
        log.info("waiting for %d clients", min_clients)
        hub.wait_for_clients(min_clients)
        engine = NetworkEngine(hub, round_timeout=round_timeout, min_fit_clients=min_fit_clients)
        return run_experiment(config, progress=progress, engine=engine, resume=resume)
    finally:
        hub.shutdown()
        server.stop(grace=2).wait()
