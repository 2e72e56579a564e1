"""Personalized algorithms over the network: what travels, the clients' state on their disks, and
their own evaluation. The server runs in this process (so that every message it decodes can be
looked at); the clients are processes on 127.0.0.1, over real gRPC sockets."""

import json
import threading

import pytest
import torch
from cluster import BASE, free_port
from helpers import PROCESS_S, bound

import fedforge.engines.network as network_engine
from fedforge.cli import main as fedforge
from fedforge.network.wire import Kind

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
    clients = [cluster.client(i, server.port, *client_flags, name=f"{name}-client-{i}") for i in range(3)]
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
