"""A small HTTP/1.0 server for the dashboard: one thread, every connection under one deadline.

One thread runs a `selectors` loop over non-blocking sockets, so a connection that is held open
costs a socket and a buffer, never a thread, and a real request is answered while others dribble.
Each connection gets one request and one answer, then is closed:

- DEADLINE seconds from its accept to the last byte of the answer, for everything: the TLS
  handshake, the request line and headers, and the answer's delivery. A connection that has not
  sent a complete request by then is told 408 (where it is past its TLS handshake) and closed,
  however regularly its bytes come (the deadline is not a per-read timeout).
- MAX_PER_ADDRESS connections held at once from one address (an IPv6 address's /64 counts as one),
  MAX_CONNECTIONS from all: a new one over either limit closes the oldest of that address (or of
  all), told 503. The oldest is the one that has taken longest to send a request, which a real
  client sends at once, so a client on the same address as a flood of slow connections (on
  loopback every client is 127.0.0.1) is still answered.
- a request line of at most MAX_REQUEST_LINE bytes (else 414), a head (request line and headers)
  of at most MAX_HEAD bytes and MAX_HEADERS header lines (else 431); anything malformed: 400. A
  body is never read; what comes after the head is discarded.

`handle(Request) -> Response` runs on the loop's thread: it must be quick (the dashboard's is a
snapshot of its state under a lock).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus

log = logging.getLogger("fedforge.dashboard")

DEADLINE = 10.0  # seconds from accept to the end of the answer
MAX_CONNECTIONS = 256  # held at once
MAX_PER_ADDRESS = 64  # held at once from one address (IPv6: one /64)
MAX_REQUEST_LINE = 8192  # bytes
MAX_HEAD = 16384  # bytes of the request line and headers together
MAX_HEADERS = 100  # header lines
ACCEPTS_PER_TURN = 16  # a flood of connects cannot push out a request that has arrived before it is read

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(rb"HTTP/1\.[0-9]")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent: a path and query, or an absolute URL
    headers: dict[str, str]  # lower-case names; the first of a repeated name


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/plain"})


class _Refused(Exception):
    def __init__(self, status: HTTPStatus):
        self.status = status


def parse_head(head: bytes) -> Request:
    """The request line and headers (without the blank line ending them), or _Refused."""
    lines = [line.removesuffix(b"\r") for line in head.split(b"\n")]
    if len(lines[0]) > MAX_REQUEST_LINE:
        raise _Refused(HTTPStatus.REQUEST_URI_TOO_LONG)
    if len(head) > MAX_HEAD or len(lines) - 1 > MAX_HEADERS:
        raise _Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    parts = lines[0].split(b" ")
    if (
        len(parts) != 3
        or not _TOKEN.fullmatch(parts[0])
        or not _TARGET.fullmatch(parts[1])
        or not _VERSION.fullmatch(parts[2])
    ):
        raise _Refused(HTTPStatus.BAD_REQUEST)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # folded lines included: they start with a space
            raise _Refused(HTTPStatus.BAD_REQUEST)
        headers.setdefault(name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1"))
    return Request(parts[0].decode("ascii"), parts[1].decode("ascii"), headers)


def _key(host: str) -> str:
    """What the per-address limit counts by: the address, or an IPv6 address's /64."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: str
    key: str
    accepted: float
    stage: str  # "handshake" (TLS), "request", "answer", "drain" (answered; waiting for the client to close)
    inbox: bytes = b""
    outbox: memoryview = field(default_factory=lambda: memoryview(b""))


class Server:
    """Listens on `address` (host, port; port 0: any free one), answers each request with
    `handle`, over TLS when `context` is given; `start` runs it on a daemon thread, `stop` ends it."""

    def __init__(
        self, address: tuple[str, int], handle: Callable[[Request], Response], *, context: ssl.SSLContext | None = None
    ):
        self._handle, self._context = handle, context
        listener = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
        try:  # no SO_REUSEADDR: a port in use is an error, never shared
            listener.bind(address)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self.port: int = listener.getsockname()[1]
        self._listener = listener
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._connections: dict[socket.socket, _Connection] = {}  # in order of accept: the oldest first
        self._per_key: Counter[str] = Counter()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="fedforge-dashboard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake_write.send(b"x")
        if self._thread is not None:
            self._thread.join(10)
        else:
            self._close_all()
        self._wake_write.close()

    # -- the loop --------------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while not self._stopping:
                oldest = next(iter(self._connections.values()), None)
                timeout = None if oldest is None else max(0.0, oldest.accepted + DEADLINE - time.monotonic())
                accept = False
                for key, _ in self._selector.select(timeout):
                    if key.data == "accept":
                        accept = True
                    elif key.data == "wake":
                        self._wake_read.recv(64)
                    elif key.data.sock in self._connections:  # not closed by an earlier event of this turn
                        try:
                            self._step(key.data)
                        except Exception:  # a bug here must not end the loop that serves everyone
                            log.exception("dashboard: serving %s failed", key.data.peer)
                            if key.data.sock in self._connections:
                                self._close(key.data, "failed")
                if accept:  # after the connections' own events: requests already here are read first
                    self._accept()
                self._expire()
        finally:
            self._close_all()

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors: make room
                log.debug("dashboard: accept failed: %s", e)
                if not self._connections:
                    time.sleep(0.1)
                    return
                self._close(next(iter(self._connections.values())), "closed: the server is out of sockets")
                return
            key = _key(peer[0])
            self._make_room(key)
            stage = "request"
            try:
                sock.setblocking(False)
                if self._context is not None:
                    sock = self._context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                    stage = "handshake"
            except OSError as e:  # reset already
                log.debug("dashboard: %s:%s closed at once: %s", peer[0], peer[1], e)
                sock.close()
                continue
            connection = _Connection(sock, f"{peer[0]}:{peer[1]}", key, time.monotonic(), stage)
            self._connections[sock] = connection
            self._per_key[key] += 1
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _make_room(self, key: str) -> None:
        """Close the oldest connection of `key` (or of all) if one more would pass the limits."""
        if self._per_key[key] >= MAX_PER_ADDRESS:
            oldest = next(c for c in self._connections.values() if c.key == key)
            why = f"evicted: {MAX_PER_ADDRESS} connections from its address"
        elif len(self._connections) >= MAX_CONNECTIONS:
            oldest, why = next(iter(self._connections.values())), f"evicted: {MAX_CONNECTIONS} connections"
        else:
            return
        self._close(oldest, why, HTTPStatus.SERVICE_UNAVAILABLE)

    def _expire(self) -> None:
        now = time.monotonic()
        for connection in list(self._connections.values()):
            if connection.accepted + DEADLINE > now:
                break  # the rest are younger
            self._close(connection, f"no complete request and answer within {DEADLINE:g} s", HTTPStatus.REQUEST_TIMEOUT)

    def _close_all(self) -> None:
        for connection in list(self._connections.values()):
            self._close(connection, "the server stopped")
        self._selector.close()
        self._listener.close()
        self._wake_read.close()

    # -- one connection --------------------------------------------------------------------------
    def _step(self, connection: _Connection) -> None:
        """Take `connection` as far as it can go now: handshake, request, answer, drain."""
        if connection.stage == "handshake":
            assert isinstance(connection.sock, ssl.SSLSocket), "only a TLS connection starts at the handshake"
            try:
                connection.sock.do_handshake()
            except ssl.SSLWantReadError:
                return self._want(connection, selectors.EVENT_READ)
            except ssl.SSLWantWriteError:
                return self._want(connection, selectors.EVENT_WRITE)
            except OSError as e:
                return self._close(connection, f"TLS handshake failed: {e}")
            connection.stage = "request"
            self._want(connection, selectors.EVENT_READ)
        if connection.stage == "request":
            self._read_request(connection)
        elif connection.stage == "answer":
            self._write(connection)
        elif connection.stage == "drain":
            self._drain(connection)

    def _want(self, connection: _Connection, events: int) -> None:
        if self._selector.get_key(connection.sock).events != events:
            self._selector.modify(connection.sock, events, connection)

    def _receive(self, connection: _Connection) -> bytes | None:
        """What is there to read (b"" if nothing yet), or None once the client has closed or failed."""
        chunks: list[bytes] = []
        while True:
            try:
                data = connection.sock.recv(8192)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return b"".join(chunks)
            except OSError:
                return None
            if not data:
                return None
            chunks.append(data)
            if sum(map(len, chunks)) > MAX_HEAD:  # enough to decide; the rest waits for the next turn
                return b"".join(chunks)

    def _read_request(self, connection: _Connection) -> None:
        data = self._receive(connection)
        if data is None:
            return self._close(connection, "closed by the client before a complete request")
        connection.inbox += data
        end = _END_OF_HEAD.search(connection.inbox)
        if end is None:
            first_line = connection.inbox.partition(b"\n")[0]
            if len(first_line) > MAX_REQUEST_LINE:
                return self._answer(connection, _status(HTTPStatus.REQUEST_URI_TOO_LONG))
            if len(connection.inbox) > MAX_HEAD:
                return self._answer(connection, _status(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE))
            return
        try:
            request = parse_head(connection.inbox[: end.start()])
        except _Refused as e:
            return self._answer(connection, _status(e.status))
        self._answer(connection, self._handle(request), head_only=request.method == "HEAD")

    def _answer(self, connection: _Connection, response: Response, *, head_only: bool = False) -> None:
        connection.inbox = b""
        connection.outbox = memoryview(_encode(response, head_only=head_only))
        connection.stage = "answer"
        self._write(connection)

    def _write(self, connection: _Connection) -> None:
        while connection.outbox:
            try:
                sent = connection.sock.send(connection.outbox)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                return self._want(connection, selectors.EVENT_WRITE)
            except ssl.SSLWantReadError:
                return self._want(connection, selectors.EVENT_READ)
            except OSError:
                return self._close(connection, "closed by the client during the answer")
            connection.outbox = connection.outbox[sent:]
        # Answered: end our side and read until the client closes (closing with its bytes unread would
        # reset the connection, which may destroy the answer before the client reads it).
        try:
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self._close(connection, "answered")
        connection.stage = "drain"
        self._want(connection, selectors.EVENT_READ)
        self._drain(connection)

    def _drain(self, connection: _Connection) -> None:
        if self._receive(connection) is None:
            self._close(connection, "answered")

    def _close(self, connection: _Connection, why: str, status: HTTPStatus | None = None) -> None:
        """Close `connection`; tell it `status` first where it waits for an answer (best effort: never blocks)."""
        if status is not None and connection.stage == "request":
            with contextlib.suppress(OSError):
                connection.sock.send(_encode(_status(status)))
        log.debug("dashboard: %s %s", connection.peer, why)
        self._selector.unregister(connection.sock)
        connection.sock.close()
        del self._connections[connection.sock]
        self._per_key[connection.key] -= 1
        if not self._per_key[connection.key]:
            del self._per_key[connection.key]


def _encode(response: Response, *, head_only: bool = False) -> bytes:
    status = HTTPStatus(response.status)
    headers = {
        "Server": "fedforge",
        "Date": formatdate(usegmt=True),
        "Connection": "close",
        **response.headers,
        "Content-Length": str(len(response.body)),
    }
    head = f"HTTP/1.0 {status.value} {status.phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode("latin-1") + (b"" if head_only else response.body)


def _status(status: HTTPStatus) -> Response:
    return Response(
        status.value,
        f"{status.value} {status.phrase}\n".encode(),
        {"Content-Type": "text/plain", "X-Content-Type-Options": "nosniff"},
    )


__all__ = [
    "DEADLINE",
    "MAX_CONNECTIONS",
    "MAX_HEAD",
    "MAX_HEADERS",
    "MAX_PER_ADDRESS",
    "MAX_REQUEST_LINE",
    "Request",
    "Response",
    "Server",
    "parse_head",
]
