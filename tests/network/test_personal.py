"""Personalized algorithms over the network: what travels, the clients' state on their disks, and
their own evaluation. The server runs in this process (so that every message it decodes can be
looked at); the clients are processes on 127.0.0.1, over real gRPC sockets."""

import json
import threading

import pytest
import torch
from cluster import BASE, free_port
from fake_server import FakeServer
from helpers import PROCESS_S, bound, wait_for

import fedforge.engines.network as network_engine
from fedforge.cli import main as fedforge
from fedforge.models import build_model
from fedforge.network.wire import Kind, Message

# A dataset that holds each client's test rows out (client_test_fraction), and a model with a body and a head.
MLP = ["--dataset", "digits", "--num-clients", "3", "--clients-per-round", "3", "--model", "mlp", "--batch-size", "10"]
HEAD = ("5.weight", "5.bias")  # the mlp's last layer: FedPer's and FedRep's personal entries


class TappedServer:
    """`fedforge server` in a thread of this process, every message its engine decodes kept."""

    def __init__(self, tmp_path, monkeypatch, *flags, name="net"):
        self.port = free_port()
        self.received = []
        decode = network_engine.decode

        def tap(data, **kwargs):
            message = decode(data, **kwargs)
            self.received.append(message)
            return message

        monkeypatch.setattr(network_engine, "decode", tap)
        argv = [
            "server",
            "-q",
            "--insecure",
            "--threads",
            "1",
            "--tokens",
            str(tmp_path / "tokens.json"),
            "--address",
            f"127.0.0.1:{self.port}",
            "--out-dir",
            str(tmp_path / "runs"),
            "--name",
            name,
            "--min-clients",
            "3",
            *flags,
        ]
        self.status = None
        self.thread = threading.Thread(target=self._run, args=(argv,), daemon=True)
        self.thread.start()
        self.run_dir = tmp_path / "runs" / name

    def _run(self, argv):
        self.status = fedforge(argv)

    def wait(self) -> int | None:
        self.thread.join(bound(PROCESS_S))
        return self.status


def simulated(tmp_path, *flags, name="sim"):
    assert (
        fedforge(["run", "-q", *flags, "--engine", "sequential", "--out-dir", str(tmp_path / "sim"), "--name", name])
        == 0
    )
    run_dir = tmp_path / "sim" / name
    return torch.load(run_dir / "model.pt"), json.loads((run_dir / "history.json").read_text())["rounds"]


def networked(cluster, tmp_path, monkeypatch, *flags, client_flags=(), name="net"):
    server = TappedServer(tmp_path, monkeypatch, *flags, name=name)
    clients = [
        cluster.client(
            i, server.port, "--state-dir", f"{name}-states", *client_flags, name=f"{name}-client-{i}", dataset="digits"
        )
        for i in range(3)
    ]
    assert server.wait() == 0, [c.text() for c in clients]
    assert all(c.wait() == 0 for c in clients), [c.text() for c in clients]
    model = torch.load(server.run_dir / "model.pt")
    history = json.loads((server.run_dir / "history.json").read_text())["rounds"]
    return model, history, server.received


def assert_same_model(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def traffic(history):
    return [sum(r["metrics"][k] for r in history[1:]) for k in ("bytes_up", "bytes_down")]


def personalized(history):
    return [{k: v for k, v in r["metrics"].items() if k.startswith("personalized_")} for r in history[1:]]


@pytest.mark.parametrize(
    "algorithm, roles, kept",
    [
        ("fedper", [], HEAD),
        ("fedrep", [], HEAD),
        ("ditto", [], ()),
        # A server's own role patterns travel with the algorithm's name: the head personal, the first
        # layer frozen (each client fills it from its own model: the same initial weights).
        ("fedavg", ["--personal", "5.*", "--frozen", "1.*"], (*HEAD, "1.weight", "1.bias")),
    ],
)
def test_a_personalized_run_equals_the_simulation_and_sends_only_shared_entries(
    cluster, tmp_path, monkeypatch, algorithm, roles, kept
):
    """The final shared weights and each round's personalized evaluation (each client's own model on
    its held-out rows, which it evaluates and reports) are the simulation's, and no message the
    server receives holds a personal entry or anything of a client's state."""
    flags = [
        *MLP,
        "--rounds",
        "3",
        "--algorithm",
        algorithm,
        "--fedrep-head-epochs",
        "2",
        "--client-test-fraction",
        "0.2",
        *roles,
    ]
    model, history, received = networked(cluster, tmp_path, monkeypatch, *flags)
    reference, simulated_history = simulated(tmp_path, *flags)
    assert_same_model(model, reference)
    mine, theirs = personalized(history), personalized(simulated_history)
    assert all(r.keys() == t.keys() and "personalized_accuracy_p50" in r for r, t in zip(mine, theirs, strict=True)), (
        mine,
        theirs,
    )
    for r, t in zip(mine, theirs, strict=True):
        assert r == pytest.approx(t, rel=1e-4, abs=1e-6)
    updates = [m for m in received if m.kind == Kind.UPDATE]
    assert len(updates) == 9 and all("personalized" in m.header for m in updates)
    personal = set(kept)
    assert model.keys() == {k for k in build_model("mlp", (60,), 10).state_dict() if k not in personal}
    for message in received:
        assert {n.partition("/")[0] for n in message.tensors} == {"delta"}  # no extras, no client state
        assert {n.partition("/")[2] for n in message.tensors} == model.keys(), "only the shared entries"
    if algorithm == "fedper":  # each of the 9 tasks and 9 updates is lighter than FedAvg's by the head
        whole, plain, _ = networked(cluster, tmp_path, monkeypatch, *MLP, "--rounds", "3", name="fedavg")
        head = sum(whole[k].numel() * whole[k].element_size() for k in HEAD)  # 2,600: 64 x 10 + 10 floats
        for mine, theirs in zip(traffic(history), traffic(plain), strict=True):
            assert 9 * head <= theirs - mine <= 9 * (head + 200), (mine, theirs)


def test_a_client_restarted_between_rounds_keeps_its_head(cluster, tmp_path, monkeypatch):
    """Client 0 (the fewest examples: it finishes first) is killed once its round-2 update is in,
    while the others still train, and started again with the same --state-dir: the run equals
    the uninterrupted simulation, so it trained round 3 from its own head."""
    accepted = []
    update_from = network_engine.update_from

    def tap(message, task, *args, **kwargs):
        update = update_from(message, task, *args, **kwargs)
        accepted.append((task.client_id, message.header["task"]))
        return update

    monkeypatch.setattr(network_engine, "update_from", tap)
    flags = [*BASE[:-4], "--model", "mlp", "--rounds", "4", "--algorithm", "fedper", "--local-epochs", "10"]
    server = TappedServer(tmp_path, monkeypatch, *flags, "--min-available-clients", "3")
    clients = [cluster.client(i, server.port, "--state-dir", "states") for i in range(3)]
    wait_for(lambda: (0, 2) in accepted, PROCESS_S, "client 0's round-2 update", clients[0].log, interval=0.01)
    clients[0].kill()
    assert (tmp_path / "states" / "client-0.pt").exists()
    again = cluster.client(0, server.port, "--state-dir", "states", name="client-0-again")
    assert server.wait() == 0, again.text()
    assert all(c.wait() == 0 for c in [again, *clients[1:]])
    assert "continues from its state" in again.text() and (0, 3) in accepted
    reference, _ = simulated(tmp_path, *flags)
    assert_same_model(torch.load(server.run_dir / "model.pt"), reference)


SETTINGS = {"seed": 0, "dataset": "synthetic", "num_clients": 3, "clients_per_round": 3, "model": "logreg"}


def saved(path, client_id=0, run="another run"):
    from fedforge.network.state import ClientKept, SavedState, write_state

    write_state(path, client_id, SavedState(run, {"name": "fedper", "options": {}}, 0, ClientKept(), 1, ClientKept()))


@pytest.mark.parametrize(
    "write, reason",
    [
        (lambda path: path.write_bytes(b"not a state" * 10), "is damaged or not a fedforge client's state"),
        (lambda path: (saved(path), path.write_bytes(path.read_bytes()[:-9])), "is damaged"),
        (lambda path: path.write_bytes(b"x" * (1 << 22)), "more than its model's state can"),
        (lambda path: saved(path, client_id=2), "it is client 2's, not this client's (0)"),
        (saved, "was kept in a run of other settings than the server's now"),
    ],
)
def test_a_damaged_or_foreign_state_file_is_refused_in_one_line(cluster, tmp_path, write, reason):
    (tmp_path / "states").mkdir()
    write(tmp_path / "states" / "client-0.pt")
    model = build_model("logreg", (60,), 10, seed=0)
    tensors = {f"global/{k}": v for k, v in model.state_dict().items()}
    task = Message(
        Kind.TASK, {"task": 1, "seed": 7, "counted": 0, "algorithm": {"name": "fedavg", "options": {}}}, tensors
    )
    with FakeServer([Message(Kind.WELCOME, {"config": SETTINGS}), task], reply_timeout=5) as server:
        proc = cluster.client(0, server.port, "--state-dir", "states", "--give-up-after", "5")
        assert proc.wait(120) == 2, proc.text()
    lines = [line for line in proc.text().splitlines() if "state" in line]
    assert len(lines) == 1 and reason in lines[0] and "Traceback" not in proc.text(), proc.text()


VALIDATION_APP = """
import numpy as np
import torch

import fedforge as ff
from fedforge.network.client import PartitionOf


def rows(client_id, config, held_out):
    data = PartitionOf("synthetic", client_id, 3).load(config)
    cut = len(data) * 4 // 5
    return data.subset(np.arange(cut, len(data)) if held_out else np.arange(cut))


def evaluate(module, data):  # a metric of the client's own: how often the personal model is right
    with torch.no_grad():
        return {"right": (module(data.x).argmax(1) == data.y).float().mean().item(), "count": float(len(data))}


APP = ff.ClientApp(
    data=lambda client_id, config: rows(client_id, config, False),
    validation=lambda client_id, config: rows(client_id, config, True),
    evaluate=evaluate,
)
"""


def test_clients_bring_their_own_validation_data_and_metric(cluster, tmp_path, monkeypatch):
    """The server holds none of its clients' held-out data (synthetic's clients hold none out): it
    records the personalized evaluation its clients report, each on its own validation rows with
    its own metric (ClientApp.validation, ClientApp.evaluate)."""
    (tmp_path / "validating.py").write_text(VALIDATION_APP)
    monkeypatch.chdir(tmp_path)
    server = TappedServer(tmp_path, monkeypatch, *BASE[:-4], "--model", "mlp", "--rounds", "2", "--algorithm", "fedper")
    clients = [cluster.app_client(i, server.port, "validating:APP") for i in range(3)]
    assert server.wait() == 0, [c.text() for c in clients]
    assert all(c.wait() == 0 for c in clients), [c.text() for c in clients]
    history = json.loads((server.run_dir / "history.json").read_text())["rounds"]
    sizes = [m.header["personalized"]["num_examples"] for m in server.received if m.kind == Kind.UPDATE]
    assert len(sizes) == 6 and all(0 < n < 250 for n in sizes)  # a fifth of each client's rows
    for record in personalized(history):
        assert set(record) == {f"personalized_{m}{q}" for m in ("right", "count") for q in ("", "_p10", "_p50", "_p90")}
        assert 0 <= record["personalized_right"] <= 1
        assert record["personalized_count_p50"] == sorted(set(sizes))[1]


def test_a_state_file_round_trips_and_must_fit_the_model_and_algorithm(tmp_path):
    from fedforge.algorithms import ClientState, FedPer, describe
    from fedforge.client import ClientConfig
    from fedforge.errors import ConfigError
    from fedforge.network.state import ClientKept, SavedState, check_state, read_state, write_state

    model = build_model("mlp", (64,), 10)
    head = {k: torch.randn_like(v) for k, v in model.state_dict().items() if k in HEAD}
    config = ClientConfig(algorithm=FedPer())
    path = tmp_path / "client-1.pt"
    pending = ClientKept(None, ClientState(head))
    write_state(path, 1, SavedState("run", describe(FedPer()), 2, ClientKept(), 4, pending))
    saved = read_state(path, 1, model)
    assert (saved.counted, saved.committed, saved.round) == (2, ClientKept(), 4)
    assert saved.pending.client is not None and all(
        torch.equal(saved.pending.client.personal[k], head[k]) for k in HEAD
    )
    check_state(saved, path, model, config, "run", describe(FedPer()))  # fits
    with pytest.raises(ConfigError, match="was kept by algorithm"):
        check_state(saved, path, model, ClientConfig(), "run", describe(ClientConfig().algorithm))
    wrong = {"5.weight": torch.zeros(3, 3), "5.bias": head["5.bias"]}  # another model's head
    write_state(
        path, 1, SavedState("run", describe(FedPer()), 2, ClientKept(), 4, ClientKept(None, ClientState(wrong)))
    )
    with pytest.raises(ConfigError, match=r"does not fit this run: .*5\.weight .*shape"):
        check_state(read_state(path, 1, model), path, model, config, "run", describe(FedPer()))


def test_secure_aggregation_masks_the_shared_entries_only(cluster, tmp_path, monkeypatch):
    """Under secure aggregation a FedPer client masks its body's update (the head stays with it):
    the run ends near the simulation's weights (the fixed point's round-off aside)."""
    flags = [*MLP, "--rounds", "2", "--algorithm", "fedper"]
    model, _, received = networked(cluster, tmp_path, monkeypatch, *flags, "--secure-aggregation")
    reference, _ = simulated(tmp_path, *flags)
    assert model.keys() == reference.keys() and not set(HEAD) & model.keys()
    for k in model:
        torch.testing.assert_close(model[k], reference[k], atol=1e-3, rtol=0)
    body = sum(v.numel() for v in reference.values())
    masked = [m.tensors["masked"] for m in received if m.kind == Kind.SA_MASKED]
    assert len(masked) == 6 and all(body <= t.numel() < body + 64 for t in masked), (body, masked[0].numel())
