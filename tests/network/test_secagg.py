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
    return Proc([sys.executable, str(HERE / "secagg_clients.py"), str(port), ",".join(map(str, ids)), partition,
                 *flags], tmp / f"{name}.log", tmp)


def server(tmp: Path, *flags) -> tuple[Proc, int]:
    proc = Proc([sys.executable, "-m", "fedforge", "server", "-q", "--threads", "1", "--tokens", "tokens.json",
                 "--address", "127.0.0.1:0", "--out-dir", "runs", "--name", "net", "--insecure", *SETTINGS, *flags],
                tmp / "server.log", tmp)
    return proc, int(proc.wait_for(r"listening on port (\d+)").group(1))


def test_clients_killed_at_every_stage_and_below_the_threshold(tmp_path):
    """10 clients, threshold 6 of 10. Each stage (after the key exchange, after sharing, after
    uploading) sees one client killed in one round and three at once in another; each round
    completes with the sum of those that uploaded. Then five killed after uploading: below the
    threshold, the round fails with nothing unmasked and is retried (they come back) to the end."""
    enroll_all(tmp_path, 10)
    srv, port = server(tmp_path, "--num-clients", "10", "--clients-per-round", "10", "--rounds", "4",
                       "--min-clients", "10", "--min-available-clients", "10", "--min-fit-clients", "5",
                       "--secure-aggregation", "--round-timeout", "300")
    procs = [clients(tmp_path, port, range(5), "synthetic:10", name="survivors")]
    schedules = {"one": ([9], ["keys:1", "shares:2", "upload:3", "upload:4", None]),
                 "three": ([6, 7, 8], ["shares:1", "upload:2", "keys:3", "upload:4", None]),
                 "fifth": ([5], ["upload:4", None])}
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
                    current[name] = clients(tmp_path, port, ids, "synthetic:10", *(["--die", die] if die else []),
                                            name=f"{name}-{len(procs)}")
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
    config = Config(dataset="synthetic", model="logreg", batch_size=10, num_clients=5, clients_per_round=5, rounds=1,
                    out_dir=str(tmp_path / "runs"), name="net")
    ports, outcome = [], []
    thread = threading.Thread(target=lambda: outcome.append(serve(
        config, address="127.0.0.1:0", tokens=load_tokens(tmp_path / "tokens.json"), tls=None, min_clients=5,
        min_fit_clients=None, round_timeout=300, max_message_bytes=1 << 24, progress=False,
        on_listening=ports.append, secure=SecureAggregation())), daemon=True)
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
    plain = simulate(model, data, rounds=1, clients_per_round=5, client=config.client_config(),
                     strategy=config.strategy_object(), seed=config.seed, on_client=updates.append)
    assert len(updates) == 5
    quantizer = SecureAggregation().quantizer(5, None)
    flat = {u.client_id: torch.cat([v.reshape(-1) for v in u.delta.values()]).double() for u in updates}
    quantized = {c: quantizer.encode(v.numpy(), updates[i].num_examples, True, updates[i].train_loss)
                 for i, (c, v) in enumerate(flat.items())}

    received = [(c, decode(data_)) for c, data_ in hubs[0].events.received]
    assert sorted(m.kind for _, m in received) == sorted([Kind.SA_KEYS, Kind.SA_SHARES, Kind.SA_MASKED,
                                                          Kind.SA_UNMASKED] * 5)
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
                assert not torch.allclose(signed[:len(flat[c])] / weights[c], flat[c], atol=1e-2)
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
    masked input twice: each is refused and logged and every round completes. The server noises
    the unmasked sum, and the accountant spends what the simulation's does."""
    enroll_all(tmp_path, 6)
    dp = ["--dp", "client", "--noise-multiplier", "0.3", "--clip", "0.5", "--delta", "0.01"]
    srv, port = server(tmp_path, "--num-clients", "6", "--clients-per-round", "6", "--rounds", "4",
                       "--min-clients", "6", "--min-available-clients", "6", "--secure-aggregation",
                       "--round-timeout", "300", *dp)
    proc = clients(tmp_path, port, range(6), "synthetic:6", "--hostile", "5=badshare:1", "4=other:2",
                   "3=malformed:3", "2=twice:4", name="clients")
    try:
        assert srv.wait() == 0, srv.text() + proc.text()
        log = srv.text()
        assert "round 1: client 5's share of client" in log and "does not match its commitment; refused" in log
        assert "task 1: the sum of 6 masked updates" in log
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
    subprocess.run([sys.executable, "-m", "fedforge", "run", "-q", *SETTINGS, "--num-clients", "6",
                    "--clients-per-round", "6", "--rounds", "4", *dp, "--out-dir", str(out), "--name", "sim"],
                   check=True, capture_output=True, timeout=wait_bound(PROCESS_S))
    simulated = json.loads((out / "sim" / "history.json").read_text())["rounds"]
    assert [r["metrics"]["epsilon"] for r in networked] == [r["metrics"]["epsilon"] for r in simulated]
    assert networked[-1]["metrics"]["epsilon"] > 0 and networked[-1]["test_loss"] < networked[0]["test_loss"] - 0.5
