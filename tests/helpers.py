"""Helpers shared by the tests: a small learnable problem, a real HTTP server, and waits on events."""

from __future__ import annotations

import dataclasses
import http.server
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from fedforge.data import TensorData

T = TypeVar("T")

# Waits in the tests follow events (a process's exit, a line in a log, a file) and return as soon as
# the event happens; a bound only says when to call the event lost. The bounds are several times what
# an idle 2-core machine needs, so that on a loaded one a slow test is slow, not failed;
# FEDFORGE_TEST_TIMEOUT_SCALE multiplies every one of them for a machine slower still.
_scale = os.environ.get("FEDFORGE_TEST_TIMEOUT_SCALE", "1")
try:
    TIMEOUT_SCALE = float(_scale)
except ValueError:
    TIMEOUT_SCALE = float("nan")
if not TIMEOUT_SCALE > 0:  # also refuses nan
    raise pytest.UsageError(f"FEDFORGE_TEST_TIMEOUT_SCALE must be a number > 0, got {_scale!r}")

# A process's run (a server's few rounds, a client, an example script), or a line it logs. Beside two
# busy loops and six other test runs on 2 cores a server once logged nothing in 300 s (its test alone: 25 s).
PROCESS_S = 600


def bound(seconds: float) -> float:
    """A wait's bound in seconds: `seconds` on this machine, times FEDFORGE_TEST_TIMEOUT_SCALE."""
    return seconds * TIMEOUT_SCALE


def tail(path: Path, lines: int = 80) -> str:
    """The last `lines` lines of a log, for a failure's message."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"({path}: {e.strerror})"
    kept = text.splitlines()[-lines:]
    return f"--- last {len(kept)} lines of {path} ---\n" + "\n".join(kept)


def wait_for(
    predicate: Callable[[], T], timeout: float, what: str, log: Path | None = None, interval: float = 0.05
) -> T:
    """Poll `predicate` until it returns something true, and return that; past `bound(timeout)`
    seconds fail saying what was awaited (and the tail of `log`)."""
    limit = bound(timeout)
    deadline = time.monotonic() + limit
    while True:
        if value := predicate():
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {limit:g} s for {what}" + (f"\n{tail(log)}" if log else ""))
        time.sleep(interval)


def wait_for_line(
    path: Path, pattern: str, timeout: float = PROCESS_S, proc: subprocess.Popen | None = None
) -> re.Match:
    """The first match of `pattern` in the log at `path`, once it is written. Fails at once if
    `proc` (the process writing the log) exits without having written it."""
    path = Path(path)

    def text():
        return path.read_text(errors="replace") if path.exists() else ""

    def found():
        if match := re.search(pattern, text()):
            return match
        if proc is not None and proc.poll() is not None and not re.search(pattern, text()):  # read after the exit
            raise AssertionError(
                f"{path.name}: the process exited ({proc.returncode}) before it logged {pattern!r}\n{tail(path)}"
            )
        return None

    return wait_for(found, timeout, f"{pattern!r} in {path.name}", path)


def wait_exit(proc: subprocess.Popen, timeout: float = PROCESS_S, log: Path | None = None) -> int:
    """The exit status of `proc`; past `bound(timeout)` seconds fail with the tail of its `log`."""
    limit = bound(timeout)
    try:
        return proc.wait(limit)
    except subprocess.TimeoutExpired:
        name = log.name if log else " ".join(map(str, proc.args))[:200]
        raise AssertionError(
            f"waited {limit:g} s for {name} to exit; it still runs" + (f"\n{tail(log)}" if log else "")
        ) from None


@dataclasses.dataclass
class Served:
    body: bytes
    # Advertise this Content-Length but send only `body` and close: a truncated transfer.
    claimed_length: int | None = None


class FileServer:
    """A real HTTP server on 127.0.0.1 serving byte strings by path."""

    def __init__(self):
        self.files: dict[str, Served] = {}
        self.requests: list[str] = []
        files, requests = self.files, self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                served = files.get(self.path)
                if served is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(served.claimed_length or len(served.body)))
                self.end_headers()
                self.wfile.write(served.body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def blobs(num_examples: int, num_classes: int = 4, dim: int = 8, seed: int = 0) -> TensorData:
    """A small, learnable classification problem: Gaussian blobs around fixed class centres.

    `seed` draws the examples; the centres are the same for every seed, so blobs(seed=1)
    and blobs(seed=2) are a train and a test set of one problem.
    """
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(12345)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (num_examples,), generator=g)
    x = centres[y] + torch.randn(num_examples, dim, generator=g)
    return TensorData(x, y)


def assert_same_run(a, b):
    """Two simulations of one experiment (on two engines) agree: same clients, weights up to
    float round-off, the same training accuracy and loss per round."""
    assert a.history.column("clients") == b.history.column("clients")
    for name, value in a.state.params.items():
        torch.testing.assert_close(b.state.params[name], value)
    for x, y in zip(a.history.records[1:], b.history.records[1:], strict=True):
        assert x.train_accuracy == y.train_accuracy
        assert x.train_loss == pytest.approx(y.train_loss, rel=1e-5)
