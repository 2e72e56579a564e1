"""Asynchronous aggregation on the virtual clock: FedBuff and FedAsync (fedforge.asynchronous)."""

import itertools
import json
import math

import pytest
import torch
from test_clock import NUM_CLIENTS, model, small
from test_clock import run as run_sync

from fedforge import ClientConfig, VectorizedEngine, simulate
from fedforge.asynchronous import simulate_async
from fedforge.cli import main
from fedforge.config import Config
from fedforge.devices import Devices
from fedforge.engines import SequentialEngine
from fedforge.errors import ConfigError
from fedforge.privacy import DifferentialPrivacy
from fedforge.report import plot_history, round_line
from fedforge.scenarios import Scenario
from fedforge.simulation import Progress
from fedforge.staleness import AsyncSettings, FedAsync, FedBuff, Staleness, parse_staleness
from fedforge.strategies import FedAvg, FedAvgM, Krum


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def run_async(asynchronous, devices=None, rounds=6, data=None, clients_per_round=4, **kwargs):
    return simulate_async(
        model(),
        data or small(),
        asynchronous=asynchronous,
        rounds=rounds,
        clients_per_round=clients_per_round,
        client=ClientConfig(batch_size=10),
        devices=devices,
        seed=0,
        **kwargs,
    )


def assert_equal_weights(a, b):
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


HEAVY = Devices(speeds="lognormal:sigma=1.5")


def test_staleness_functions():
    assert Staleness("constant")(7) == 1.0
    assert parse_staleness("poly:a=0.5")(3) == pytest.approx(0.5)  # 1/sqrt(1+3)
    assert parse_staleness("poly")(0) == 1.0
    hinge = parse_staleness("hinge:a=2,b=1")
    assert [hinge(s) for s in (0, 1, 2, 3)] == [1.0, 1.0, pytest.approx(1 / 3), pytest.approx(1 / 5)]
    for bad in ("linear", "poly:a=x", "poly:b=1", "constant:a=1", "poly:a=-1", "poly:a=1,a=2", "hinge:c=1"):
        with pytest.raises(ConfigError, match="staleness"):
            parse_staleness(bad)


def test_the_same_seed_gives_the_same_events_and_weights():
    for asynchronous in (FedBuff(buffer_size=2, concurrency=5), FedAsync(alpha=0.5, concurrency=4)):
        a, b = run_async(asynchronous, HEAVY), run_async(asynchronous, HEAVY)
        assert a.events == b.events
        assert_equal_weights(a.state.params, b.state.params)
        times = a.history.column("virtual_time")
        assert times == b.history.column("virtual_time") and times[0] == 0.0
        assert all(later >= earlier for earlier, later in itertools.pairwise(times))
        assert len(a.history) == 7  # round 0 and six server steps
        # Heavy-tailed speeds: fast clients come back while slow ones are still at work.
        assert max(r.metrics["staleness_max"] for r in a.history.records[1:]) > 0
        # Never more than M at once; the sequence numbers are given in order.
        assert [e.seq for e in a.events if e.kind == "dispatch"] == sorted(
            e.seq for e in a.events if e.kind == "dispatch"
        )


def test_event_log_shape():
    result = run_async(FedBuff(buffer_size=2, concurrency=5), HEAVY)
    dispatched = {e.seq: e for e in result.events if e.kind == "dispatch"}
    arrived = [e for e in result.events if e.kind != "dispatch"]
    at_work = 0
    for event in result.events:
        at_work += 1 if event.kind == "dispatch" else -1
        assert 0 <= at_work <= 5
    for event in arrived:
        sent = dispatched[event.seq]
        assert (sent.client, sent.version) == (event.client, event.version) and event.time > sent.time
    assert [e.time for e in result.events] == sorted(e.time for e in result.events)
    # Each step took two updates, of the clients its record names.
    steps = [r.clients for r in result.history.records[1:]]
    assert all(len(clients) == 2 for clients in steps)
    assert [c for clients in steps for c in clients] == [e.client for e in arrived][: 2 * len(steps)]


@pytest.mark.parametrize("strategy", [FedAvg(), FedAvgM(server_lr=0.7, server_momentum=0.5)])
def test_fedbuff_with_equal_clients_and_k_m_per_round_is_the_synchronous_run(strategy):
    """Every client as fast and with as many examples: the four sent together arrive together, in
    the order they were sent, staleness 0 (weight 1), and the strategy steps from their
    example-weighted mean delta as a synchronous round does, from the same selection and batches."""
    devices = Devices(speeds="fixed:1")
    sync = run_sync(devices, rounds=3, strategy=strategy)
    buffered = run_async(FedBuff(buffer_size=4, concurrency=4), devices, rounds=3, strategy=strategy)
    assert_equal_weights(buffered.state.params, sync.state.params)
    assert buffered.history.column("clients") == sync.history.column("clients")
    assert buffered.history.column("virtual_time") == sync.history.column("virtual_time")
    assert buffered.history.column("test_accuracy") == sync.history.column("test_accuracy")
    assert all(r.metrics["staleness_max"] == 0 for r in buffered.history.records[1:])


def test_fedbuff_is_not_the_synchronous_run_when_speeds_differ():
    sync = run_sync(HEAVY, rounds=3)
    buffered = run_async(FedBuff(buffer_size=4, concurrency=4), HEAVY, rounds=3)
    assert not all(torch.equal(v, buffered.state.params[k]) for k, v in sync.state.params.items())


def test_fedasync_with_one_client_at_a_time_and_alpha_1_is_fedavg_of_one_client():
    devices = Devices(speeds="lognormal:sigma=1.0")
    sync = simulate(
        model(), small(), rounds=4, clients_per_round=1, client=ClientConfig(batch_size=10), devices=devices
    )
    mixed = simulate_async(
        model(),
        small(),
        asynchronous=FedAsync(alpha=1.0, concurrency=1),
        rounds=4,
        clients_per_round=1,
        client=ClientConfig(batch_size=10),
        devices=devices,
    )
    assert mixed.history.column("clients") == sync.history.column("clients")
    for name, value in sync.state.params.items():
        torch.testing.assert_close(mixed.state.params[name], value)
    assert mixed.history.column("virtual_time") == pytest.approx(sync.history.column("virtual_time"))


def two_clients(tmp_path, slow=0.3):
    """A trace of two clients, one `slow` times as fast, links so fast that training is all the time."""
    trace = tmp_path / "trace.csv"
    trace.write_text(f"client,speed,up,down,availability\n0,1,1e15,1e15,\n1,{slow},1e15,1e15,\n")
    return Devices(trace=trace)


@pytest.mark.parametrize("bound", [None, 2, 3])
def test_the_staleness_bound_drops_exactly_the_too_stale_updates(tmp_path, bound):
    """Client 0 is back every T, client 1 every T / 0.3 = 3.33 T: three of client 0's updates
    (three server steps, K = 1) have arrived by then, so each of client 1's is 3 versions stale
    (and client 0's next, sent before client 1's step, 1 when client 1's counted)."""
    result = run_async(
        FedBuff(buffer_size=1, concurrency=2, max_staleness=bound),
        two_clients(tmp_path),
        rounds=9,
        data=small(2),
        clients_per_round=1,
    )
    done = [e for e in result.events if e.kind != "dispatch"]
    slow = [e for e in done if e.client == 1]
    assert slow and all(e.staleness == 3 for e in slow)
    expected = "stale" if bound == 2 else "arrived"
    fast = [e.staleness for e in done if e.client == 0 and e.kind == "arrived"]
    assert len(fast) == len(done) - len(slow)
    assert set(fast) == ({0} if expected == "stale" else {0, 1})
    assert all(e.kind == expected for e in slow)
    stepped = [c for r in result.history.records[1:] for c in r.clients]
    assert (1 in stepped) == (expected == "arrived")
    dropped = sum(r.metrics["stale_dropped"] for r in result.history.records[1:])
    assert dropped == (len(slow) if expected == "stale" else 0)


def test_a_stale_update_counts_less():
    weights = [parse_staleness("poly:a=0.5")(s) for s in range(4)]
    assert weights == sorted(weights, reverse=True) and weights[0] == 1.0


def test_the_engines_agree():
    asynchronous = FedBuff(buffer_size=2, concurrency=5)
    sequential = run_async(asynchronous, HEAVY)
    vectorized = run_async(asynchronous, HEAVY, engine=VectorizedEngine())
    assert vectorized.events == sequential.events
    assert vectorized.history.column("clients") == sequential.history.column("clients")
    for name, value in sequential.state.params.items():
        torch.testing.assert_close(vectorized.state.params[name], value)


def test_unavailable_clients_are_not_sent_tasks_and_offline_ones_are_lost():
    devices = Devices(speeds="lognormal:sigma=1.0", availability="periodic:period=2,online=0.5")
    result = run_async(FedBuff(buffer_size=2, concurrency=4), devices, rounds=5)
    profiles = devices.profiles(NUM_CLIENTS, 0)
    for event in result.events:
        if event.kind == "dispatch":
            assert profiles.online_until(event.client, event.time) is not None
    assert result.events == run_async(FedBuff(buffer_size=2, concurrency=4), devices, rounds=5).events
    assert len(result.history) == 6


def test_evaluation_every_n_steps(tmp_path):
    result = run_async(FedBuff(buffer_size=2, eval_every=4), HEAVY, rounds=6)
    evaluated = [r.round for r in result.history.records if r.test_accuracy is not None]
    assert evaluated == [0, 4, 6]
    line = round_line(result.history.records[5], 6)
    assert "test accuracy" not in line and "virtual time" in line and "staleness" in line
    plot_history(result.history, tmp_path / "accuracy.png", x="virtual_time")  # the evaluated steps only
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert all(math.isfinite(r.metrics["virtual_time"]) for r in result.history.records)


def test_what_cannot_run_asynchronously_is_refused_in_one_line(tmp_path):
    buff = FedBuff(buffer_size=2)
    cases = [
        (dict(asynchronous=buff, strategy=Krum()), "FedBuff steps with the strategy's server optimizer"),
        (dict(asynchronous=FedAsync(), strategy=FedAvgM()), "FedAsync mixes"),
        (dict(asynchronous=FedBuff(buffer_size=11)), "buffer_size=11 is more than num_clients=10"),
        (dict(asynchronous=FedAsync(concurrency=11)), "concurrency=11 is more than"),
        (dict(asynchronous=buff, privacy=DifferentialPrivacy(noise_multiplier=1.0)), "differential privacy"),
        (dict(asynchronous=buff, scenario=Scenario(dropout=0.1)), "scenario"),
        (dict(asynchronous=buff, devices=Devices(deadline=1.0)), "round_deadline and over_select"),
        (dict(asynchronous=buff, resume=Progress(None, ())), "resuming an asynchronous run"),  # type: ignore[arg-type]
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            run_async(**kwargs)
        assert "\n" not in str(e.value)


def test_settings():
    assert AsyncSettings().asynchronous() is None
    assert AsyncSettings(aggregation="fedbuff", buffer_size=3, max_staleness=5).asynchronous() == FedBuff(
        3, None, max_staleness=5
    )
    assert AsyncSettings(aggregation="fedasync", async_alpha=0.3).asynchronous() == FedAsync(0.3)
    for kwargs, message in [
        (dict(buffer_size=3), "buffer_size is a setting of asynchronous runs"),
        (dict(aggregation="fedasync", buffer_size=3), "buffer_size is FedBuff's"),
        (dict(aggregation="fedbuff", async_alpha=0.3), "async_alpha is FedAsync's"),
        (dict(aggregation="fedbuff", buffer_size=0), "buffer_size must be >= 1"),
        (dict(aggregation="fedbuff", staleness="poly:a=x"), "staleness"),
        (dict(aggregation="fedasync", async_alpha=1.5), "async_alpha must be in"),
        (dict(aggregation="bogus"), "unknown aggregation"),
    ]:
        with pytest.raises(ConfigError, match=message):
            AsyncSettings(**kwargs)


def fedforge(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own exit
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


DIGITS = ["--dataset", "digits", "--num-clients", "20", "--clients-per-round", "4", "--rounds", "2"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--aggregation", "fedbuff", "--buffer-size", "21"], "buffer_size=21 is more than num_clients=20"),
        (["--aggregation", "fedasync", "--concurrency", "21"], "concurrency=21 is more than num_clients=20"),
        (["--aggregation", "fedbuff", "--strategy", "krum"], "strategy krum cannot"),
        (["--aggregation", "fedasync", "--strategy", "fedavgm"], "use strategy fedavg with server_lr 1"),
        (["--aggregation", "fedbuff", "--staleness", "linear"], "staleness must be constant, poly:a=A or hinge"),
        (["--aggregation", "fedbuff", "--max-staleness", "-1"], "max_staleness must be >= 0, got -1"),
        (["--buffer-size", "3"], "buffer_size is a setting of asynchronous runs"),
        (["--aggregation", "fedbuff", "--dp", "central", "--noise-multiplier", "1"], "differential privacy"),
        (["--aggregation", "fedbuff", "--dropout", "0.1"], "with a scenario is not supported yet"),
        (["--aggregation", "fedbuff", "--device-speeds", "fixed:1", "--round-deadline", "2"], "for synchronous"),
        (["--aggregation", "fedbuff", "--keep-optimizer-state"], "state kept"),
        (["--aggregation", "bogus"], "unknown aggregation 'bogus'"),
    ],
)
def test_bad_flags_one_line_exit_2(capsys, tmp_path, argv, message):
    code, _, err = fedforge(capsys, "run", "--out-dir", str(tmp_path), *DIGITS, *argv)
    assert code == 2, err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_command_line_runs_fedbuff_and_refuses_to_resume_it(capsys, tmp_path):
    argv = ["run", "--out-dir", str(tmp_path), "--name", "buff", *DIGITS, "--aggregation", "fedbuff"]
    code, _, err = fedforge(capsys, *argv, "--buffer-size", "2", "--device-speeds", "lognormal:sigma=1")
    assert code == 0, err
    history = json.loads((tmp_path / "buff" / "history.json").read_text())
    assert [r["metrics"]["virtual_time"] > 0 for r in history["rounds"][1:]] == [True, True]
    assert 'aggregation = "fedbuff"' in (tmp_path / "buff" / "config.toml").read_text()
    code, _, err = fedforge(capsys, "run", "--resume", str(tmp_path / "buff"))
    assert code == 2 and "resuming a run of aggregation fedbuff is not supported yet" in err


def test_the_toml_table(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'dataset = "digits"\n[asynchronous]\naggregation = "fedasync"\nasync_alpha = 0.4\nconcurrency = 3\n'
    )
    config = Config.load(path)
    assert config.asynchronous() == FedAsync(alpha=0.4, concurrency=3) and config.clocked
    path.write_text('dataset = "digits"\n[asynchronous]\naggregation = "fedbuff"\nbufer_size = 3\n')
    with pytest.raises(ConfigError, match="bufer_size"):
        Config.load(path)


class CountingEngine(SequentialEngine):
    """The sequential engine, counting the tasks of each call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def run(self, model, global_state, tasks, config):
        self.calls.append(len(tasks))
        return super().run(model, global_state, tasks, config)


def test_the_clients_sent_at_one_moment_go_to_the_engine_together():
    equal = CountingEngine()
    run_async(FedBuff(buffer_size=4, concurrency=4), Devices(speeds="fixed:1"), rounds=3, engine=equal)
    assert equal.calls == [4, 4, 4]  # every step frees all four slots at once
    heavy = CountingEngine()
    result = run_async(FedBuff(buffer_size=2, concurrency=5), HEAVY, engine=heavy)
    assert heavy.calls[0] == 5 and sum(heavy.calls) == sum(e.kind == "dispatch" for e in result.events)
