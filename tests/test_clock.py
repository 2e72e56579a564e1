"""The virtual clock: device profiles, task durations, deadlines and over-selection, in simulation."""

import itertools
import math

import numpy as np
import pytest
import torch
from helpers import assert_same_run, blobs
from torch import nn

from fedforge import ClientConfig, FederatedData, VectorizedEngine, simulate
from fedforge.algorithms import nbytes
from fedforge.clock import Clock, Work, synchronous_round
from fedforge.compare import ComparedRun, comparison_table
from fedforge.data import iid
from fedforge.devices import DeviceProfiles, Devices, draw_profiles, parse_availability, parse_distribution
from fedforge.errors import ConfigError, FedforgeError
from fedforge.history import History, RoundRecord
from fedforge.simulation import Progress
from fedforge.tasks import CLASSIFICATION

NUM_CLIENTS = 10


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def small(num_clients=NUM_CLIENTS):
    return FederatedData(blobs(600, seed=1), iid(600, num_clients, rng=np.random.default_rng(0)), blobs(200, seed=2))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def run(devices, rounds=3, **kwargs):
    return simulate(
        model(),
        small(),
        rounds=rounds,
        clients_per_round=4,
        client=ClientConfig(batch_size=10),
        devices=devices,
        seed=0,
        **kwargs,
    )


def profiles(speed, up=None, down=None, windows=None, period=None):
    n = len(speed)
    return DeviceProfiles(
        np.asarray(speed, dtype=float),
        np.asarray(up or [1.0] * n, dtype=float),
        np.asarray(down or [1.0] * n, dtype=float),
        tuple(windows or [None] * n),
        period,
    )


def test_a_task_takes_download_training_and_upload():
    clock = Clock(profiles([2.0], up=[100.0], down=[400.0]), step_seconds=0.5)
    time = clock.task(0, Work(steps=8, bytes_down=800, bytes_up=300))
    assert (time.download, time.train, time.upload) == (2.0, 2.0, 3.0)
    assert time.total == 7.0
    # 1 s left after 2 s down and 3 s up: two steps of 0.25 s at speed 2 fit, and no more.
    assert clock.steps_within(0, 6.0, Work(8, 800, 300)) == 4
    assert clock.steps_within(0, 5.0, Work(8, 800, 300)) == 0


def test_a_deadline_drops_the_late_and_over_selection_keeps_the_first_to_finish():
    clock = Clock(profiles([1.0, 0.5, 2.0, 0.25]), step_seconds=1.0)
    work = {c: Work(4, 0, 0) for c in range(4)}  # 4, 8, 2 and 16 seconds
    timing = synchronous_round(clock, 10.0, work, deadline=8.0)
    assert timing.kept == (0, 1, 2) and timing.late == (3,)
    assert timing.end == 18.0  # the server waited for client 3 until the deadline
    partial = synchronous_round(clock, 10.0, work, deadline=8.0, partial=True)
    assert partial.kept == (0, 1, 2, 3) and partial.partial == {3: 2}  # 2 steps of 4 s by the deadline
    assert partial.end == 18.0
    fastest = synchronous_round(clock, 0.0, work, keep=2)
    assert fastest.kept == (0, 2) and fastest.late == (1, 3) and fastest.end == 4.0
    assert synchronous_round(clock, 0.0, work).end == 16.0  # the slowest decides


def test_availability_windows():
    p = profiles([1.0, 1.0], windows=[((2.0, 5.0),), ((0.0, 1.0), (8.0, 10.0))], period=10.0)
    assert p.online_until(0, 1.0) is None and p.online_until(0, 3.0) == 5.0
    assert p.next_online(0, 6.0) == 12.0  # the next period's window
    assert p.online_until(1, 9.0) == 11.0  # a window across the period's end goes on
    assert p.online_until(1, 20.5) == 21.0
    once = profiles([1.0], windows=[((2.0, 5.0),)])  # a trace's: no period
    assert once.next_online(0, 6.0) == math.inf
    drawn = draw_profiles(
        1000,
        0,
        speed=parse_distribution("fixed", "s", median=1),
        up=parse_distribution("fixed", "u", median=1),
        down=parse_distribution("fixed", "d", median=1),
        availability=parse_availability("periodic:period=100,online=0.3"),
    )
    assert 0.25 < np.mean([drawn.online_until(c, 50.0) is not None for c in range(1000)]) < 0.35


def test_profiles_are_drawn_from_the_seed_each_quantity_from_its_own_stream():
    def drawn(seed, up="fixed:1e6"):
        return Devices(speeds="lognormal:sigma=1.0", uplink=up).profiles(100, seed)

    a, b = drawn(0), drawn(0)
    assert np.array_equal(a.speed, b.speed) and not np.array_equal(a.speed, drawn(1).speed)
    assert np.array_equal(drawn(0, up="lognormal:sigma=2.0").speed, a.speed)
    assert np.median(a.speed) == pytest.approx(1.0, rel=0.3) and a.speed.max() / a.speed.min() > 10


def test_the_same_seed_gives_the_same_virtual_times_and_weights():
    devices = Devices(speeds="lognormal:sigma=1.0", deadline=1.0, late="partial", over_select=0.5)
    a, b = run(devices), run(devices)
    times = a.history.column("virtual_time")
    assert times == b.history.column("virtual_time") and times[0] == 0.0
    assert all(later > earlier for earlier, later in itertools.pairwise(times))
    for name, value in a.state.params.items():
        assert torch.equal(value, b.state.params[name])


def test_the_engines_agree_on_the_clock():
    devices = Devices(speeds="lognormal:sigma=1.0", deadline=0.5, late="partial")
    sequential, vectorized = run(devices, rounds=2), run(devices, rounds=2, engine=VectorizedEngine())
    assert_same_run(sequential, vectorized)
    assert vectorized.history.column("virtual_time") == sequential.history.column("virtual_time")
    assert vectorized.history.column("dropped") == sequential.history.column("dropped")


def test_without_a_deadline_or_over_selection_the_clock_changes_nothing_of_the_training():
    plain, timed = run(None), run(Devices(speeds="lognormal:sigma=1.0"))
    assert "virtual_time" not in plain.history.final.metrics
    assert timed.history.column("clients") == plain.history.column("clients")
    for name, value in plain.state.params.items():
        assert torch.equal(value, timed.state.params[name])


def expected_times(devices, state_bytes, batch_size=10):
    """Each client's round time, computed here by the formula from its profile."""
    p = devices.profiles(NUM_CLIENTS, 0)
    steps = ClientConfig().local_epochs * math.ceil(60 / batch_size)  # 60 examples each
    return {
        c: state_bytes / p.down[c] + steps * devices.step_seconds / p.speed[c] + state_bytes / p.up[c]
        for c in range(NUM_CLIENTS)
    }


def test_a_deadline_drops_exactly_the_clients_whose_time_exceeds_it():
    deadline = 0.5
    devices = Devices(speeds="lognormal:sigma=1.0", deadline=deadline)
    result = run(devices, rounds=4)
    times = expected_times(devices, nbytes(result.state.params))
    late = [c for r in result.history.records[1:] for c in r.clients if times[c] > deadline]
    assert late, "the test needs clients that miss the deadline"
    for r in result.history.records[1:]:
        assert r.dropped == tuple(c for c in r.clients if times[c] > deadline)
        assert r.metrics["late_clients"] == len(r.dropped)
    ends = [r.metrics["virtual_time"] for r in result.history.records]
    for (earlier, later), r in zip(itertools.pairwise(ends), result.history.records[1:], strict=True):
        kept = [times[c] for c in r.clients if c not in r.dropped]
        assert later - earlier == pytest.approx(deadline if r.dropped else max(kept))


def test_a_late_client_with_partial_work_sends_the_steps_it_finished_by_the_deadline():
    deadline = 0.5
    devices = Devices(speeds="lognormal:sigma=1.0", deadline=deadline, late="partial")
    steps: list[tuple[int, int]] = []  # (client, its update's steps), each update
    result = run(devices, rounds=3, on_client=lambda u: steps.append((u.client_id, u.num_steps)))
    clock = Clock(devices.profiles(NUM_CLIENTS, 0), devices.step_seconds)
    sent = nbytes(result.state.params)
    full = math.ceil(60 / 10)
    cut = {c: clock.steps_within(c, deadline, Work(full, sent, sent)) for c in range(NUM_CLIENTS)}
    assert any(0 < cut[c] < full for c, _ in steps), "the test needs clients that send part of their work"
    assert all(n == cut[c] for c, n in steps)
    assert all(r.dropped == tuple(c for c in r.clients if cut[c] == 0) for r in result.history.records[1:])


def test_over_selection_keeps_the_fastest_k():
    devices = Devices(speeds="lognormal:sigma=1.0", over_select=0.5)
    result = run(devices, rounds=4)
    times = expected_times(devices, nbytes(result.state.params))
    for r in result.history.records[1:]:
        assert len(r.clients) == 6  # ceil(4 x 1.5)
        fastest = sorted(sorted(r.clients, key=lambda c: (times[c], c))[:4])
        assert tuple(c for c in r.clients if c not in r.dropped) == tuple(fastest)


def test_unavailable_clients_are_not_selected():
    devices = Devices(speeds="fixed:1", availability="periodic:period=10,online=0.3")
    result = run(devices, rounds=4)
    p = devices.profiles(NUM_CLIENTS, 0)
    for before, r in itertools.pairwise(result.history.records):
        now = before.metrics["virtual_time"]
        assert r.clients and all(p.online_until(c, now) is not None for c in r.clients)


def test_a_resumed_run_keeps_the_clock():
    devices = Devices(speeds="lognormal:sigma=1.0", deadline=0.6)
    whole = run(devices, rounds=4)
    saved: list[Progress] = []
    run(devices, rounds=2, checkpoint=saved.append)
    resumed = run(devices, rounds=4, resume=saved[-1])
    assert resumed.history.column("virtual_time") == whole.history.column("virtual_time")


def test_the_round_loop_refuses_what_over_selection_cannot_do():
    with pytest.raises(ConfigError, match="sampling fixed"):
        run(Devices(over_select=0.5), sampling="poisson")
    with pytest.raises(ConfigError, match=r"over_select must be in \[0, 10\]"):
        Devices(over_select=-1.0)


def test_compare_reports_virtual_time_to_target():
    def history(pairs):
        return History(
            [
                RoundRecord(round=i, clients=(), test_loss=1.0, test_accuracy=acc, metrics={"virtual_time": t})
                for i, (acc, t) in enumerate(pairs)
            ]
        )

    sync = ComparedRun("sync", None, history([(0.1, 0.0), (0.5, 10.0), (0.8, 20.0)]), 1.0, task=CLASSIFICATION)
    deadline = ComparedRun("deadline", None, history([(0.1, 0.0), (0.6, 4.0), (0.7, 8.0)]), 1.0, task=CLASSIFICATION)
    assert sync.time_to(0.6) == 20.0 and deadline.time_to(0.6) == 4.0 and deadline.time_to(0.9) is None
    table = comparison_table([sync, deadline], target=0.6)
    assert "| rounds to 0.6 | virtual s to 0.6 | virtual s |" in table
    assert "| sync | 0.8000 | 0.8000 | 2 | 20 | 20 |" in table
    assert "| deadline | 0.7000 | 0.7000 | 1 | 4 | 8 |" in table


def test_the_server_waits_for_a_client_to_come_online_and_stops_when_none_ever_will(tmp_path):
    def trace(windows):
        path = tmp_path / "trace.csv"
        rows = "".join(f"{c},1,1e6,1e6,{windows}\n" for c in range(NUM_CLIENTS))
        path.write_text("client,speed,up,down,availability\n" + rows)
        return path

    later = run(Devices(trace=trace("100-1000")), rounds=2)
    first = later.history.records[1]
    assert first.dropped == () and 100 < first.metrics["virtual_time"] < 101
    with pytest.raises(FedforgeError, match="no client is online at virtual time 1 or later"):
        run(Devices(trace=trace("0-0.1"), deadline=1.0), rounds=2)  # round 1: all leave; then none is back
    # Without a deadline the server waits for its clients until they leave: the clock moves on.
    with pytest.raises(FedforgeError, match=r"no client is online at virtual time 0\.1 or later"):
        run(Devices(trace=trace("0-0.1")), rounds=3)
