"""The server's end of the connections: one authenticated gRPC session per client.

gRPC's asyncio server runs on a thread of its own, so a session costs a coroutine, not a thread:
idle or hostile connections cannot use up a pool that enrolled clients need. A client proves who
it is in the call's metadata (its id and secret, at most MAX_METADATA_BYTES, a limit gRPC applies
before any handler runs), so the server reads no message from a caller it has not authenticated
and answers every failure the same way ("authentication failed"; the log says which). An address
with too many wrong secrets is refused without a check for a while (AddressGuard); its enrolled
clients are told to retry later.

A new session of an enrolled client replaces its old one: the secret proves it is the same
client, and the old connection may be half-open (broken on the client's side only). A session
may only send what it was asked for: one message per task sent to it; anything more closes it,
so an enrolled client cannot make the server buffer more than one update per task.

The round loop talks to the hub from its own thread: `send` to a client, `events` (an ordinary
queue of Event) from them. Each Event names its Session, so the round loop can tell an old
session's news from the current one's.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from .auth import verify
from .wire import Kind, Message, encode

log = logging.getLogger("fedforge.server")

SERVICE = "fedforge.Federation"
METHOD = f"/{SERVICE}/Session"
CLIENT_ID_KEY = "fedforge-client-id"
SECRET_KEY = "fedforge-secret"
MAX_METADATA_BYTES = 8 << 10
DEFAULT_KEEPALIVE = 20.0  # seconds
AUTH_FAILED = "authentication failed"


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
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.keepalive_time_ms", int(keepalive * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive * 500)),
        ("grpc.http2.ping_timeout_ms", int(keepalive * 500)),  # gRPC >= 1.6x: the ack deadline of every ping
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ]


def server_options(max_message_bytes: int, keepalive: float) -> list[tuple[str, int]]:
    return [
        *channel_options(max_message_bytes, keepalive),
        ("grpc.max_concurrent_streams", 4),  # a client needs one; a few more cover a reconnect's overlap
        ("grpc.server_handshake_timeout_ms", 20_000),  # a connection that never finishes its handshake
        ("grpc.max_connection_idle_ms", 60_000),  # one that never opens a stream (a client's stays open)
    ]


def reject(reason: str, *, retry: bool = False) -> Message:
    """A refusal; `retry` tells the client that trying again later may pass."""
    return Message(Kind.REJECT, {"reason": reason, "retry": retry})


class AddressGuard:
    """Failed authentications per address: past `limit` of them within `window` seconds, the
    address is refused without a check until they age out. Remembers `max_addresses` at most."""

    def __init__(self, limit: int = 10, window: float = 60.0, max_addresses: int = 10_000, clock=time.monotonic):
        self.limit, self.window, self.max_addresses, self.clock = limit, window, max_addresses, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, host: str) -> deque[float]:
        times = self._failures.get(host, deque())
        while times and times[0] < self.clock() - self.window:
            times.popleft()
        return times

    def blocked(self, host: str) -> bool:
        return len(self._recent(host)) >= self.limit

    def failed(self, host: str) -> None:
        times = self._recent(host)
        times.append(self.clock())
        self._failures[host] = times
        self._failures.move_to_end(host)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)


def _host(peer: str) -> str:
    """The address of a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000") without its port."""
    return peer.rpartition(":")[0] or peer


@dataclass(eq=False)
class Session:
    """One authenticated stream of one client."""

    client_id: int
    peer: str
    outbox: asyncio.Queue = field(repr=False)
    owed: int = 0  # messages the client may send: tasks sent to this session and not yet answered
    open: bool = True
    connected_at: float = field(default_factory=time.time)  # wall-clock seconds, for the dashboard
    last_seen: float = field(default_factory=time.time)  # its last message, or connected_at


class EventKind(enum.Enum):
    CONNECTED = "connected"
    MESSAGE = "message"
    CLOSED = "closed"


@dataclass(frozen=True)
class Event:
    session: Session
    kind: EventKind
    data: bytes | None = None  # a MESSAGE's bytes, not yet decoded


class Hub:
    """Connected clients: authenticates sessions, carries messages both ways."""

    def __init__(
        self,
        tokens: dict[int, str],
        *,
        welcome: dict,
        max_message_bytes: int,
        keepalive: float = DEFAULT_KEEPALIVE,
        guard: AddressGuard | None = None,
    ):
        self.tokens = tokens
        self.welcome = welcome
        self.max_message_bytes = max_message_bytes
        self.keepalive = keepalive
        self.guard = guard or AddressGuard()
        self.changed = threading.Condition()
        self.sessions: dict[int, Session] = {}
        self.events: queue.Queue[Event] = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fedforge-hub", daemon=True)
        self._server: grpc.aio.Server | None = None

    # -- life cycle (called from the round loop's thread) -----------------------------------
    def start(self, address: str, tls: tuple[bytes, bytes] | None) -> int:
        """Listen at `address` ("host:port", port 0 for any); returns the port."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(address, tls), self._loop).result()

    async def _start(self, address: str, tls: tuple[bytes, bytes] | None) -> int:
        self._server = grpc.aio.server(options=server_options(self.max_message_bytes, self.keepalive))
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Session": grpc.stream_stream_rpc_method_handler(self._session),
                    },
                ),
            )
        )
        if tls is None:
            port = self._server.add_insecure_port(address)
        else:
            port = self._server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        await self._server.start()
        return port

    def stop(self, final: Message | Callable[[int], Message], grace: float = 2.0) -> None:
        """Send every session `final` (the run's end; or `final(client_id)`, each client its own),
        give them `grace` seconds to take it, stop."""
        if not self._thread.is_alive():
            return

        async def finish():
            for session in list(self.sessions.values()):
                session.outbox.put_nowait(encode(final(session.client_id) if callable(final) else final))
                session.outbox.put_nowait(None)
            if self._server is not None:
                await self._server.stop(grace)

        try:
            asyncio.run_coroutine_threadsafe(finish(), self._loop).result(grace + 10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # -- used by the round loop -------------------------------------------------------------
    def wait_for_clients(self, count: int, timeout: float | None = None) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.sessions) >= count, timeout)

    def current(self, client_id: int) -> Session | None:
        with self.changed:
            return self.sessions.get(client_id)

    def clients(self) -> list[Session]:
        """The connected clients' sessions, by client id (a copy: the dashboard reads it from its own thread)."""
        with self.changed:
            return [self.sessions[c] for c in sorted(self.sessions)]

    def send(self, session: Session, data: bytes, *, expect_answer: bool = True) -> bool:
        """Queue `data` for `session`; False when that session is closed."""
        with self.changed:
            if not session.open:
                return False
            session.owed += expect_answer
        self._loop.call_soon_threadsafe(session.outbox.put_nowait, data)
        return True

    # -- the gRPC handler (on the hub's event loop) -----------------------------------------
    async def _session(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        peer = context.peer()
        host = _host(peer)
        if self.guard.blocked(host):
            log.warning("refused %s: too many failed authentications from this address", peer)
            await context.write(encode(reject("too many failed attempts from this address; try later", retry=True)))
            return
        client_id, reason = self._authenticate(dict(context.invocation_metadata() or ()))
        if reason is not None:
            if client_id >= 0:  # a guess: credentials were given, and they are wrong
                self.guard.failed(host)
            log.warning("refused %s: %s", peer, reason)
            await context.write(encode(reject(AUTH_FAILED)))
            return
        session = Session(client_id, peer, asyncio.Queue())
        self._open(session)
        reader = asyncio.create_task(self._read(session, context))
        try:
            await context.write(encode(Message(Kind.WELCOME, self.welcome)))
            while (item := await session.outbox.get()) is not None:
                await context.write(item)
        finally:
            reader.cancel()
            self._close(session)

    def _authenticate(self, metadata: dict) -> tuple[int, str | None]:
        text, secret = metadata.get(CLIENT_ID_KEY), metadata.get(SECRET_KEY)
        if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 18:
            return -1, "no client id in the call's metadata"
        if not isinstance(secret, str):
            return -1, "no secret in the call's metadata"
        client_id = int(text)
        return client_id, verify(self.tokens, client_id, secret)

    def _open(self, session: Session) -> None:
        with self.changed:
            old = self.sessions.get(session.client_id)
            self.sessions[session.client_id] = session
            # Before the old session's CLOSED: the round loop hands a task on to the new session.
            self.events.put(Event(session, EventKind.CONNECTED))
            self.changed.notify_all()
        if old is not None:
            log.info(
                "client %d: a new session from %s replaces the one from %s", session.client_id, session.peer, old.peer
            )
            old.outbox.put_nowait(encode(reject(f"replaced by a newer session of client {session.client_id}")))
            old.outbox.put_nowait(None)
        else:
            log.info("client %d connected from %s (%d connected)", session.client_id, session.peer, len(self.sessions))

    def _close(self, session: Session) -> None:
        with self.changed:
            if not session.open:
                return
            session.open = False
            if self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
                log.info("client %d disconnected (%d connected)", session.client_id, len(self.sessions))
            self.changed.notify_all()
        self.events.put(Event(session, EventKind.CLOSED))

    async def _read(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        try:
            # grpc-stubs 1.53 leave out grpc.aio.EOF (what read() gives at the stream's end)
            while (raw := await context.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                with self.changed:
                    asked = session.owed > 0
                    session.owed -= asked
                    session.last_seen = time.time()
                if not asked:
                    log.warning(
                        "client %d sent a message it was not asked for; its session is closed", session.client_id
                    )
                    break
                self.events.put(Event(session, EventKind.MESSAGE, raw))
        except grpc.RpcError:
            pass
        finally:
            session.outbox.put_nowait(None)
