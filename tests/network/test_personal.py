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

MLP = [*BASE[:-4], "--model", "mlp", "--batch-size", "10"]  # BASE with a model that has a body and a head
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
        cluster.client(i, server.port, "--state-dir", f"{name}-states", *client_flags, name=f"{name}-client-{i}")
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


@pytest.mark.parametrize("algorithm", ["fedper", "fedrep"])
def test_a_personalized_run_equals_the_simulation_and_sends_only_shared_entries(
    cluster, tmp_path, monkeypatch, algorithm
):
    flags = [*MLP, "--rounds", "3", "--algorithm", algorithm, "--fedrep-head-epochs", "2"]
    model, history, received = networked(cluster, tmp_path, monkeypatch, *flags)
    reference, _ = simulated(tmp_path, *flags)
    assert_same_model(model, reference)
    updates = [m for m in received if m.kind == Kind.UPDATE]
    assert len(updates) == 9
    body = {k for k in reference if k not in HEAD}
    for message in received:
        names = {n.partition("/")[2] for n in message.tensors}
        assert not names & set(HEAD), f"a {message.kind.name} carried the head"
        assert {n.partition("/")[0] for n in message.tensors} <= {"delta"}  # no extras, no client state
    assert all({n.partition("/")[2] for n in m.tensors} == body for m in updates)
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
    flags = [*MLP, "--rounds", "4", "--algorithm", "fedper", "--local-epochs", "10"]
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
    from fedforge.network.state import ClientKept, SavedState, save_state

    save_state(path, client_id, SavedState(run, {"name": "fedper", "options": {}}, 1, ClientKept(), ClientKept()))


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
    task = Message(Kind.TASK, {"task": 1, "seed": 7, "algorithm": {"name": "fedavg", "options": {}}}, tensors)
    with FakeServer([Message(Kind.WELCOME, {"config": SETTINGS}), task], reply_timeout=5) as server:
        proc = cluster.client(0, server.port, "--state-dir", "states", "--give-up-after", "5")
        assert proc.wait(120) == 2, proc.text()
    lines = [line for line in proc.text().splitlines() if "state" in line]
    assert len(lines) == 1 and reason in lines[0] and "Traceback" not in proc.text(), proc.text()
