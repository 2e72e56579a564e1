"""The deployment server's live dashboard: one read-only page, served by the server process itself.

`fedforge server --dashboard PORT` serves, with the standard library only (httpd.py: one thread, a
`selectors` loop), two things and nothing else (any other path or method: 404):

    GET /            the page: HTML, CSS and JavaScript inline (it loads nothing else, so it works
                     offline), which fetches /api/state every second and redraws without reloading
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
    """What the page shows of a round: the task's test metric, the test loss, epsilon, counts."""
    return {
        "round": record.round,
        "metric": _number(record.metric(f"test_{metric}")),
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

_STYLE = """
:root{--fg:#1d2430;--muted:#667085;--line:#e4e7ec;--bg:#f6f7f9;--card:#fff;--accent:#2563eb;--loss:#d9480f;
--ok:#15803d;--bad:#b42318;--wait:#a16207}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;align-items:baseline;gap:16px;padding:14px 24px;background:#111827;color:#fff}
header h1{font-size:18px;margin:0}
header .sub{color:#cbd5e1}
#status{margin-left:auto;font-weight:600}
main{padding:16px 24px;display:grid;gap:16px}
.cards{display:grid;grid-template-columns:repeat(5,1fr);gap:12px}
.card,.panel{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 14px}
.card .label{color:var(--muted);font-size:12px;letter-spacing:.02em}
.card .value{font-size:24px;font-weight:600;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}
h2{font-size:14px;margin:0 0 8px}
table{width:100%;border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line)}
th{color:var(--muted);font-weight:500}
.chips{list-style:none;padding:0;margin:8px 0 0;display:flex;flex-wrap:wrap;gap:6px}
.chips li{padding:2px 8px;border-radius:12px;border:1px solid var(--line)}
.chips li[data-status=arrived]{color:var(--ok);border-color:var(--ok)}
.chips li[data-status=refused]{color:var(--bad);border-color:var(--bad)}
.chips li[data-status=waiting]{color:var(--wait);border-color:var(--wait)}
#log{margin:0;padding-left:0;list-style:none;max-height:220px;overflow:auto;font:12px/1.5 ui-monospace,monospace}
#log li{border-bottom:1px solid var(--line);padding:2px 0}
#log time{color:var(--muted);margin-right:8px}
.muted{color:var(--muted)}
svg{width:100%;height:auto;display:block}
svg .axis{stroke:#98a2b3;stroke-width:1}
svg .grid{stroke:var(--line);stroke-width:1}
svg text{font-size:11px;fill:var(--muted)}
svg .line{fill:none;stroke-width:2}
#chart-metric .line{stroke:var(--accent)}#chart-metric circle{fill:var(--accent)}
#chart-loss .line{stroke:var(--loss)}#chart-loss circle{fill:var(--loss)}
body.static .live{display:none}
"""

_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const embedded = JSON.parse($("data").textContent);
const token = new URLSearchParams(location.search).get("token");

function text(v, digits) { return v === null || v === undefined ? "\\u2013" : v.toFixed(digits); }
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
function ago(s) {
  s = Math.max(0, s);
  if (s < 60) return Math.round(s) + " s ago";
  return s < 3600 ? Math.round(s / 60) + " min ago" : (s / 3600).toFixed(1) + " h ago";
}
function node(tag, content, attrs) {
  const e = document.createElement(tag);
  if (content !== undefined) e.textContent = content;
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
function svgNode(tag, attrs, content) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (content !== undefined) e.textContent = content;
  return e;
}

function chart(svg, rows, key) {
  const pts = rows.filter((r) => r[key] !== null && r[key] !== undefined).map((r) => [r.round, r[key]]);
  svg.replaceChildren();
  svg.dataset.points = pts.length;
  svg.dataset.values = pts.map((p) => p[1].toPrecision(6)).join(" ");
  const W = 480, H = 220, L = 52, R = 14, T = 10, B = 30;
  if (!pts.length) {
    svg.append(svgNode("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no rounds yet"));
    return;
  }
  let x0 = pts[0][0], x1 = pts[pts.length - 1][0];
  if (x1 === x0) x1 = x0 + 1;
  let y0 = pts.reduce((m, p) => Math.min(m, p[1]), Infinity), y1 = pts.reduce((m, p) => Math.max(m, p[1]), -Infinity);
  const pad = (y1 - y0) * 0.08 || Math.abs(y0) * 0.1 || 0.5;
  y0 = y0 >= 0 ? Math.max(0, y0 - pad) : y0 - pad;  // a loss or an accuracy never shown below 0
  y1 += pad;
  const X = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), Y = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    svg.append(svgNode("line", {class: "grid", x1: L, x2: W - R, y1: Y(y), y2: Y(y)}));
    svg.append(svgNode("text", {x: L - 6, y: Y(y) + 4, "text-anchor": "end"}, y.toPrecision(3)));
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / 8));
  for (let x = x0; x <= x1; x += step) {
    svg.append(svgNode("text", {x: X(x), y: H - B + 16, "text-anchor": "middle"}, String(x)));
  }
  svg.append(svgNode("text", {x: W - R, y: H - 2, "text-anchor": "end"}, "round"));
  svg.append(svgNode("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}));
  svg.append(svgNode("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  const points = pts.map((p) => X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1)).join(" ");
  svg.append(svgNode("polyline", {class: "line", points: points}));
  for (const p of pts) {
    const dot = svgNode("circle", {cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 3});
    dot.append(svgNode("title", {}, "round " + p[0] + ": " + p[1].toPrecision(5)));
    svg.append(dot);
  }
}

function drawClients(state) {
  const body = $("clients-body");
  body.replaceChildren();
  for (const c of state.clients) {
    const tr = node("tr", undefined, {"data-client": c.id});
    for (const v of [c.id, c.address, clock(c.connected_at), ago(state.now - c.last_seen)]) {
      tr.append(node("td", String(v)));
    }
    body.append(tr);
  }
  $("client-count").textContent = state.clients.length;
  $("no-clients").hidden = state.clients.length > 0;
}

function drawTask(state) {
  const t = state.task, box = $("task");
  box.replaceChildren();
  if (!t) { box.append(node("p", "no round has started yet", {class: "muted"})); return; }
  const refused = new Map(t.refused.map((r) => [r.client, r.reason]));
  const arrived = new Set(t.arrived);
  const waiting = t.expected.filter((c) => !arrived.has(c) && !refused.has(c));
  box.dataset.task = t.id;
  box.append(node("p", "round " + t.round + " (task " + t.id + (t.done ? ", done" : "") + "): " + t.arrived.length +
    " of " + t.expected.length + " updates arrived, " + t.refused.length + " refused" +
    (t.done ? "" : ", " + waiting.length + " awaited")));
  const chips = node("ul", undefined, {class: "chips"});
  for (const c of t.expected) {
    const status = arrived.has(c) ? "arrived" : refused.has(c) ? "refused" : t.done ? "no update" : "waiting";
    chips.append(node("li", "client " + c + ": " + status, {"data-status": status}));
  }
  box.append(chips);
  if (t.refused.length) {
    const list = node("ul");
    for (const r of t.refused) list.append(node("li", "client " + r.client + ": " + r.reason));
    box.append(list);
  }
}

function draw(state) {
  const run = state.run || {}, rows = state.rounds, last = rows.length ? rows[rows.length - 1] : null;
  const metric = run.metric || "accuracy";
  $("name").textContent = run.name || "";
  $("setup").textContent = run.dataset ? [run.dataset, run.model, run.strategy].join(" \\u00b7 ") : "";
  $("status").textContent = state.status;
  $("round").textContent = (last ? last.round : "\\u2013") + (run.rounds ? " / " + run.rounds : "");
  $("metric-label").textContent = "test " + metric;
  $("metric-title").textContent = "test " + metric + " per round";
  $("metric").textContent = text(last && last.metric, 4);
  $("loss").textContent = text(last && last.loss, 4);
  const eps = rows.filter((r) => r.epsilon !== null);
  $("epsilon").textContent = eps.length ? eps[eps.length - 1].epsilon.toFixed(3) : "not private";
  $("connected").textContent = state.static ? "\\u2013" : state.clients.length;
  chart($("chart-metric"), rows, "metric");
  chart($("chart-loss"), rows, "loss");
  drawClients(state);
  drawTask(state);
  const log = $("log");
  log.replaceChildren();
  for (const line of state.log.slice().reverse()) {
    const li = node("li");
    li.append(node("time", clock(line.time)), document.createTextNode(line.message));
    log.append(li);
  }
  $("no-log").hidden = state.log.length > 0;
  $("updated").textContent = state.static ? "a finished run's report" : "updated " + clock(state.now);
}

async function poll() {
  try {
    const headers = token ? {Authorization: "Bearer " + token} : {};
    const response = await fetch("api/state", {cache: "no-store", headers: headers});
    if (response.ok) draw(await response.json());
    else $("status").textContent = "dashboard: HTTP " + response.status;
  } catch (e) {
    $("status").textContent = "server unreachable (the run may have ended)";
  }
  setTimeout(poll, 1000);
}

if (embedded) { document.body.classList.add("static"); draw(embedded); } else { poll(); }
"""

_BODY = """<header><h1>fedforge <span id="name"></span></h1><span class="sub" id="setup"></span>
<span id="status">loading</span></header>
<main>
<section class="cards">
<div class="card"><div class="label">round</div><div class="value" id="round">\u2013</div></div>
<div class="card"><div class="label" id="metric-label">test accuracy</div>
<div class="value" id="metric">\u2013</div></div>
<div class="card"><div class="label">test loss</div><div class="value" id="loss">\u2013</div></div>
<div class="card"><div class="label">\u03b5 spent</div><div class="value" id="epsilon">\u2013</div></div>
<div class="card"><div class="label">clients connected</div><div class="value" id="connected">\u2013</div></div>
</section>
<section class="grid">
<div class="panel"><h2 id="metric-title">test accuracy per round</h2><svg id="chart-metric" viewBox="0 0 480 220"
 role="img" aria-label="test metric per round"></svg></div>
<div class="panel"><h2>test loss per round</h2><svg id="chart-loss" viewBox="0 0 480 220" role="img"
 aria-label="test loss per round"></svg></div>
</section>
<section class="grid live">
<div class="panel"><h2>connected clients: <span id="client-count">0</span></h2>
<table><thead><tr><th>id</th><th>address</th><th>connected since</th><th>last seen</th></tr></thead>
<tbody id="clients-body"></tbody></table><p class="muted" id="no-clients">none yet</p></div>
<div class="panel"><h2>current round</h2><div id="task"></div></div>
</section>
<section class="panel live"><h2>refusals and warnings</h2><ol id="log"></ol>
<p class="muted" id="no-log">none</p></section>
<p class="muted" id="updated"></p>
</main>"""


def _page(data: str) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>fedforge dashboard</title><style>{_STYLE}</style></head>\n<body>\n{_BODY}\n"
        f'<script type="application/json" id="data">{data}</script>\n<script>{_SCRIPT}</script>\n</body></html>\n'
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
