"""Server and clients as separate processes on 127.0.0.1, over real gRPC sockets: killed clients
and servers, resumes, and the client state of the updates that counted. A file of its own, beside
test_deployment.py, so that the two run in parallel test processes."""

import io
import json
import signal
import time

import torch
from cluster import BASE, free_port
from helpers import wait_for
from test_deployment import assert_same_model, simulated_model

from fedforge.models import build_model
from fedforge.network.state import read_state


def test_killing_a_client_mid_round_does_not_hang_the_round(cluster, tmp_path):
    server, port = cluster.server(
        "--insecure", "--min-clients", "3", "--min-fit-clients", "2", "--rounds", "3", "--round-timeout", "600", *BASE
    )
    clients = [cluster.client(0, port), cluster.client(1, port)]
    stuck = cluster.stub(2, port, "hang")
    stuck.wait_for("task 1")
    started = time.monotonic()
    stuck.kill()  # kill -9 while it holds round 1's task
    server.wait_for("client 2 disconnected mid-round; dropped from the round")
    # Dropped on its disconnect: well before the round timeout (600 s), whatever the machine's load.
    assert time.monotonic() - started < 300
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients)


def test_a_frozen_client_is_dropped_by_keepalive(cluster, tmp_path):
    """A client that stops answering without closing its connection (SIGSTOP: a frozen machine,
    a cut cable) is noticed by the keep-alive ping and dropped, long before the round timeout."""
    server, port = cluster.server(
        "--insecure",
        "--min-clients",
        "3",
        "--min-fit-clients",
        "2",
        "--rounds",
        "2",
        "--round-timeout",
        "600",
        "--keepalive",
        "5",
        *BASE,
    )
    clients = [cluster.client(0, port), cluster.client(1, port)]
    frozen = cluster.stub(2, port, "hang")
    frozen.wait_for("task 1")
    started = time.monotonic()
    frozen.popen.send_signal(signal.SIGSTOP)  # the process lives on, its connection stays open
    server.wait_for("client 2 disconnected mid-round; dropped from the round")
    # By the keep-alive (a ping after 5 s, unanswered for 2.5 s), not the round timeout (600 s):
    # the margin is for a loaded machine, where the live clients get 2.5 s to answer a ping (not 1 s).
    assert time.monotonic() - started < 300
    assert server.wait() == 0, server.text()
    assert frozen.popen.poll() is None  # nothing closed it: the server noticed on its own
    assert all(c.wait() == 0 for c in clients)


def test_server_killed_after_round_2_resumes_to_the_same_result(cluster, tmp_path):
    flags = ["--rounds", "5", "--local-epochs", "20"]
    port = free_port()
    server, _ = cluster.server("--insecure", "--min-clients", "3", *BASE, *flags, port=port)
    clients = [cluster.client(i, port) for i in range(3)]
    history = tmp_path / "runs" / "net" / "history.json"
    wait_for(
        lambda: history.exists() and len(json.loads(history.read_text())["rounds"]) >= 3,
        300,
        "round 2 in history.json",
        server.log,
        interval=0.02,
    )
    server.kill()  # kill -9 after round 2
    done = len(json.loads(history.read_text())["rounds"]) - 1
    assert 2 <= done < 5
    resumed, _ = cluster.server("--insecure", "--min-clients", "3", "--resume", "runs/net", port=port, name="resumed")
    assert resumed.wait() == 0, resumed.text()
    assert all(c.wait() == 0 for c in clients)
    assert any("connection lost" in c.text() for c in clients)  # they reconnected on their own
    rounds = json.loads(history.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4, 5]
    # Clients train as the sequential engine does (20 local epochs would grow the round-off
    # between the two engines past assert_close's tolerance).
    reference = simulated_model(tmp_path, *flags, "--engine", "sequential")
    assert_same_model(torch.load(tmp_path / "runs" / "net" / "model.pt"), reference)


def pending_round(path) -> int:
    """The round of the pending state in a client's state file (0: none, or no file yet)."""
    from fedforge.network.state import STATE_MAGIC

    if not path.exists():
        return 0
    data = path.read_bytes()
    return torch.load(io.BytesIO(data[len(STATE_MAGIC) + 32 :]), weights_only=True)["round"]


def test_a_stateful_run_whose_server_is_killed_and_resumed_equals_the_simulation(cluster, tmp_path):
    """SCAFFOLD: each client keeps its control variate c_i on its disk. The server is killed once
    round 2 is checkpointed and a client has trained round 3 (its c_i of round 3 pending, which the
    server never counted), and resumed from round 2's checkpoint: the clients drop what it did not
    count and train round 3 again from their state of round 2, so the run is the uninterrupted
    simulation's to the bit."""
    flags = ["--rounds", "4", "--local-epochs", "20", "--strategy", "scaffold"]
    port = free_port()
    server, _ = cluster.server("--insecure", "--min-clients", "3", *BASE, *flags, port=port)
    clients = [cluster.client(i, port, "--state-dir", "states") for i in range(3)]
    history = tmp_path / "runs" / "net" / "history.json"
    files = [tmp_path / "states" / f"client-{i}.pt" for i in range(3)]
    wait_for(
        lambda: (
            history.exists()
            and len(json.loads(history.read_text())["rounds"]) >= 3
            and any(pending_round(f) == 3 for f in files)
        ),
        300,
        "round 2 in history.json and a client's pending state of round 3",
        server.log,
        interval=0.01,
    )
    server.kill()  # kill -9 in round 3, before its updates are counted
    assert len(json.loads(history.read_text())["rounds"]) - 1 == 2
    resumed, _ = cluster.server("--insecure", "--min-clients", "3", "--resume", "runs/net", port=port, name="resumed")
    assert resumed.wait() == 0, resumed.text()
    assert all(c.wait() == 0 for c in clients), [c.text() for c in clients]
    dropped = [c for c in clients if "the server has not counted its update of round 3" in c.text()]
    assert dropped, [c.text() for c in clients]
    assert [pending_round(f) for f in files] == [0, 0, 0]  # the finished run's word committed round 4's
    reference = simulated_model(tmp_path, *flags, "--engine", "sequential")
    final = torch.load(tmp_path / "runs" / "net" / "model.pt")
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)


def test_a_client_whose_updates_are_refused_commits_nothing_of_them(cluster, tmp_path):
    """Client 2 (958 examples) claims more than --max-client-examples allows: the server refuses each
    of its SCAFFOLD updates, and rounds go on with the other two. Each task tells it that none of its
    updates counted, so it drops what each trained and keeps its first state (as the simulation
    keeps nothing of an update that did not count); the others commit every round's."""
    rounds = 3
    server, port = cluster.server(
        "--insecure",
        "--min-clients",
        "3",
        "--min-fit-clients",
        "2",
        "--max-client-examples",
        "900",
        "--rounds",
        str(rounds),
        "--strategy",
        "scaffold",
        *BASE,
    )
    clients = [cluster.client(i, port, "--state-dir", "states") for i in range(3)]
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients), [c.text() for c in clients]
    assert server.text().count("refused the update of client 2: num_examples 958") == rounds
    for r in range(1, rounds):
        assert (
            f"the server has not counted its update of round {r}: it starts task {r + 1} from its state of round 0"
            in (clients[2].text())
        )
    model = build_model("logreg", (60,), 10, seed=0)
    kept = [read_state(tmp_path / "states" / f"client-{i}.pt", i, model) for i in range(3)]
    assert [(k.counted, k.pending) for k in kept] == [(rounds, None), (rounds, None), (0, None)]
    assert kept[2].committed.client is None  # its first state: nothing of its updates
    assert all(k.committed.client is not None and k.committed.client.algorithm for k in kept[:2])
