"""Differential privacy against a hostile server: a real `fedforge client` process on 127.0.0.1
answers a scripted server (the real Hub authenticates it and carries the messages; the test
writes each task, with the clip bound and noise multiplier it likes, and reads the update)."""

import re
import time

import pytest
import torch

from fedforge.client import ClientPlan
from fedforge.config import Config
from fedforge.engines.base import ClientTask
from fedforge.engines.network import task_message
from fedforge.errors import ConfigError
from fedforge.models import build_model
from fedforge.network.auth import load_tokens
from fedforge.network.hub import EventKind, Hub
from fedforge.network.welcome import ClientLimits
from fedforge.network.wire import Kind, Message, decode, encode
from fedforge.privacy import l2_norm, local_bound
from fedforge.secagg.protocol import ServerRound

CONFIG = Config(dataset="synthetic", num_clients=3, clients_per_round=3, model="logreg", batch_size=10, name="net")


@pytest.fixture
def client_flags() -> tuple[str, ...]:
    """Client 0's own flags (a test parametrizes them)."""
    return ()


@pytest.fixture
def scripted(cluster, tmp_path, client_flags):
    """The Hub with the welcome a server sends for CONFIG, client 0 connected to it."""
    settings = {k: v for k, v in CONFIG.__dict__.items() if v is not None}  # as fedforge server's welcome
    hub = Hub(load_tokens(tmp_path / "tokens.json"), welcome={"config": settings}, max_message_bytes=1 << 24)
    port = hub.start("127.0.0.1:0", None)
    client = cluster.client(0, port, *client_flags)
    assert hub.wait_for_clients(1, timeout=120), client.text()
    yield hub, client
    hub.stop(Message(Kind.SHUTDOWN, {"status": "done"}))


GLOBAL = build_model("logreg", (60,), 10, seed=0).state_dict()


def answer(hub: Hub, task_id: int, secagg: dict | None = None, **plan) -> dict[str, torch.Tensor] | None:
    """The delta client 0 sends for a task of `plan` (its clip and noise multiplier), or None when
    it closes the session instead; with `secagg`, the task opens a secure aggregation round of those
    settings."""
    task = ClientTask(0, None, 7, plan=ClientPlan(**plan))
    assert hub.send(hub.current(0), encode(task_message(task_id, task, GLOBAL, CONFIG.client_config(), secagg)))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        event = hub.events.get(timeout=max(deadline - time.monotonic(), 0.01))
        if event.kind == EventKind.CLOSED:
            return None
        if event.kind == EventKind.MESSAGE:
            message = decode(event.data)
            assert message.kind == Kind.UPDATE and message.header["task"] == task_id
            return {k[len("delta/") :]: v for k, v in message.tensors.items()}
    raise AssertionError("no update from client 0 in 120 s")


def test_the_server_cannot_choose_or_replay_a_clients_local_noise(scripted):
    """The same local-DP task twice (same global model, same seed, so the same training): the two
    updates differ by noise of std z*C*sqrt(2) per coordinate, drawn from the client's own OS
    source, and each stays within the bound the server clips at."""
    hub, _ = scripted
    z, clip = 0.5, 0.5
    a, b = (answer(hub, t, clip=clip, noise_multiplier=z) for t in (1, 2))
    size = sum(v.numel() for v in a.values())
    assert l2_norm(a) <= local_bound(clip, z, size) and l2_norm(b) <= local_bound(clip, z, size)
    difference = torch.cat([(a[k] - b[k]).flatten() for k in a])
    assert float(difference.std()) == pytest.approx(z * clip * 2**0.5, rel=0.15)


def test_a_server_that_asks_for_no_noise_or_no_clip_gets_what_it_asks(scripted):
    """Without --dp-min-noise the client applies the clip bound and noise multiplier each task asks
    for: its local DP then protects against a server that follows the protocol only. Noise 0: the
    update is clipped, not noised (the same task twice gives the same update); no clip bound: the
    raw update."""
    hub, _ = scripted
    clip = 0.05
    a, b = (answer(hub, t, clip=clip, noise_multiplier=0.0) for t in (1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a) and l2_norm(a) <= clip
    assert l2_norm(answer(hub, 3)) > 10 * clip


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"clip": 1e31, "noise_multiplier": 1.0}, "clip 1e+31 is not a number in [1e-30, 1e+30]"),
        ({"clip": 0.0, "noise_multiplier": 1.0}, "clip 0.0 is not a number in [1e-30, 1e+30]"),
        ({"clip": 1.0, "noise_multiplier": -1.0}, "noise_multiplier -1.0 is not a number in [0, 1e+06]"),
        ({"clip": 1.0, "noise_multiplier": 1e7}, "noise_multiplier 10000000.0 is not a number in [0, 1e+06]"),
    ],
)
def test_a_clip_bound_or_noise_multiplier_out_of_range_is_refused(scripted, plan, message):
    hub, client = scripted
    assert answer(hub, 1, **plan) is None
    client.wait_for(re.escape(message), timeout=120)  # one line, and nothing sent


FLOOR = ("--dp-min-noise", "1.0")
# a secure aggregation round's settings for client 0 (of 3): the client masks its update, it adds no noise
SECURE = ServerRound(9, [0, 1, 2], threshold=2, neighbours=2, clip=1.0, max_weight=1).setup(0).to_header()


@pytest.mark.parametrize("client_flags", [FLOOR])
@pytest.mark.parametrize(
    ("plan", "secagg", "message"),
    [
        (
            {"clip": 1.0, "noise_multiplier": 0.0},
            None,
            "task 1 asks for noise multiplier 0.0, below this client's --dp-min-noise 1",
        ),
        (
            {"clip": 1.0, "noise_multiplier": 0.5},
            None,
            "task 1 asks for noise multiplier 0.5, below this client's --dp-min-noise 1",
        ),
        ({}, None, "task 1 asks for no clip bound, and this client's --dp-min-noise 1 needs one"),
        (
            {"clip": 1.0, "noise_multiplier": 1.0},
            SECURE,
            "task 1 opens a secure aggregation round, in which this client adds no noise of its own (--dp-min-noise 1)",
        ),
    ],
)
def test_a_client_with_a_noise_floor_refuses_a_task_below_it_and_sends_nothing(scripted, plan, secagg, message):
    """Local DP against a hostile server: with --dp-min-noise the client's operator, not the
    server, sets the least noise its updates leave with. A task asking for less, for no clip
    bound (nothing to scale the noise to), or opening a secure aggregation round (where the
    client adds no noise itself) is refused: one logged line, nothing sent, exit status 3."""
    hub, client = scripted
    assert answer(hub, 1, secagg, **plan) is None
    assert client.wait() == 3, client.text()
    assert re.search(re.escape(message), client.text()), client.text()


@pytest.mark.parametrize("client_flags", [FLOOR])
def test_a_task_at_or_above_the_noise_floor_is_trained_and_noised(scripted):
    """At the floor and above it the client trains; the same task twice gives updates that differ
    by the noise the task asked for (std z*C*sqrt(2) per coordinate)."""
    hub, _ = scripted
    clip = 0.5
    for first, z in ((1, 1.0), (3, 2.0)):
        a, b = (answer(hub, t, clip=clip, noise_multiplier=z) for t in (first, first + 1))
        size = sum(v.numel() for v in a.values())
        assert l2_norm(a) <= local_bound(clip, z, size) and l2_norm(b) <= local_bound(clip, z, size)
        difference = torch.cat([(a[k] - b[k]).flatten() for k in a])
        assert float(difference.std()) == pytest.approx(z * clip * 2**0.5, rel=0.15)


@pytest.mark.parametrize("floor", [0, 0.0, -1.0, float("nan"), float("inf"), 2e6, True, "1"])
def test_a_noise_floor_out_of_range_is_one_line(floor):
    with pytest.raises(ConfigError, match=re.escape(f"dp-min-noise must be a number in (0, 1e6], got {floor!r}")):
        ClientLimits(min_noise=floor)
