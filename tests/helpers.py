"""Helpers shared by the tests: a small learnable problem, and a real HTTP server."""

from __future__ import annotations

import dataclasses
import http.server
import threading

import pytest
import torch

from fedforge.data import TensorData

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
    for x, y in zip(a.history.records[1:], b.history.records[1:]):
        assert x.train_accuracy == y.train_accuracy
        assert x.train_loss == pytest.approx(y.train_loss, rel=1e-5)
