"""A scripted server for the client-side tests: it speaks the hub's METHOD and wire format on
127.0.0.1 and sends each session the messages it is given, so a test can put a real
`fedforge client` process in front of a hostile or broken server.

A script is a list of Message, raw bytes, or functions of no arguments (called in turn: a wait
for an event, such as a line in the client's log). After sending a TASK or an EVALUATE the server waits (up to
`reply_timeout` s) for the client's answer and records it in `replies`; a script that does not
end with a SHUTDOWN leaves the stream open until the client closes it.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures

import grpc

from fedforge.network.hub import DEFAULT_KEEPALIVE, SERVICE, server_options
from fedforge.network.wire import Kind, Message, decode, encode


class FakeServer:
    def __init__(self, script: list[Message | bytes], *, reply_timeout: float = 120.0):
        self.script = script
        self.reply_timeout = reply_timeout
        self.replies: list[Message] = []
        self.sessions = 0
        self.closed = threading.Event()
        self._stopped = threading.Event()  # set on exit: every handler returns, so no worker outlives the test
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), options=server_options(256 << 20, DEFAULT_KEEPALIVE)
        )
        handler = grpc.stream_stream_rpc_method_handler(self._session)  # raw bytes both ways
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Session": handler})])
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def _session(self, requests, context):
        self.sessions += 1
        incoming: queue.Queue = queue.Queue()

        def read():
            try:
                for raw in requests:
                    incoming.put(raw)
            except grpc.RpcError:  # the client went away
                pass
            incoming.put(None)

        def get(timeout: float):
            """The client's next message (None: it closed the stream, or the server stopped)."""
            deadline = time.monotonic() + timeout
            while not self._stopped.is_set():
                try:
                    return incoming.get(timeout=min(0.2, max(deadline - time.monotonic(), 0.001)))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        raise
            return None

        threading.Thread(target=read, daemon=True).start()
        for item in self.script:
            if callable(item):
                item()
                continue
            yield item if isinstance(item, bytes) else encode(item)
            if isinstance(item, Message) and item.kind in (Kind.TASK, Kind.EVALUATE):
                try:
                    raw = get(self.reply_timeout)
                except queue.Empty:
                    continue
                if raw is None:
                    break
                self.replies.append(decode(raw))
        while get(float("inf")) is not None:  # until the client closes the stream (or the server stops)
            pass
        self.closed.set()

    def __enter__(self) -> FakeServer:
        self._server.start()
        return self

    def __exit__(self, *exc):
        self._stopped.set()
        self._server.stop(grace=None).wait(10)
