"""Secure aggregation over real gRPC sockets on 127.0.0.1, with real client processes.

The clients run in a few processes (tests/network/secagg_clients.py: several clients as threads
each), so a test can kill one client, or three at once, at a chosen stage of the protocol.
"""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from cluster import HERE, Proc
from helpers import PROCESS_S, wait_for
from helpers import bound as wait_bound  # `bound` is the fixed point's error bound below

from fedforge.config import Config
from fedforge.experiment import load
from fedforge.models import build_model
from fedforge.network.auth import enroll, load_tokens, write_secret
from fedforge.network.hub import Hub
from fedforge.network.wire import Kind, decode
from fedforge.secagg import SecureAggregation
from fedforge.secagg.protocol import ServerRound
from fedforge.server import serve
from fedforge.simulation import simulate

SETTINGS = ["--dataset", "synthetic", "--model", "logreg", "--batch-size", "10"]


def enroll_all(tmp: Path, count: int) -> None:
    for i in range(count):
        write_secret(tmp / f"client-{i}.token", enroll(tmp / "tokens.json", i))


def clients(tmp: Path, port: int, ids, partition: str, *flags, name: str) -> Proc:
    return Proc(
        [sys.executable, str(HERE / "secagg_clients.py"), str(port), ",".join(map(str, ids)), partition, *flags],
        tmp / f"{name}.log",
        tmp,
    )


def server(tmp: Path, *flags) -> tuple[Proc, int]:
    proc = Proc(
        [
            sys.executable,
            "-m",
            "fedforge",
            "server",
            "-q",
            "--threads",
            "1",
            "--tokens",
            "tokens.json",
            "--address",
            "127.0.0.1:0",
            "--out-dir",
            "runs",
            "--name",
            "net",
            "--insecure",
            *SETTINGS,
            *flags,
        ],
        tmp / "server.log",
        tmp,
    )
    return proc, int(proc.wait_for(r"listening on port (\d+)").group(1))


def test_clients_killed_at_every_stage_and_below_the_threshold(tmp_path):
    """10 clients, threshold 6 of 10. Each stage (after the key exchange, after sharing, after
    uploading) sees one client killed in one round and three at once in another; each round
    completes with the sum of those that uploaded. Then five killed after uploading: below the
    threshold, the round fails with nothing unmasked and is retried (they come back) to the end."""
    enroll_all(tmp_path, 10)
    srv, port = server(
        tmp_path,
        "--num-clients",
        "10",
        "--clients-per-round",
        "10",
        "--rounds",
        "4",
        "--min-clients",
        "10",
        "--min-available-clients",
        "10",
        "--min-fit-clients",
        "5",
        "--secure-aggregation",
        "--round-timeout",
        "300",
    )
    procs = [clients(tmp_path, port, range(5), "synthetic:10", name="survivors")]
    schedules = {
        "one": ([9], ["keys:1", "shares:2", "upload:3", "upload:4", None]),
        "three": ([6, 7, 8], ["shares:1", "upload:2", "keys:3", "upload:4", None]),
        "fifth": ([5], ["upload:4", None]),
    }
    current = {}
    try:
        for name, (ids, plan) in schedules.items():
            current[name] = clients(tmp_path, port, ids, "synthetic:10", "--die", plan.pop(0), name=f"{name}-0")
            procs.append(current[name])
        deadline = time.monotonic() + wait_bound(600)
        while srv.popen.poll() is None and time.monotonic() < deadline:
            for name, (ids, plan) in schedules.items():
                if current[name].popen.poll() is not None and plan:
                    assert "dying at" in current[name].text(), current[name].text()
                    die = plan.pop(0)
                    current[name] = clients(
                        tmp_path,
                        port,
                        ids,
                        "synthetic:10",
                        *(["--die", die] if die else []),
                        name=f"{name}-{len(procs)}",
                    )
                    procs.append(current[name])
            time.sleep(0.1)
        assert srv.wait() == 0, srv.text()
        log = srv.text()
        # task -> inputs summed, of the 10 selected. Killed before uploading, a client is out of
        # the sum and its pairwise masks are removed with its mask key, rebuilt from its
        # neighbours' shares; killed after, it is in the sum and its self-mask is rebuilt.
        for task, summed in {1: 6, 2: 9, 3: 7, 5: 10}.items():
            assert f"task {task}: the sum of {summed} masked updates ({10 - summed} dropped" in log, log
        assert "task 4: the sum" not in log
        assert "round 4, attempt 1 failed (secure aggregation: client" in log and "nothing was unmasked" in log
        history = json.loads((tmp_path / "runs" / "net" / "history.json").read_text())["rounds"]
        assert len(history) == 5 and history[-1]["test_accuracy"] > 0.5
    finally:
        srv.kill()
        for proc in procs:
            proc.kill()


class RecordingQueue:
    """The hub's event queue, keeping every message the server receives."""

    def __init__(self, events):
        self.events, self.received = events, []

    def put(self, event):
        if event.data is not None:
            self.received.append((event.session.client_id, event.data))
        self.events.put(event)

    def get(self, *args, **kwargs):
        return self.events.get(*args, **kwargs)


def test_the_server_sees_no_update_and_unmasks_their_exact_sum(tmp_path, monkeypatch):
    """Every message the server receives is decoded: none holds a client's update (as floats or
    as its fixed point); the unmasked sum is exactly the sum of the clients' quantized updates, and
    the final model is the plain simulation's within the stated bound of the fixed point."""
    monkeypatch.chdir(tmp_path)
    enroll_all(tmp_path, 5)
    hubs, sums = [], []
    hub_init, result = Hub.__init__, ServerRound.result

    def recording_hub(self, *args, **kwargs):
        hub_init(self, *args, **kwargs)
        self.events = RecordingQueue(self.events)
        hubs.append(self)

    def spied_result(self):
        sums.append(result(self))
        return sums[-1]

    monkeypatch.setattr(Hub, "__init__", recording_hub)
    monkeypatch.setattr(ServerRound, "result", spied_result)
    config = Config(
        dataset="synthetic",
        model="logreg",
        batch_size=10,
        num_clients=5,
        clients_per_round=5,
        rounds=1,
        out_dir=str(tmp_path / "runs"),
        name="net",
    )
    ports, outcome = [], []
    thread = threading.Thread(
        target=lambda: outcome.append(
            serve(
                config,
                address="127.0.0.1:0",
                tokens=load_tokens(tmp_path / "tokens.json"),
                tls=None,
                min_clients=5,
                min_fit_clients=None,
                round_timeout=300,
                max_message_bytes=1 << 24,
                progress=False,
                on_listening=ports.append,
                secure=SecureAggregation(),
            )
        ),
        daemon=True,
    )
    thread.start()
    wait_for(lambda: ports or not thread.is_alive(), PROCESS_S, "the server to listen")
    assert ports, "the server stopped before it listened"
    proc = clients(tmp_path, ports[0], range(5), "synthetic:5", name="clients")
    try:
        thread.join(wait_bound(PROCESS_S))
        assert outcome, proc.text()
    finally:
        proc.kill()
    # The clients' true updates: the simulation's, which an all-alive deployment equals.
    dataset, data = load(config, progress=False)
    model = build_model(config.model, dataset.input_shape, dataset.num_classes, seed=config.seed)
    updates = []
    plain = simulate(
        model,
        data,
        rounds=1,
        clients_per_round=5,
        client=config.client_config(),
        strategy=config.strategy_object(),
        seed=config.seed,
        on_client=updates.append,
    )
    assert len(updates) == 5
    quantizer = SecureAggregation().quantizer(5, None)
    flat = {u.client_id: torch.cat([v.reshape(-1) for v in u.delta.values()]).double() for u in updates}
    quantized = {
        c: quantizer.encode(v.numpy(), updates[i].num_examples, True, updates[i].train_loss)
        for i, (c, v) in enumerate(flat.items())
    }

    received = [(c, decode(data_)) for c, data_ in hubs[0].events.received]
    assert sorted(m.kind for _, m in received) == sorted(
        [Kind.SA_KEYS, Kind.SA_SHARES, Kind.SA_MASKED, Kind.SA_UNMASKED] * 5
    )
    weights = {u.client_id: u.num_examples for u in updates}
    masked = []
    for _, message in received:
        assert not any(name.startswith("delta/") for name in message.tensors)
        for tensor in message.tensors.values():
            words = tensor.numpy().view(np.uint32)
            masked.append(words)
            signed = torch.from_numpy(words.view(np.int32).astype(np.float64) / quantizer.scale)
            for c, q in quantized.items():  # no input in the clear, nor one coordinate in a hundred
                assert np.mean(words == q) < 0.01
                assert not torch.allclose(signed[: len(flat[c])] / weights[c], flat[c], atol=1e-2)
    assert len(masked) == 5
    total = sum(quantized.values())
    assert np.array_equal(sums[0], total)  # the unmasked sum is exactly the sum of the true inputs
    assert not any(np.array_equal(m, total) for m in masked)

    weight = sum(u.num_examples for u in updates)
    bound = quantizer.error_bound(5, weight)
    assert 0 < bound < 1e-5
    final, expected = outcome[0].state.params, plain.state.params
    for k in expected:
        assert (final[k] - expected[k]).abs().max() <= bound + 1e-6 * expected[k].abs().max()


def test_hostile_clients_are_refused_and_dp_spends_the_simulations_epsilon(tmp_path):
    """Six clients under --dp client: one reveals a wrong share (refused: the others rebuild the
    secret), one sends its shares in another client's name, one a malformed masked input, one its
    masked input twice, one keys whose inputs_differ flag is not a bool: each is refused and logged
    and every round completes. The server noises
    the unmasked sum, and the accountant spends what the simulation's does."""
    enroll_all(tmp_path, 6)
    dp = ["--dp", "client", "--noise-multiplier", "0.3", "--clip", "0.5", "--delta", "0.01"]
    srv, port = server(
        tmp_path,
        "--num-clients",
        "6",
        "--clients-per-round",
        "6",
        "--rounds",
        "4",
        "--min-clients",
        "6",
        "--min-available-clients",
        "6",
        "--secure-aggregation",
        "--round-timeout",
        "300",
        *dp,
    )
    proc = clients(
        tmp_path,
        port,
        range(6),
        "synthetic:6",
        "--hostile",
        "5=badshare:1",
        "4=other:2",
        "3=malformed:3",
        "2=twice:4",
        "0=differ:1",
        name="clients",
    )
    try:
        assert srv.wait() == 0, srv.text() + proc.text()
        log = srv.text()
        assert "round 1: client 5's share of client" in log and "does not match its commitment; refused" in log
        assert "task 1: refused the SA_KEYS of client 0: inputs_differ 'yes' is not true or false" in log
        assert "task 1: the sum of 5 masked updates" in log
        assert "task 2: refused a SA_SHARES from client 4 (for task 2, as client 5)" in log
        assert "task 2: the sum of 5 masked updates" in log
        assert "task 3: refused the SA_MASKED of client 3: the masked input must be" in log
        assert "task 3: the sum of 5 masked updates" in log
        assert "client 2 sent a message it was not asked for; its session is closed" in log
        assert "task 4: the sum of 6 masked updates" in log
        assert "failed" not in log
    finally:
        srv.kill()
        proc.kill()
    networked = json.loads((tmp_path / "runs" / "net" / "history.json").read_text())["rounds"]
    out = tmp_path / "sim"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fedforge",
            "run",
            "-q",
            *SETTINGS,
            "--num-clients",
            "6",
            "--clients-per-round",
            "6",
            "--rounds",
            "4",
            *dp,
            "--out-dir",
            str(out),
            "--name",
            "sim",
        ],
        check=True,
        capture_output=True,
        timeout=wait_bound(PROCESS_S),
    )
    simulated = json.loads((out / "sim" / "history.json").read_text())["rounds"]
    assert [r["metrics"]["epsilon"] for r in networked] == [r["metrics"]["epsilon"] for r in simulated]
    assert networked[-1]["metrics"]["epsilon"] > 0 and networked[-1]["test_loss"] < networked[0]["test_loss"] - 0.5


def test_a_hostile_client_is_named_and_put_out_and_every_round_completes(tmp_path):
    """Five clients, every one in each round (t = 3 of 5). Client 4 seals shares nobody can open
    (task 1); client 3 replays its sealed shares of the task before (from task 2 on); client 2
    reports a neighbour's good shares as unopenable (task 3); client 1 commits to a seed it does
    not share (task 4). Each is named, with why, and put out: the first three within their round
    (as dropouts), the fourth at unmasking, when the attempt fails and its retry goes on without it.
    Client 0 sends words past its bounds (task 2): masking hides whose they are, so the sum's words
    past any clipped inputs' reach are clamped to it, said in the log, and the round completes."""
    enroll_all(tmp_path, 5)
    srv, port = server(
        tmp_path,
        "--num-clients",
        "5",
        "--clients-per-round",
        "5",
        "--rounds",
        "4",
        "--min-clients",
        "5",
        "--min-available-clients",
        "5",
        "--min-fit-clients",
        "3",
        "--secure-aggregation",
        "--round-timeout",
        "60",
    )
    proc = clients(
        tmp_path,
        port,
        range(5),
        "synthetic:5",
        "--hostile",
        "4=garbage:1",
        "3=replay:*",
        "2=liar:3",
        "1=seed:4",
        "0=range:2",
        name="clients",
    )
    try:
        assert srv.wait() == 0, srv.text() + proc.text()
        log = srv.text()
        assert "task 1: client 4 is out of the round (treated as dropped): its shares for client" in log
        assert "task 1: the sum of 4 masked updates" in log
        assert "task 2: client 3 is out of the round (treated as dropped): its shares for client" in log
        assert "task 2: the sum of 4 masked updates" in log
        assert (
            "task 2: 3 words of the unmasked sum were past what 4 clipped inputs can reach: a client sent words "
            "past its bounds (masking hides which); clamped"
        ) in log
        assert (
            "task 3: refused the SA_MASKED of client 2: it reported client 0's shares, which open and match "
            "their commitments"
        ) in log
        assert "task 3: the sum of 3 masked updates" in log
        assert (
            "task 4: client 1 is left out of the retry: it dealt shares that do not give back the seed it committed to"
        ) in log
        assert "round 4, attempt 1 failed (secure aggregation: client 1 dealt shares" in log
        assert "task 5: client 1 is left out of this attempt" in log and "task 5: client 3 is left out" in log
        assert "task 5: the sum of 3 masked updates" in log
        assert "failed 10 times" not in log
    finally:
        srv.kill()
        proc.kill()
    history = json.loads((tmp_path / "runs" / "net" / "history.json").read_text())["rounds"]
    assert len(history) == 5 and history[-1]["test_loss"] < history[0]["test_loss"]  # round 0 and the four


def test_no_client_weighs_past_the_cap(tmp_path):
    """--secagg-max-examples 500 over synthetic:4 (103, 497, 958 and 1,962 examples): client 3
    weighs its update as 850 examples instead of the cap it owes (before, the sum's range check
    let it through with 850 of a weight of 1,950: 43.6 %). The weight it declares beside its
    masked input is refused, by name; the round sums the three others (103 + 497 + 500)."""
    enroll_all(tmp_path, 4)
    srv, port = server(
        tmp_path,
        "--num-clients",
        "4",
        "--clients-per-round",
        "4",
        "--rounds",
        "1",
        "--min-clients",
        "4",
        "--min-available-clients",
        "4",
        "--min-fit-clients",
        "3",
        "--secure-aggregation",
        "--secagg-max-examples",
        "500",
        "--round-timeout",
        "60",
    )
    proc = clients(tmp_path, port, range(4), "synthetic:4", "--hostile", "3=heavy:1", name="clients")
    try:
        assert srv.wait() == 0, srv.text() + proc.text()
        log = srv.text()
        assert "client 3: weighs as 850 examples in task 1" in proc.text()
        assert (
            "task 1: refused the SA_MASKED of client 3: its weight 850 is not between 1 and the round's cap 500" in log
        )
        assert "task 1: the sum of 3 masked updates (1 dropped; weight 1100, at most 500 each;" in log
    finally:
        srv.kill()
        proc.kill()


def test_a_client_declines_a_round_below_its_floor(tmp_path):
    """Two clients per round: each client (default floor: 3 participants) declines the round and
    says why, in its log and to the server; nothing of its update is sent. Every attempt declined,
    the server gives up with the last attempt's reason."""
    enroll_all(tmp_path, 2)
    srv, port = server(
        tmp_path,
        "--num-clients",
        "2",
        "--clients-per-round",
        "2",
        "--rounds",
        "1",
        "--min-clients",
        "2",
        "--min-available-clients",
        "2",
        "--secure-aggregation",
        "--round-timeout",
        "60",
    )
    proc = clients(tmp_path, port, range(2), "synthetic:2", name="clients")
    try:
        srv.wait_for(
            r"task 1: refused the SA_KEYS of client 1: it declines the round: .the round has 2 "
            r"participants, below this client.s floor of 3",
            timeout=600,
        )
        srv.wait_for(r"round 1, attempt 1 failed \(secure aggregation: 0 clients sent keys", timeout=600)
        proc.wait_for(
            r"client 0: left secure aggregation round 1: the round has 2 participants, below this "
            r"client's floor of 3: too small to hide its update",
            timeout=600,
        )
        assert srv.wait() == 2  # each attempt declined: the run gives up, saying why (fedforge: error: ...)
        assert "SA_SHARES" not in srv.text() and "SA_MASKED" not in srv.text()
        assert "round 1 failed 10 times; the last attempt: secure aggregation: 0 clients sent keys" in srv.text()
    finally:
        srv.kill()
        proc.kill()


def test_the_dashboard_names_a_client_put_out_and_why():
    """What the engine learns against a client (a report upheld, a seed it did not commit to)
    reaches the dashboard's task, once, with the reason, and leaves the client out of the retry."""
    from fedforge.engines.network import NetworkEngine
    from fedforge.network.dashboard import DashboardState

    board = DashboardState()
    engine = NetworkEngine(None, round_timeout=1, min_fit_clients=1, secure=SecureAggregation(), watcher=board)
    board.task(7, [0, 1, 2])
    for _ in range(2):
        engine._culprits(7, {2: "its shares for client 0 do not open"}, "out of the round (treated as dropped)")
    assert board.snapshot()["task"]["refused"] == [{"client": 2, "reason": "its shares for client 0 do not open"}]
    assert engine._left_out == {2: "its shares for client 0 do not open"}
