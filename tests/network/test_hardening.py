"""The deployment under attack and under faults: real processes and sockets on 127.0.0.1.

Each test reproduces one way a client, an anonymous caller or the network broke the server or
its promises before (issue 10), and checks that it no longer does.
"""

import json
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from cluster import BASE
from helpers import wait_for
from proxy import Proxy
from test_deployment import assert_same_model, simulated_model

from fedforge.experiment import load_checkpoint
from fedforge.network.hub import CLIENT_ID_KEY, METHOD, SECRET_KEY, AddressGuard
from fedforge.network.wire import Kind, decode


def open_session(port: int, client_id=None, secret=None, *, timeout: float = 120):
    """Open a session as a client does and read the server's first answer: (message, seconds)."""
    metadata = []
    if client_id is not None:
        metadata.append((CLIENT_ID_KEY, str(client_id)))
    if secret is not None:
        metadata.append((SECRET_KEY, secret))
    outbox = queue.Queue()
    started = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = channel.stream_stream(METHOD)(iter(outbox.get, None), metadata=metadata, timeout=timeout)
        try:
            return decode(next(call)), time.monotonic() - started
        finally:
            outbox.put(None)
            call.cancel()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def settled_peak_rss_mb(pid: int) -> float:
    """The peak RSS once the server has finished starting (it still grows for a second or two
    after it prints its port): the baseline of a memory bound."""
    previous = peak_rss_mb(pid)
    for _ in range(50):
        time.sleep(0.2)
        if (current := peak_rss_mb(pid)) == previous:
            return current
        previous = current
    return previous


def secret(tmp_path, i):
    return (tmp_path / f"client-{i}.token").read_text().strip()


def test_a_stale_disconnect_does_not_drop_the_new_session(cluster, tmp_path):
    """A client whose connection drops and comes back before round 1 is in round 1 with its
    real update: its old session's disconnect, still queued, must not count against the new one."""
    flags = ["--rounds", "3"]
    server, port = cluster.server("--insecure", "--min-clients", "3", *BASE, *flags)
    proxy = Proxy(port)
    first = cluster.client(0, proxy.port)
    server.wait_for("client 0 connected")
    assert proxy.cut() == 1
    server.wait_for("client 0 disconnected")
    first.wait_for("connection lost")
    server.wait_for(r"client 0 connected[^\n]*\n(.|\n)*client 0 connected")
    clients = [first] + [cluster.client(i, port) for i in (1, 2)]
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients)
    assert "mid-round" not in server.text()
    assert_same_model(torch.load(tmp_path / "runs" / "net" / "model.pt"), simulated_model(tmp_path, *flags))
    proxy.close()


def test_a_half_open_connection_is_replaced_by_the_client_s_new_session(cluster, tmp_path):
    """The network breaks on the client's side only: the server still holds the old, silent
    connection when the client comes back; the new session, with the right secret, replaces it."""
    flags = ["--rounds", "3"]
    server, port = cluster.server("--insecure", "--min-clients", "3", *BASE, *flags)
    proxy = Proxy(port)
    first = cluster.client(0, proxy.port)
    server.wait_for("client 0 connected")
    assert proxy.cut(server_side=False) == 1
    first.wait_for("connection lost")
    server.wait_for("client 0: a new session from .* replaces the one from")
    clients = [first] + [cluster.client(i, port) for i in (1, 2)]
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients)
    assert_same_model(torch.load(tmp_path / "runs" / "net" / "model.pt"), simulated_model(tmp_path, *flags))
    proxy.close()


def test_a_task_held_by_a_replaced_session_is_sent_again(cluster, tmp_path):
    """A client that reconnects while it owes an update gets its task again on the new session,
    and its answer counts: the round has every update."""
    server, port = cluster.server("--insecure", "--min-clients", "3", "--rounds", "1", "--round-timeout", "300", *BASE)
    cluster.client(0, port), cluster.client(1, port)
    stub = cluster.stub(2, port, "reconnect,zero")
    assert server.wait() == 0, server.text()
    assert "task 1: client 2 reconnected; its task is sent again" in server.text()
    assert "task 1: 3 of 3 updates" in server.text()
    assert stub.text().count("task 1") == 2  # asked twice: the answer on its new session counted
    stub.kill()


def answer(call) -> str:
    """How the server answered `call`: "refused" (our refusal, or gRPC's own for a message past
    the size limit or a stream past the connection's limit) or the status it ended with."""
    try:
        message = decode(next(call))
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return "refused"
        return e.code().name
    return (
        "refused"
        if message.kind == Kind.REJECT and message.header["reason"] == "authentication failed"
        else message.kind.name
    )


def test_a_client_that_sends_more_than_it_was_asked_for_loses_its_session(cluster, tmp_path):
    server, port = cluster.server("--insecure", "--min-clients", "3", "--min-fit-clients", "2", "--rounds", "2", *BASE)
    cluster.client(0, port), cluster.client(1, port)
    stub = cluster.stub(2, port, "twice")
    assert server.wait() == 0, server.text()
    assert "client 2 sent a message it was not asked for; its session is closed" in server.text()
    assert "task 1: 3 of 3 updates" in server.text()  # its first answer counted
    stub.kill()


def test_idle_unauthenticated_streams_and_sockets_do_not_lock_clients_out(cluster, tmp_path):
    """200 gRPC streams that never authenticate (over one connection and over many) and 200
    sockets that never finish a handshake, all at once: an enrolled client is still welcomed at
    once, and the server never buffers a stranger's 60 MB message."""
    server, port = cluster.server("--insecure", "--min-clients", "3", "--rounds", "2", "--max-message-mb", "16", *BASE)
    before = settled_peak_rss_mb(server.popen.pid)
    local = [("grpc.use_local_subchannel_pool", 1)]  # a connection each
    shared = grpc.insecure_channel(f"127.0.0.1:{port}", options=local)
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=local) for _ in range(100)]
    huge = grpc.insecure_channel(f"127.0.0.1:{port}", options=[*local, ("grpc.max_send_message_length", 1 << 30)])
    never = threading.Event()

    def silent():
        never.wait()
        yield b""

    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    try:
        # The strangers hold on for 60 s (the handshakes for the server's 20 s): a client locked out
        # until they give up would wait that long. Welcomed "at once" is a bound below both that
        # leaves a loaded machine its margin (an idle one answers in milliseconds).
        calls = [c.stream_stream(METHOD)(silent(), timeout=60) for c in channels]
        over_one = [shared.stream_stream(METHOD)(silent(), timeout=60) for _ in range(100)]
        big = huge.stream_stream(METHOD)(iter([b"\0" * (60 << 20)]), timeout=120)
        welcome, seconds = open_session(port, 0, secret(tmp_path, 0))
        assert welcome.kind == Kind.WELCOME and seconds < 10
        assert [answer(call) for call in calls] == ["refused"] * 100
        assert answer(big) == "refused"
        # One connection gets a few streams at a time; any that waited past their deadline for a slot
        # never reached the server at all.
        over_one = [answer(call) for call in over_one]
        assert set(over_one) <= {"refused", "DEADLINE_EXCEEDED"} and "refused" in over_one
        # 60 MB were sent; none of it was kept (the peak once it stops growing).
        assert settled_peak_rss_mb(server.popen.pid) - before < 30
        clients = [cluster.client(i, port) for i in range(3)]
        welcome, seconds = open_session(port, 3, secret(tmp_path, 3))
        assert welcome.kind == Kind.WELCOME and seconds < 10
        assert server.wait() == 0, server.text()
        assert all(c.wait() == 0 for c in clients)
    finally:
        never.set()
        for s in sockets:
            s.close()
        for c in [shared, huge, *channels]:
            c.close()


def test_a_huge_secret_is_refused_before_it_is_read(cluster, tmp_path):
    server, port = cluster.server("--insecure", "--min-clients", "1", "--rounds", "1", *BASE)
    before = settled_peak_rss_mb(server.popen.pid)
    with pytest.raises(grpc.RpcError):
        open_session(port, 0, "x" * (100 << 20))
    # Far below the secret's 100 MB (gRPC's transport buffers vary with the machine's load).
    assert settled_peak_rss_mb(server.popen.pid) - before < 60
    welcome, _ = open_session(port, 0, secret(tmp_path, 0))
    assert welcome.kind == Kind.WELCOME


def test_failed_guesses_from_one_address_are_limited(cluster, tmp_path):
    server, port = cluster.server("--insecure", "--min-clients", "1", "--rounds", "1", *BASE)
    answers = [open_session(port, i % 4, "guess")[0].header for i in range(12)]
    assert all(a == {"reason": "authentication failed", "retry": False} for a in answers[:10])
    assert answers[10]["retry"] is True and "too many failed attempts" in answers[10]["reason"]
    # Blocked: even the right secret is not checked (so guesses cannot go on), only refused for now,
    # and an enrolled client keeps trying with back-off instead of giving up.
    assert open_session(port, 0, secret(tmp_path, 0))[0].kind == Kind.REJECT
    assert "too many failed authentications from this address" in server.text()
    patient = cluster.client(0, port)
    patient.wait_for("the server says: too many failed attempts from this address; try later")
    patient.wait_for(r"(the server says: too many failed attempts[^\n]*\n(.|\n)*){2}")
    assert patient.popen.poll() is None


def test_address_guard_forgets_after_the_window():
    now = [0.0]
    guard = AddressGuard(limit=3, window=10, max_addresses=2, clock=lambda: now[0])
    for _ in range(3):
        assert not guard.blocked("a")
        guard.failed("a")
    assert guard.blocked("a") and not guard.blocked("b")
    now[0] = 10.5
    assert not guard.blocked("a")
    guard.failed("b"), guard.failed("c"), guard.failed("d")
    assert len(guard._failures) == 2  # bounded memory: the oldest addresses are forgotten


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at tmp_path/disk (root only): a disk that can be filled."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs root to mount a tmpfs")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_stops_the_server_with_one_line_and_clients_learn_it_failed(cluster, tmp_path, small_disk):
    server, port = cluster.server(
        "--insecure", "--min-clients", "3", "--rounds", "5000", *BASE, "--out-dir", str(small_disk)
    )
    clients = [cluster.client(i, port) for i in range(3)]
    server.wait_for(r"\(3 connected\)")  # the run's three, before the waiter could take one's place
    waiter = cluster.client(3, port, "--retry-on-server-failure", "--give-up-after", "3", name="waiter", part=0)
    server.wait_for(r"\(4 connected\)")
    history = small_disk / "net" / "history.json"
    # Round 3 in the history: round 2's checkpoint is on disk (it is written before round 3 runs).
    wait_for(
        lambda: history.exists() and len(json.loads(history.read_text())["rounds"]) >= 4,
        300,
        "round 3 in history.json",
        server.log,
        interval=0.02,
    )
    with (small_disk / "filler").open("wb") as f, pytest.raises(OSError):  # the disk fills up mid-run
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    assert server.wait() == 1, server.text()
    errors = [line for line in server.text().splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and re.fullmatch(
        rf"fedforge: error: cannot write {small_disk}/net/\S+: No space left on "
        "device",
        errors[0],
    ), server.text()
    assert "Traceback" not in server.text()
    assert all(c.wait() == 3 for c in clients)
    assert all("the server's run failed: cannot write" in c.text() for c in clients)
    assert waiter.wait() == 2 and "waiting for it to come back" in waiter.text()
    (small_disk / "filler").unlink()
    checkpoint = load_checkpoint(small_disk / "net", "cpu")  # the last good one, whole
    state, saved = checkpoint.state, checkpoint.history
    assert state.round >= 2 and saved.final.round == state.round
    assert not [p for p in (small_disk / "net").iterdir() if p.name.endswith(".tmp")]


def test_a_read_only_output_folder_is_refused_before_listening(cluster, tmp_path, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    proc = cluster.start(
        "server",
        [
            sys.executable,
            "-m",
            "fedforge",
            "server",
            "-q",
            "--tokens",
            "tokens.json",
            "--insecure",
            "--address",
            "127.0.0.1:0",
            "--out-dir",
            str(small_disk),
            "--name",
            "net",
            *BASE,
        ],
    )
    assert proc.wait() == 1
    assert proc.text().splitlines()[-1] == (
        f"fedforge: error: cannot write {small_disk}/net/.write-check: Read-only file system"
    )
    assert "listening" not in proc.text()
