"""The server's live dashboard: its JSON during a real 3-client deployment on 127.0.0.1, what it
refuses (paths, methods, requests without the token, unsafe addresses, slow, too many, oversized
or malformed connections), the static report page, and the page itself in headless Chromium
(skipped where no chromium binary is installed)."""

import http.client
import itertools
import json
import logging
import queue
import re
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
import types
import urllib.error
import urllib.request
from decimal import Decimal
from importlib import resources

import pytest
import torch
from browser import CHROMIUM, Browser
from cluster import BASE, Cluster
from helpers import PROCESS_S, bound

from fedforge.cli import main as fedforge
from fedforge.client import ClientUpdate
from fedforge.config import Config
from fedforge.contract import ClientPlan
from fedforge.engines.network import NetworkEngine
from fedforge.errors import ConfigError
from fedforge.experiment import run_experiment
from fedforge.history import History, RoundRecord
from fedforge.network import httpd
from fedforge.network.certs import make_certificates
from fedforge.network.dashboard import Dashboard, DashboardSettings, report_page, round_row
from fedforge.network.hub import Event, EventKind, Session
from fedforge.network.wire import Kind, Message, decode, encode
from fedforge.report import write_history

TOKEN = "a-dashboard-token-0123456789"


def get(url: str, **headers) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=bound(60)) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def state(url: str) -> dict:
    status, body = get(url + "api/state")
    assert status == 200
    return json.loads(body)


def wait_until(url: str, condition, timeout: float = PROCESS_S) -> dict:
    timeout = bound(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition(now := state(url)):
            return now
        time.sleep(0.1)
    raise AssertionError(f"not reached in {timeout} s: {json.dumps(now)[:2000]}")


def last_round(s: dict) -> int:
    return s["rounds"][-1]["round"] if s["rounds"] else -1


def secrets(tmp) -> list[str]:
    """What must never be shown: every client's secret and the hashes in the server's tokens file."""
    hashes = [c["sha256"] for c in json.loads((tmp / "tokens.json").read_text())["clients"].values()]
    return hashes + [(tmp / f"client-{i}.token").read_text().strip() for i in range(4)]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dashboard", "0", "--dashboard-address", "0.0.0.0"], "not a loopback address, only with TLS"),
        (
            ["--dashboard", "0", "--dashboard-address", "example.org", "--dashboard-token-file", "token"],
            "not a loopback address, only with TLS",
        ),
        (["--dashboard-address", "127.0.0.1"], "need --dashboard PORT"),
        (["--dashboard", "0", "--dashboard-token-file", "short"], "at least 16 printable ASCII characters"),
        (["--dashboard", "70000"], "between 0 and 65535"),
    ],
)
def test_unsafe_dashboard_settings_are_refused_in_one_line(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.json").write_text('{"clients": {}}')
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "short").write_text("1234")
    assert fedforge(["server", "--tokens", "t.json", "--insecure", "--address", "127.0.0.1:0", *flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedforge: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "runs").exists()  # refused before anything was made


def fake_sessions():
    now = time.time()
    return [
        types.SimpleNamespace(client_id=i, peer=f"ipv4:10.0.0.{i}:5000", connected_at=now, last_seen=now)
        for i in range(2)
    ]


def test_a_token_is_required_when_given_and_off_loopback_https(tmp_path):
    config = Config.load(None, {"name": "t", "dataset": "synthetic"})
    board = Dashboard(DashboardSettings(0, "127.0.0.1", TOKEN), tls=None)
    url = board.start(config, fake_sessions)
    try:
        board.tracker.round(RoundRecord(0, (), 0.5, 0.25), {})
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            assert get(url, **headers) == (401, "") and get(url + "api/state", **headers) == (401, "")
        assert get(url + "nothing")[0] == 401  # nothing is told without the token, not even what is there
        status, body = get(url + "api/state", Authorization=f"Bearer {TOKEN}")
        assert status == 200 and json.loads(body)["rounds"][0]["loss"] == 0.5 and TOKEN not in body
        status, page = get(url + f"?token={TOKEN}")
        assert status == 200 and TOKEN not in page  # the page's script reads it from its own address
    finally:
        board.stop()

    paths = make_certificates(tmp_path, ["127.0.0.1"])
    tls = (paths["key"].read_bytes(), paths["cert"].read_bytes())
    with pytest.raises(ConfigError, match="only with TLS"):  # TLS without a token is not enough
        Dashboard(DashboardSettings(0, "0.0.0.0"), tls=tls)
    board = Dashboard(DashboardSettings(0, "0.0.0.0", TOKEN), tls=tls)
    url = board.start(config, fake_sessions)
    try:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert url.startswith("https://0.0.0.0:")
        context = ssl.create_default_context(cafile=str(paths["ca"]))
        local = f"https://127.0.0.1:{port}/api/state"
        for headers, expected in (({}, 401), ({"Authorization": f"Bearer {TOKEN}"}, 200)):
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(local, headers=headers), context=context, timeout=bound(60)
                ) as response:
                    status = response.status
            except urllib.error.HTTPError as e:
                status = e.code
            assert status == expected
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):  # no plaintext
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=bound(60)).read()
    finally:
        board.stop()


class AnsweringHub:
    """A hub without sockets for the network engine: clients 0 and 1 answer each task with a zero
    update, client 2 with NaN (refused)."""

    max_message_bytes = 1 << 20

    def __init__(self, config: Config):
        self.config = config.client_config()
        self.events = queue.Queue()
        now = time.time()
        self.sessions = {
            c: Session(c, f"ipv4:127.0.0.1:{5000 + c}", outbox=None, connected_at=now - 60, last_seen=now)
            for c in range(3)
        }

    def wait_for_clients(self, count, timeout=None):
        return True

    def current(self, client_id):
        return self.sessions[client_id]

    def clients(self):
        return list(self.sessions.values())

    def send(self, session, data, *, expect_answer=True):
        task = decode(data)
        h = task.header
        delta = {
            f"delta/{k[len('global/') :]}": torch.zeros_like(v)
            for k, v in task.tensors.items()
            if k.startswith("global/")
        }
        if session.client_id == 2:
            delta = {k: torch.full_like(v, float("nan")) for k, v in delta.items()}
        steps = ClientPlan(epochs=h["epochs"], max_steps=h["max_steps"]).num_steps(10, self.config)
        header = {"task": h["task"], "num_examples": 10, "num_steps": steps, "train_loss": 1.0}
        self.events.put(Event(session, EventKind.MESSAGE, encode(Message(Kind.UPDATE, header, delta))))
        return True


def test_an_ipv6_loopback_address_serves_and_other_ipv6_addresses_need_tls():
    config = Config.load(None, {"name": "t", "dataset": "synthetic"})
    board = Dashboard(DashboardSettings(0, "::1"), tls=None)
    url = board.start(config, fake_sessions)
    try:
        assert url.startswith("http://[::1]:")
        board.tracker.round(RoundRecord(0, (), 0.5, 0.25), {})
        assert state(url)["rounds"][0]["loss"] == 0.5 and get(url)[0] == 200
    finally:
        board.stop()
    for address in ("::", "2001:db8::1"):
        with pytest.raises(ConfigError, match=f"may listen on {address}, which is not a loopback address"):
            Dashboard(DashboardSettings(0, address), tls=None)


def test_arrivals_refusals_and_epsilon_reach_the_state(tmp_path):
    """The engine's RoundWatcher calls, the round loop's records (with epsilon under differential
    privacy) and the server logger's warnings, as /api/state shows them."""
    config = Config(
        dataset="synthetic",
        num_clients=3,
        clients_per_round=3,
        model="logreg",
        batch_size=10,
        rounds=2,
        out_dir=str(tmp_path),
        name="net",
        dp="client",
        target_epsilon=3.0,
        delta=0.01,
        clip=0.5,
    )
    hub = AnsweringHub(config)
    board = Dashboard(DashboardSettings(0), tls=None)
    url = board.start(config, hub.clients)
    try:
        assert state(url)["status"] == "waiting for clients"
        engine = NetworkEngine(hub, round_timeout=300, min_fit_clients=2, watcher=board.state)
        run_experiment(config, progress=False, verbose=False, engine=engine, trackers=[board.tracker])
        now = state(url)
    finally:
        board.stop()
    assert now["status"] == "finished" and [r["round"] for r in now["rounds"]] == [0, 1, 2]
    assert now["rounds"][0]["epsilon"] == 0 < now["rounds"][1]["epsilon"] < now["rounds"][2]["epsilon"] <= 3
    assert [(c["id"], c["address"]) for c in now["clients"]] == [
        (0, "127.0.0.1:5000"),
        (1, "127.0.0.1:5001"),
        (2, "127.0.0.1:5002"),
    ]
    task = now["task"]
    assert (task["id"], task["round"], task["done"], task["expected"], task["arrived"]) == (
        2,
        2,
        True,
        [0, 1, 2],
        [0, 1],
    )
    assert task["refused"] == [{"client": 2, "reason": "it holds NaN or infinite values"}]
    assert [line["message"] for line in now["log"]] == [
        f"task {t}: refused the update of client 2: it holds NaN or infinite values" for t in (1, 2)
    ]
    logging.getLogger("fedforge.server").warning("after the run")  # the dashboard no longer listens to the log
    assert len(board.state.snapshot()["log"]) == 2


def test_an_update_the_privacy_stage_clipped_reaches_the_log(tmp_path):
    """Under --dp local, the server's privacy stage clips an update of norm 10^6 to what an honest
    one stays within; its warning is on the page with the server's refusals."""
    from fedforge.privacy import PrivacyConfig, PrivacyState, local_bound, privatize

    config = Config(
        dataset="synthetic",
        num_clients=3,
        clients_per_round=3,
        model="logreg",
        batch_size=10,
        rounds=1,
        out_dir=str(tmp_path),
        name="net",
    )
    mechanism = PrivacyConfig(noise_multiplier=0.5, expected_clients=3, mode="local", clip=0.5)
    hostile = ClientUpdate(2, {"w": torch.full((100,), 1e5)}, 10, 1, 1.0, None)
    board = Dashboard(DashboardSettings(0), tls=None)
    url = board.start(config, list)
    try:
        privatize([hostile], {"w": torch.zeros(100)}, PrivacyState(0.5), mechanism, torch.Generator())
        now = state(url)
    finally:
        board.stop()
    assert [line["message"] for line in now["log"]] == [
        f"client 2 sent an update of norm 1e+06, above the {local_bound(0.5, 0.5, 100):.4g} an honest client's stays "
        f"within under --dp local: clipped to it"
    ]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """One server with --dashboard (and --tensorboard) and three clients for the module, and a fourth
    that gives a wrong secret; rounds of about half a second (40 local epochs) so that a round can be seen to move,
    killed at the end."""
    tmp = tmp_path_factory.mktemp("dashboard")
    cluster = Cluster(tmp)
    server, port = cluster.server(
        "--insecure",
        "--min-clients",
        "3",
        "--dashboard",
        "0",
        "--rounds",
        "200",
        "--local-epochs",
        "40",
        "--tensorboard",
        "tb",
        *BASE,
    )
    url = server.wait_for(r"fedforge server: dashboard at (http://127\.0\.0\.1:\d+/)").group(1)
    for i in range(3):
        cluster.client(i, port)
    cluster.client(2, port, token="client-3.token", name="wrong-secret")  # refused: the log shows it
    yield types.SimpleNamespace(url=url, tmp=tmp, server=server)
    cluster.close()


def test_the_state_shows_the_clients_and_the_rounds_moving(deployment):
    url = deployment.url
    first = wait_until(url, lambda s: len(s["clients"]) == 3 and last_round(s) >= 1)
    assert [c["id"] for c in first["clients"]] == [0, 1, 2]
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", c["address"]) for c in first["clients"])
    assert all(c["connected_at"] <= c["last_seen"] <= first["now"] + 1 for c in first["clients"])
    assert first["run"]["name"] == "net" and first["run"]["rounds"] == 200 and first["status"] == "training"
    later = wait_until(url, lambda s: last_round(s) > last_round(first))
    assert [r["round"] for r in later["rounds"]] == list(range(last_round(later) + 1))
    assert all(0 <= r["metric"] <= 1 and r["loss"] > 0 for r in later["rounds"])  # accuracy and loss each round
    task = later["task"]
    assert task["round"] >= last_round(later) and task["expected"] == [0, 1, 2]
    assert set(task["arrived"]) <= {0, 1, 2} and task["refused"] == []


def test_nothing_secret_and_nothing_unknown(deployment):
    url = deployment.url
    now = wait_until(url, lambda s: len(s["clients"]) == 3 and s["log"])
    assert any(
        re.fullmatch(r"refused ipv4:127\.0\.0\.1:\d+: wrong secret for client 2", line["message"])
        for line in now["log"]
    )
    _, page = get(url)
    assert not re.search(r"\b(src|href)=", page)  # everything inline: the page loads nothing else
    _, body = get(url + "api/state")
    for secret in secrets(deployment.tmp):
        assert secret not in body and secret not in page

    def numbers(value):  # the longest list of numbers anywhere in the state: no tensor hides there
        if isinstance(value, dict):
            return max(map(numbers, value.values()), default=0)
        if isinstance(value, list):
            own = len(value) if value and all(isinstance(v, (int, float)) for v in value) else 0
            return max([own, *map(numbers, value)])
        return 0

    assert numbers(json.loads(body)) <= 3
    for path in ("favicon.ico", "api/state/", "api", "..%2f", "index.html", "api/state.json"):
        assert get(url + path)[0] == 404, path
    for method in ("POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "BREW"):
        assert urllib_status(url + "api/state", method) == 404, method


def urllib_status(url: str, method: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=bound(60)) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# What the page shows at this moment: its client rows and each chart's points, as its script drew them.
PAGE_NOW = """(() => {
  const chart = (name) => document.getElementById("chart-" + name);
  return {clients: [...document.querySelectorAll("#clients-body tr")].map((row) => row.dataset.client),
          count: document.getElementById("client-count")?.textContent,
          points: Number(chart("metric")?.dataset.points || 0), values: chart("metric")?.dataset.values,
          loss_points: Number(chart("loss")?.dataset.points || 0), static: document.body?.className,
          ticks: chart("metric")?.dataset.ticks, loss_ticks: chart("loss")?.dataset.ticks,
          epsilon: document.getElementById("epsilon")?.textContent, mark: window.testMark || null};
})()"""


def watch(browser: Browser, condition, timeout: float = PROCESS_S) -> dict:
    timeout = bound(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition(now := browser.evaluate(PAGE_NOW)):
            return now
        time.sleep(0.1)
    raise AssertionError(f"the page did not get there in {timeout} s: {now}")


def assert_round_ticks(labels: str) -> None:
    """An axis's labels are whole multiples of one step of 1, 2 or 5 times a power of ten, written
    with the step's decimals only: 0.2 0.4 0.6, not 0.219 0.438 0.657."""
    values = [Decimal(label) for label in labels.split()]
    steps = {b - a for a, b in itertools.pairwise(values)}
    assert len(values) >= 2 and len(steps) == 1, labels
    step = steps.pop()
    assert step.scaleb(-step.adjusted()).normalize() in (1, 2, 5), labels
    assert all(v % step == 0 and -v.as_tuple().exponent <= max(0, -step.adjusted()) for v in values), labels


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="no node binary to run the page's script with")
def test_chart_axes_are_on_round_numbers():
    """The page's tick algorithm (static/dashboard.js, run by node): 1, 2 or 5 times a power of ten."""
    script = (resources.files("fedforge.network") / "static" / "dashboard.js").read_text()
    functions = re.search(r"function niceNumber.*?\n}\nfunction niceTicks.*?\n}\n", script, re.S).group(0)
    cases = [(0.219, 0.876), (0.0, 2.3026), (2.31, 2.33), (0.5, 0.5001), (-1.7, 3.2), (0, 137.0)]
    probe = functions + f"console.log(JSON.stringify({json.dumps(cases)}.map(([a, b]) => niceTicks(a, b, 5))));"
    out = subprocess.run([NODE, "-e", probe], capture_output=True, text=True, check=True, timeout=bound(60)).stdout
    ticks = json.loads(out)
    assert ticks[0]["labels"] == ["0.2", "0.4", "0.6", "0.8", "1.0"]
    assert ticks[1]["labels"] == ["0", "1", "2", "3"]  # a loss from 0 to 2.3
    assert ticks[5]["labels"] == ["0", "50", "100", "150"]
    for (lo, hi), tick in zip(cases, ticks, strict=True):
        assert_round_ticks(" ".join(tick["labels"]))
        assert tick["lo"] <= lo and tick["hi"] >= hi  # the axis covers the data


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium; make test installs it where apt is here)")
    browser = Browser(tmp_path / "profile", "--window-size=1200,900")
    yield browser
    browser.close()


def test_the_page_in_headless_chromium(browser, deployment, tmp_path):
    """A real browser loads the page once and sees 3 clients, then the charts grow by a round while
    the page stays loaded (the mark set on its window survives: no reload)."""
    browser.open(deployment.url)
    first = watch(browser, lambda p: p["clients"] == ["0", "1", "2"] and p["points"] >= 2)
    assert first["count"] == "3" and first["loss_points"] == first["points"]
    browser.evaluate("window.testMark = 'still the same page'")
    later = watch(browser, lambda p: p["points"] > first["points"])
    assert later["mark"] == "still the same page" and later["clients"] == ["0", "1", "2"]
    assert later["values"] != first["values"] and later["loss_points"] == later["points"]
    assert_round_ticks(later["ticks"])
    assert_round_ticks(later["loss_ticks"])
    # The axis of an accuracy between 0.219 and 0.876: 0.2 to 1.0 in steps of 0.2.
    assert browser.evaluate("niceTicks(0.219, 0.876, 5).labels") == ["0.2", "0.4", "0.6", "0.8", "1.0"]
    # The static report of the same run: the same page and charts, from the history inside it.
    report = deployment.tmp / "report.html"
    assert fedforge(["report", str(deployment.tmp / "runs" / "net"), "--html", "--out", str(report)]) == 0
    embedded = json.loads(report.read_text().split('id="data">')[1].split("</script>")[0])
    browser.open(report.as_uri())
    static = watch(browser, lambda p: p["points"] > 0)
    assert static["points"] == len(embedded["rounds"]) >= later["points"]
    assert static["static"] == "static" and static["clients"] == []
    assert first["epsilon"] == static["epsilon"] == "not private"
    # Under differential privacy the page shows the epsilon spent by the last round.
    write_history(
        tmp_path / "private",
        History([RoundRecord(r, (0, 1), 1.0, 0.5, metrics={"epsilon": 0.75 * r}) for r in range(3)]),
    )
    (tmp_path / "private.html").write_text(report_page(tmp_path / "private"))
    browser.open((tmp_path / "private.html").as_uri())
    assert watch(browser, lambda p: p["points"] == 3)["epsilon"] == "1.500"


def test_round_row_has_the_personalized_evaluation_of_the_tasks_metric():
    metrics = {"test_r2": 0.2, "personalized_r2": 0.4, "personalized_r2_p10": 0.1, "personalized_r2_p90": 0.6}
    row = round_row(RoundRecord(3, (0, 1), 1.0, None, metrics={**metrics, "personalized_mse": 2.0}), "r2")
    assert (row["metric"], row["personalized"], row["personalized_p10"], row["personalized_p90"]) == (
        0.2,
        0.4,
        0.1,
        0.6,
    )
    row = round_row(RoundRecord(0, (), 1.0, 0.1, metrics={"personalized_accuracy": float("nan")}), "accuracy")
    assert row["personalized"] is row["personalized_p10"] is row["personalized_p90"] is None  # JSON has no NaN


PERSONALIZED_NOW = """(() => ({
  hidden: document.getElementById("personalized-card").hidden,
  label: document.getElementById("personalized-label").textContent,
  value: document.getElementById("personalized").textContent,
  spread: document.getElementById("personalized-spread").textContent,
  title: document.getElementById("metric-title").textContent,
  also: document.getElementById("chart-metric").dataset.also,
  dashed: document.querySelectorAll("#chart-metric polyline.also").length,
}))()"""


def test_the_page_shows_the_personalized_evaluation(browser, tmp_path):
    """A card with the last evaluated round's mean and spread, and a dashed line on the test metric's
    chart; neither where no round has one."""
    own = {"personalized_accuracy": 0.8512, "personalized_accuracy_p10": 0.712, "personalized_accuracy_p90": 0.95}
    records = [RoundRecord(0, (), 1.0, 0.3)]
    records += [
        RoundRecord(r, (0, 1), 1 / r, 0.5, metrics={k: v - 0.1 * (2 - r) for k, v in own.items()}) for r in (1, 2)
    ]
    records.append(RoundRecord(3, (0, 1), 0.3, 0.6))  # a round without a personalized evaluation

    def shown(name: str, history: list[RoundRecord]) -> dict:
        write_history(tmp_path / name, History(history))
        (tmp_path / f"{name}.html").write_text(report_page(tmp_path / name))
        browser.open((tmp_path / f"{name}.html").as_uri())
        watch(browser, lambda p: p["points"] == len(history))
        return browser.evaluate(PERSONALIZED_NOW)

    pages = {
        "own": shown("own", records),
        "plain": shown("plain", [RoundRecord(r, (0, 1), 1.0, 0.5) for r in range(3)]),
    }
    assert pages["own"] == {
        "hidden": False,
        "label": "personalized accuracy (round 2)",
        "value": "0.8512",
        "spread": "p10 0.712, p90 0.950",
        "title": "test accuracy per round (dashed: personalized)",
        "also": "0.751200 0.851200",
        "dashed": 1,
    }
    assert pages["plain"]["hidden"] is True and pages["plain"]["dashed"] == 0 and pages["plain"]["also"] == ""
    assert pages["plain"]["title"] == "test accuracy per round"


def test_report_html_holds_the_history(deployment, capsys):
    run_dir = deployment.tmp / "runs" / "net"
    wait_until(deployment.url, lambda s: last_round(s) >= 2)
    assert fedforge(["report", str(run_dir), "--html"]) == 0
    assert "written to" in capsys.readouterr().out
    html = (run_dir / "dashboard.html").read_text()
    embedded = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1))
    history = json.loads((run_dir / "history.json").read_text())["rounds"]
    assert embedded["static"] is True and embedded["clients"] == [] and embedded["run"]["name"] == "net"
    assert [r["round"] for r in embedded["rounds"]] == [r["round"] for r in history[: len(embedded["rounds"])]]
    assert [r["metric"] for r in embedded["rounds"]] == [r["test_accuracy"] for r in history[: len(embedded["rounds"])]]
    assert embedded["status"] == f"{embedded['rounds'][-1]['round']} of 200 rounds recorded"  # still running
    assert "api/state" in html and 'fetch("api/state"' in html  # the same page; its script fetches only when live
    for secret in secrets(deployment.tmp):
        assert secret not in html
    assert fedforge(["report", str(deployment.tmp)]) == 2  # no history.json there
    capsys.readouterr()
    assert fedforge(["report", str(run_dir)]) == 0  # without --html: a line per round
    assert capsys.readouterr().out.startswith("initial model   test accuracy")


def test_the_server_tracks_its_rounds_in_tensorboard(deployment):
    """fedforge server --tensorboard: each round's record, bytes included, as the run goes."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    wait_until(deployment.url, lambda s: last_round(s) >= 2)
    accumulator = event_accumulator.EventAccumulator(str(deployment.tmp / "tb" / "net"), size_guidance={"scalars": 0})
    accumulator.Reload()
    history = json.loads((deployment.tmp / "runs" / "net" / "history.json").read_text())["rounds"]
    tracked = {e.step: e.value for e in accumulator.Scalars("test_accuracy")}
    assert len(tracked) >= 3 and all(
        tracked[r["round"]] == pytest.approx(r["test_accuracy"]) for r in history if r["round"] in tracked
    )
    assert all(e.value > 0 for e in accumulator.Scalars("bytes_up"))


# -- slow connections (slow loris) ---------------------------------------------------------------

DEADLINE = httpd.DEADLINE  # seconds from accept to the end of the answer: the request, TLS included


class SlowClients:
    """`count` connections to 127.0.0.1:`port` (opened one after another, from `sources` in turn),
    each sending one byte of `payload` every `every` seconds (one thread for all); it records when
    each was closed by the server and what it was told."""

    def __init__(self, port: int, count: int, payload: bytes, every: float = 3.0, sources=("127.0.0.1",)):
        self.payload, self.every = payload, every
        self.sockets, self.opened = [], []
        for i in range(count):
            source = (sources[i % len(sources)], 0)
            self.sockets.append(socket.create_connection(("127.0.0.1", port), timeout=30, source_address=source))
            self.opened.append(time.monotonic())
        self.closed: list[float | None] = [None] * count
        self.told = [b""] * count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._dribble, daemon=True)
        self._thread.start()

    def _dribble(self) -> None:
        sent = [0] * len(self.sockets)
        due = [0.0] * len(self.sockets)
        while not self._stop.is_set() and None in self.closed:
            open_ = [i for i, c in enumerate(self.closed) if c is None]
            readable, _, _ = select.select([self.sockets[i] for i in open_], [], [], 0.05)
            now = time.monotonic()
            for i in open_:
                s = self.sockets[i]
                try:
                    if s in readable:
                        data = s.recv(4096)
                        self.told[i] += data
                        if not data:
                            self.closed[i] = now
                            continue
                    if now >= due[i] and sent[i] < len(self.payload):
                        s.send(self.payload[sent[i] : sent[i] + 1])
                        sent[i], due[i] = sent[i] + 1, now + self.every
                except OSError:  # reset by the server
                    self.closed[i] = now

    def wait_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while None in self.closed and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.sockets:
            s.close()


def timed_get(url: str, context: ssl.SSLContext | None = None, **headers) -> tuple[float, float, int, bytes]:
    """The seconds a GET took, when it ended, its status and its body; a connection closed unanswered
    fails the test."""
    start = time.monotonic()
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=60, context=context
        ) as response:
            body = response.read()
            return time.monotonic() - start, time.monotonic(), response.status, body
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
        raise AssertionError(f"GET {url} was not answered after {time.monotonic() - start:.1f} s: {e!r}") from None


def closed_after(slow: SlowClients) -> list[float]:
    return [round(c - o, 2) for o, c in zip(slow.opened, slow.closed, strict=True)]


@pytest.fixture
def loopback_board():
    """A dashboard on 127.0.0.1 without a token, in this process: its URL and port."""
    board = Dashboard(DashboardSettings(0), tls=None)
    url = board.start(Config.load(None, {"name": "t", "dataset": "synthetic"}), fake_sessions)
    yield url, int(url.rsplit(":", 1)[1].strip("/"))
    board.stop()


def test_slow_connections_are_closed_at_the_deadline_while_real_requests_are_served(loopback_board):
    """32 connections from 127.0.0.1 that send a request one byte every 3 s (the same address as the
    real client): GET /api/state and GET / are still answered within seconds while they are held, and
    each is answered 408 and closed once DEADLINE seconds have passed since it connected (never
    earlier, and not by a per-read timeout: a byte comes every 3 s)."""
    url, port = loopback_board
    slow = SlowClients(port, 32, b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        latencies, answered = [], []
        while time.monotonic() < slow.opened[0] + DEADLINE - 3 and len(latencies) < 10:
            for path in ("api/state", ""):
                seconds, end, status, body = timed_get(url + path)
                assert status == 200 and body
                latencies.append(seconds)
                answered.append(end)
            time.sleep(0.2)
        assert len(latencies) >= 2 and max(latencies) < 5, latencies
        slow.wait_closed(DEADLINE + 60)
        assert max(answered) < min(slow.closed)  # answered while all 32 were held
        after = closed_after(slow)
        assert all(DEADLINE - 0.5 <= a <= DEADLINE + 30 for a in after), after
        assert all(t.startswith(b"HTTP/1.0 408 ") for t in slow.told), set(slow.told)
    finally:
        slow.close()


@pytest.mark.parametrize(
    "count, sources, limit",
    [
        (100, ["127.0.0.1"], httpd.MAX_PER_ADDRESS),  # one address, the real client's
        (300, [f"127.0.0.{i}" for i in range(2, 7)], httpd.MAX_CONNECTIONS),  # 60 from each of five: under theirs
    ],
)
def test_the_oldest_beyond_the_limits_are_closed_and_a_new_request_is_served(loopback_board, count, sources, limit):
    """`count` slow connections: the oldest beyond the per-address or the total limit are closed at
    once (503), a real request from 127.0.0.1 is still answered, the rest end at the deadline (408)."""
    url, port = loopback_board
    slow = SlowClients(port, count, b"GET / HTTP/1.1\r\n\r\n", sources=sources)
    try:
        seconds, end, status, _ = timed_get(url + "api/state")
        assert status == 200 and seconds < 5
        slow.wait_closed(DEADLINE + 60)
        evicted = [i for i, t in enumerate(slow.told) if t.startswith(b"HTTP/1.0 503 ")]
        expired = [i for i, t in enumerate(slow.told) if t.startswith(b"HTTP/1.0 408 ")]
        assert len(evicted) + len(expired) == count and evicted == list(range(len(evicted)))  # the oldest
        assert count - limit <= len(evicted) <= count - limit + 1  # and room for the real request
        after = closed_after(slow)
        assert all(after[i] < DEADLINE - 1 for i in evicted) and all(after[i] >= DEADLINE - 0.5 for i in expired)
        assert end < min(slow.closed[i] for i in expired)
    finally:
        slow.close()


def test_a_slow_tls_handshake_is_under_the_same_deadline(tmp_path):
    """32 connections dribbling a real TLS ClientHello one byte every 3 s to an HTTPS dashboard:
    a real HTTPS request is answered meanwhile, and each is closed at the deadline."""
    paths = make_certificates(tmp_path, ["127.0.0.1"])
    config = Config.load(None, {"name": "t", "dataset": "synthetic"})
    board = Dashboard(
        DashboardSettings(0, "0.0.0.0", TOKEN), tls=(paths["key"].read_bytes(), paths["cert"].read_bytes())
    )
    url = board.start(config, fake_sessions)
    port = int(url.rsplit(":", 1)[1].strip("/"))
    hello = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_side=False, server_hostname="127.0.0.1"
    )
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    slow = SlowClients(port, 32, outgoing.read())
    try:
        context = ssl.create_default_context(cafile=str(paths["ca"]))
        seconds, end, status, body = timed_get(
            f"https://127.0.0.1:{port}/api/state", context, Authorization=f"Bearer {TOKEN}"
        )
        assert status == 200 and json.loads(body)["run"]["name"] == "t" and seconds < 5
        slow.wait_closed(DEADLINE + 60)
        assert end < min(slow.closed)
        after = closed_after(slow)
        assert all(DEADLINE - 0.5 <= a <= DEADLINE + 30 for a in after), after
        assert slow.told == [b""] * 32  # no plaintext answer inside a TLS handshake
    finally:
        slow.close()
        board.stop()


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"b" * 17000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
        (b"GET /\r\n\r\n", 400),
        (b"GET / SPDY/3\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    ],
)
def test_oversized_or_malformed_requests_get_one_status_and_are_closed(loopback_board, request_bytes, status):
    url, port = loopback_board
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request_bytes)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(f"HTTP/1.0 {status} ".encode()), answer[:200]
    assert get(url + "api/state")[0] == 200  # and the server goes on


def test_the_per_address_limit_counts_an_ipv6_64_as_one_address():
    key = httpd._key
    assert key("2001:db8::1") == key("2001:db8::ffff:1") == key("2001:db8::1%eth0") != key("2001:db8:0:1::1")
    assert key("::ffff:127.0.0.1") == key("127.0.0.1") == "127.0.0.1" != key("127.0.0.2")
