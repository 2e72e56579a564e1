"""A TCP relay on 127.0.0.1 that a test can cut, to break connections as a network does."""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    """Relays connections from its own port to `target_port`.

    `cut()` breaks every connection relayed so far: both ends close (a dropped connection), or
    with `server_side=False` only the client's end does while the server's stays open and
    silent (a half-open connection: the server cannot tell it from a quiet client).
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.half_open: list[socket.socket] = []  # server ends kept open by cut(server_side=False)
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.pairs.append((near, far))
            threading.Thread(target=self._pump, args=(near, far), daemon=True).start()
            threading.Thread(target=self._pump, args=(far, near), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def cut(self, *, server_side: bool = True) -> int:
        """Break the connections relayed so far; returns how many."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for near, far in pairs:
            _close(near)
            if server_side:
                _close(far)
            else:
                self.half_open.append(far)  # open, and nothing reads or writes it any more
        return len(pairs)

    def close(self) -> None:
        self.listener.close()
        self.cut()
        for far in self.half_open:
            far.close()


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the other end closed it already
        s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv
    s.close()
