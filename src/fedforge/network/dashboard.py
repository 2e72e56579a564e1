"""The deployment server's live dashboard: one read-only page, served by the server process itself.

`fedforge server --dashboard PORT` serves, with the standard library only (httpd.py: one thread, a
`selectors` loop), two things and nothing else (any other path or method: 404):

    GET /            the page (static/dashboard.html, with dashboard.css and dashboard.js put
                     inline: it loads nothing else, so it works offline), which fetches /api/state
                     every second and redraws without reloading
    GET /api/state   the state as JSON (`DashboardState.snapshot`)

The state is fed by the server as the run goes: the connected clients from the hub (id, address,
connected since, last message), the current round from the network engine (a RoundWatcher: the
clients it was sent to, the updates that arrived, those refused and why), each completed round's
record from the round loop (through the tracker interface run_experiment already has) and the
warnings of the "fedforge.server" and "fedforge.privacy" loggers (refusals, disconnections, updates
clipped for passing what an honest client's stays within). It holds names, counts,
times and a few numbers per round: never a secret, a token or a tensor.

Binding: 127.0.0.1 (plain HTTP) unless told otherwise; an address that is not loopback only with
HTTPS (the server's own certificate and key) and a token, which every request must carry (`Authorization:
Bearer TOKEN`, or `?token=TOKEN`, which the page passes on to its requests); a request without it
gets 401 and no detail. Slow or idle connections cannot lock it (httpd.py has the details): each
connection gets one request and is closed 10 s after its accept at the latest, TLS handshake
included (408 if its request is not complete by then, however steadily its bytes come); at most
64 are held from one address and 256 in all, a new one over either limit closing the oldest (503),
so a real request is answered even from the address of a flood (on loopback, every client's); a
request line is at most 8 KiB (414), the head 16 KiB and 100 header lines (431); bodies are never read.

`report_page(run_dir)`: the same page for a finished run, its history embedded, nothing fetched.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..engines.base import RoundWatcher
from ..errors import ConfigError
from ..history import History, RoundRecord
from .httpd import Request, Response, Server

log = logging.getLogger("fedforge.dashboard")
TAPPED = ("fedforge.server", "fedforge.privacy")  # the loggers whose warnings the page shows

MAX_LOG_LINES = 200  # warnings kept for the page
MAX_LINE = 500  # characters of one


@dataclass(frozen=True)
class DashboardSettings:
    """Where the dashboard listens (`port` 0: any free port) and the token its requests must carry."""

    port: int
    address: str = "127.0.0.1"
    token: str | None = None

    def check(self, tls: tuple[bytes, bytes] | None) -> None:
        """ConfigError unless these settings are safe: off loopback only with TLS and a token."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--dashboard must be a port between 0 and 65535, got {self.port}")
        if self.token is not None and not (
            len(self.token) >= 16 and self.token.isascii() and self.token.isprintable() and " " not in self.token
        ):
            raise ConfigError("the dashboard token must be at least 16 printable ASCII characters without spaces")
        if not _loopback(self.address) and (tls is None or self.token is None):
            raise ConfigError(
                f"the dashboard may listen on {self.address}, which is not a loopback address, only "
                f"with TLS (--tls-cert and --tls-key) and a token (--dashboard-token-file)"
            )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _number(value) -> float | None:
    """`value` as a finite float, or None (JSON has no NaN)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def round_row(record: RoundRecord, metric: str) -> dict:
    """What the page shows of a round: the task's test metric, its personalized evaluation (the
    clients' own models: their example-weighted mean, p10 and p90; None in a round without one),
    the test loss, epsilon, counts."""
    own = f"personalized_{metric}"
    return {
        "round": record.round,
        "metric": _number(record.metric(f"test_{metric}")),
        "personalized": _number(record.metrics.get(own)),
        "personalized_p10": _number(record.metrics.get(f"{own}_p10")),
        "personalized_p90": _number(record.metrics.get(f"{own}_p90")),
        "loss": _number(record.test_loss),
        "epsilon": _number(record.metrics.get("epsilon")),
        "clients": len(record.clients),
        "dropped": len(record.dropped),
        "seconds": _number(record.seconds),
    }


def _address(peer: str) -> str:
    """A gRPC peer ("ipv4:127.0.0.1:5000") as an address ("127.0.0.1:5000")."""
    kind, _, rest = peer.partition(":")
    return rest if kind in ("ipv4", "ipv6") and rest else peer


class DashboardState(RoundWatcher):
    """What the page shows, fed from the round loop, the hub and the log, read by the HTTP threads.

    It is the network engine's RoundWatcher (`task`, `arrived`, `refused`); `record` takes each
    completed round, `finished` the run's end; `clients` is called for the connected clients."""

    def __init__(self, clients: Callable[[], Sequence] = list):
        self.clients = clients  # -> sessions with client_id, peer, connected_at, last_seen
        self._lock = threading.Lock()
        self._run: dict = {}
        self._metric = "accuracy"
        self._status = "waiting for clients"
        self._task: dict | None = None
        self._rounds: list[dict] = []
        self._log: deque[dict] = deque(maxlen=MAX_LOG_LINES)

    # -- the run ---------------------------------------------------------------------------------
    def started(self, config) -> None:
        """The run `config` (resolved and named) begins."""
        metric = config.client_config().task.primary
        with self._lock:
            self._metric = metric
            self._run = {
                "name": config.name,
                "dataset": config.dataset,
                "model": config.model,
                "strategy": config.strategy,
                "rounds": config.rounds,
                "num_clients": config.num_clients,
                "metric": metric,
            }

    def record(self, record: RoundRecord) -> None:
        with self._lock:
            self._rounds = [r for r in self._rounds if r["round"] < record.round]  # a resumed run's rounds
            self._rounds.append(round_row(record, self._metric))
            if self._task is not None and self._task["round"] == record.round:
                self._task["done"] = True

    def finished(self, error: BaseException | None) -> None:
        with self._lock:
            self._status = "finished" if error is None else "failed"

    # -- RoundWatcher ----------------------------------------------------------------------------
    def task(self, task_id: int, client_ids: Sequence[int]) -> None:
        with self._lock:
            last = self._rounds[-1]["round"] if self._rounds else 0
            self._status = "training"
            self._task = {
                "id": task_id,
                "round": last + 1,
                "expected": sorted(client_ids),
                "arrived": [],
                "refused": [],
                "done": False,
            }

    def arrived(self, task_id: int, client_id: int) -> None:
        with self._lock:
            if self._task is not None and self._task["id"] == task_id:
                self._task["arrived"].append(client_id)

    def refused(self, task_id: int, client_id: int, reason: str) -> None:
        with self._lock:
            if self._task is not None and self._task["id"] == task_id:
                self._task["refused"].append({"client": client_id, "reason": reason[:MAX_LINE]})

    # -- the log ---------------------------------------------------------------------------------
    def warned(self, when: float, message: str) -> None:
        with self._lock:
            self._log.append({"time": when, "message": message[:MAX_LINE]})

    def snapshot(self) -> dict:
        """The state as JSON-ready values: names, numbers, times (seconds since the epoch)."""
        clients = [
            {"id": s.client_id, "address": _address(s.peer), "connected_at": s.connected_at, "last_seen": s.last_seen}
            for s in self.clients()
        ]  # outside the lock: the hub has its own
        with self._lock:
            task = (
                None
                if self._task is None
                else {**self._task, "arrived": list(self._task["arrived"]), "refused": list(self._task["refused"])}
            )
            return {
                "static": False,
                "now": time.time(),
                "status": self._status,
                "run": dict(self._run),
                "clients": clients,
                "task": task,
                "rounds": list(self._rounds),
                "log": list(self._log),
            }


class _LogTap(logging.Handler):
    """The server logger's warnings, into the state's log."""

    def __init__(self, state: DashboardState):
        super().__init__(logging.WARNING)
        self.state = state

    def emit(self, record: logging.LogRecord) -> None:
        self.state.warned(record.created, record.getMessage())


class _RoundTracker:
    """The round loop's records, through run_experiment's tracker interface (prepare, start, round, finish)."""

    def __init__(self, state: DashboardState):
        self.state = state

    def prepare(self) -> None:
        pass

    def start(self, config, run_dir: Path) -> _RoundTracker:
        return self

    def round(self, record: RoundRecord, clients) -> None:
        self.state.record(record)

    def finish(self, error: BaseException | None) -> None:
        self.state.finished(error)


class Dashboard:
    """The live dashboard of one server: `start` it once the hub listens, `stop` it at the end."""

    def __init__(self, settings: DashboardSettings, *, tls: tuple[bytes, bytes] | None):
        settings.check(tls)
        self.settings = settings
        self.state = DashboardState()
        self.tracker = _RoundTracker(self.state)
        # check() allows no TLS on loopback only
        self._context = None if tls is None or _loopback(settings.address) else _tls_context(*tls)
        self._tap = _LogTap(self.state)
        self._server: Server | None = None

    def start(self, config, clients: Callable[[], Sequence], *, history: Path | None = None) -> str:
        """Listen for the run `config` (resolved and named), with `clients` giving the connected
        sessions and `history` (a resumed run's history.json) its rounds so far; returns the page's URL."""
        self.state.clients = clients
        self.state.started(config)
        if history is not None and history.exists():
            for record in History.from_json(history.read_text()).records:
                self.state.record(record)
        host, token = self.settings.address, self.settings.token
        try:
            self._server = Server(
                (host, self.settings.port), lambda request: _answer(self.state, token, request), context=self._context
            )
        except OSError as e:
            raise ConfigError(f"cannot serve the dashboard on {host}:{self.settings.port}: {e.strerror or e}") from None
        for name in TAPPED:
            logging.getLogger(name).addHandler(self._tap)
        self._server.start()
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self._context else 'http'}://{shown}:{self._server.port}/"

    def stop(self) -> None:
        for name in TAPPED:
            logging.getLogger(name).removeHandler(self._tap)
        if self._server is not None:
            self._server.stop()
            self._server = None


def _tls_context(key: bytes, cert: bytes) -> ssl.SSLContext:
    """A server context with the gRPC server's own key and certificate (PEM bytes)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads files only: a private folder (0700), removed at once.
    with tempfile.TemporaryDirectory(prefix="fedforge-dashboard-") as folder:
        path = os.path.join(folder, "server.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(cert.rstrip() + b"\n" + key)
        try:
            context.load_cert_chain(path)
        except ssl.SSLError as e:
            raise ConfigError(f"the dashboard cannot use the TLS certificate and key: {e.reason or e}") from None
    return context


def _answer(state: DashboardState, token: str | None, request: Request) -> Response:
    """The answer to one request (on the server's loop thread): the page, the state, 401 or 404."""
    url = urlsplit(request.target)
    if not _authorized(token, request.headers.get("authorization", ""), url.query):
        return _response(401, b"", "text/plain", {"WWW-Authenticate": "Bearer"})
    if request.method == "GET" and url.path == "/":
        return _response(200, PAGE.encode(), "text/html; charset=utf-8", {"Content-Security-Policy": CSP})
    if request.method == "GET" and url.path == "/api/state":
        return _response(200, json.dumps(state.snapshot(), allow_nan=False).encode(), "application/json")
    return _response(404, b"not found\n", "text/plain")  # any other path or method


def _authorized(token: str | None, authorization: str, query: str) -> bool:
    if token is None:
        return True
    given = authorization[len("Bearer ") :] if authorization.startswith("Bearer ") else None
    if given is None:
        given = (parse_qs(query).get("token") or [""])[0]
    return hmac.compare_digest(given.encode(), token.encode())


def _response(status: int, body: bytes, content_type: str, headers: dict | None = None) -> Response:
    return Response(
        status,
        body,
        {
            "Content-Type": content_type,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            **(headers or {}),
        },
    )


# -- the page ------------------------------------------------------------------------------------
# static/dashboard.html, .css and .js are the page; its stylesheet and script are put inline (one
# response, and a report is one file that works offline), allowed by their hashes in the CSP.


def _static(name: str) -> str:
    return (resources.files(__package__) / "static" / name).read_text(encoding="utf-8")


_STYLE = _static("dashboard.css")
_SCRIPT = _static("dashboard.js")
_HTML = _static("dashboard.html")
_LINKED = {
    "style": '<link rel="stylesheet" href="dashboard.css">',
    "script": '<script src="dashboard.js"></script>',
    "data": '<script type="application/json" id="data">null</script>',
}


def _page(data: str) -> str:
    """The page with its style and script inline and `data` (JSON, see `embed`) as its state."""
    return (
        _HTML.replace(_LINKED["style"], f"<style>{_STYLE}</style>")
        .replace(_LINKED["script"], f"<script>{_SCRIPT}</script>")
        .replace(_LINKED["data"], f'<script type="application/json" id="data">{data}</script>')
    )


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE = _page("null")  # the live page: no state inside, it fetches api/state
# Only this page's own script and style run; it talks to its own origin only.
CSP = (
    f"default-src 'none'; script-src {_sha256(_SCRIPT)}; style-src {_sha256(_STYLE)}; connect-src 'self'; "
    f"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def embed(state: dict) -> str:
    """`state` as JSON safe inside a <script> element (no "<", ">" or "&" to end it early)."""
    text = json.dumps(state, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def report_page(run_dir: str | os.PathLike) -> str:
    """The dashboard of the finished (or stopped) run in `run_dir`, from its history.json and
    config.toml, as one static HTML file: its rounds embedded, nothing fetched."""
    from ..config import Config

    run_dir = Path(run_dir)
    try:
        history = History.from_json((run_dir / "history.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} holds no history.json: not a run's folder, or no round completed") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{run_dir / 'history.json'} cannot be read ({type(e).__name__})") from None
    state = DashboardState()
    if (run_dir / "config.toml").exists():
        state.started(Config.load(run_dir / "config.toml").replace(name=run_dir.name))
    for record in history.records:
        state.record(record)
    snapshot = state.snapshot()
    rounds = snapshot["run"].get("rounds")
    status = "finished" if rounds == history.final.round else f"{history.final.round} of {rounds} rounds recorded"
    snapshot.update(static=True, status=status, now=time.time())
    return _page(embed(snapshot))


__all__ = ["Dashboard", "DashboardSettings", "DashboardState", "report_page", "round_row"]
