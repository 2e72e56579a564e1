"""The Ray engine against the in-process one: same clients, same batches, same final weights; faults; errors.

One local Ray for the module (2 CPUs); workers take half a CPU each so that three fit.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import socket
import sys
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from ray_problem import (  # noqa: E402
    SEED,
    WORKER_ENV,
    Net,
    assert_same_kept,
    assert_same_run,
    blobs_data,
    failing_data,
    run,
)

from fedforge.checkpoint import load_checkpoint  # noqa: E402
from fedforge.cli import main  # noqa: E402
from fedforge.engines import AutoEngine  # noqa: E402
from fedforge.engines.ray import RayEngine, assign, holdings, shares  # noqa: E402
from fedforge.errors import ConfigError, FedforgeError  # noqa: E402
from fedforge.privacy.run import DifferentialPrivacy  # noqa: E402
from fedforge.scenarios import Scenario  # noqa: E402
from fedforge.schedules import Cosine  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env=WORKER_ENV)
    yield
    ray.shutdown()


@functools.cache
def in_process(strategy, scenario=Scenario()):
    return run(AutoEngine(), strategy, scenario)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_same_run_as_in_process(workers):
    threads = torch.get_num_threads()
    # One engine serves the four runs: its workers load the data once, whatever the strategy.
    with RayEngine(blobs_data, seed=SEED, workers=workers, cpus_per_worker=0.5) as engine:
        # This process computes with the CPUs its workers (all on this machine) leave, at least one.
        assert torch.get_num_threads() == min(threads, max(1, int(len(os.sched_getaffinity(0)) - 0.5 * workers)))
        assert len({p["pid"] for p in engine.placement}) == workers
        # Each worker holds its own clients only: consecutive ranges that together are every client and
        # row, each reaching a little into its neighbour's (those clients go to either).
        data = blobs_data()
        clients = [p["clients"] for p in engine.placement]
        rows = [p["rows"] for p in engine.placement]
        assert clients[0][0] == 0 and clients[-1][1] == data.num_clients and rows[-1][1] == len(data.train)
        assert all(b[0] < a[1] < b[1] for a, b in itertools.pairwise(clients))
        assert all(b[0] < a[1] < b[1] for a, b in itertools.pairwise(rows))
        if workers > 1:
            assert max(b - a for a, b in rows) < 0.75 * len(data.train)
        for strategy in ("fedavg", "fedadam", "scaffold", "krum"):
            assert_same_run(run(engine, strategy), in_process(strategy))
        # An update attack: the attackers' own updates come back one by one, the honest ones summed.
        sign_flip = Scenario(attack="sign_flip", malicious_fraction=0.25, attack_scale=3.0)
        assert_same_run(run(engine, "fedavg", sign_flip), in_process("fedavg", sign_flip))
        # The workers check their pool against the driver's: here theirs lacks label_flip's poisoned labels.
        with pytest.raises(ConfigError, match=r"^a Ray worker loaded other data than the driver .*same dataset"):
            run(engine, scenario=Scenario(attack="label_flip", malicious_fraction=0.25), rounds=1)
        assert_same_run(run(engine, rounds=1), run(AutoEngine(), rounds=1))  # and the engine still works
    assert torch.get_num_threads() == threads  # as before the engine


def test_a_learning_rate_schedule_reaches_the_workers_round_by_round():
    # The Ray engine works ahead: each round's config (its lr) is the one its tasks were sent with.
    schedule = Cosine(min_lr=0.001).round_config
    with RayEngine(blobs_data, seed=SEED, workers=2, cpus_per_worker=0.5) as engine:
        on_ray = run(engine, "scaffold", rounds=4, round_config=schedule)
    in_process = run(AutoEngine(), "scaffold", rounds=4, round_config=schedule)
    assert_same_run(on_ray, in_process)
    assert on_ray.history.column("lr") == in_process.history.column("lr")
    assert len(set(on_ray.history.column("lr")[1:])) == 4
    assert not torch.equal(
        on_ray.state.params["net.0.weight"], run(AutoEngine(), "scaffold", rounds=4).state.params["net.0.weight"]
    )


def test_scenarios_work_unchanged():
    scenario = Scenario(straggler_fraction=0.3, dropout=0.2, attack="label_flip", malicious_fraction=0.25)
    with RayEngine(blobs_data, seed=SEED, scenario=scenario, workers=2, cpus_per_worker=0.5) as engine:
        assert_same_run(run(engine, "fedavg", scenario), in_process("fedavg", scenario))
        assert_same_run(run(engine, "krum", scenario), in_process("krum", scenario))
        # Differential privacy: the round loop clips and noises each update, so they come back one by one.
        privacy = DifferentialPrivacy(mode="client", clip=0.5, noise_multiplier=0.3, delta=1e-3)
        assert_same_run(
            run(engine, "fedadam", scenario, privacy=privacy), run(AutoEngine(), "fedadam", scenario, privacy=privacy)
        )


@pytest.mark.parametrize("strategy", ["fedadam", "scaffold"])
def test_a_worker_killed_mid_round_is_restarted_and_the_run_is_unchanged(tmp_path, strategy):
    # SCAFFOLD's clients keep their control variates on their worker: a restarted one reads them back.
    trap = tmp_path / "trap"
    with RayEngine(blobs_data, seed=SEED, workers=2, cpus_per_worker=0.5) as engine:
        pids = [p["pid"] for p in engine.placement]

        def on_round(record, state):
            if record.round == 1:
                trap.touch()  # round 2: the first worker to train dies in its forward pass
            if record.round == 2:
                assert not trap.exists()
                ray.kill(engine.actors[1], no_restart=False)  # and between rounds, by Ray's own hand

        killed = run(engine, strategy, rounds=4, model=Net(str(trap)), on_round=on_round)
        now = [ray.get(actor.ready.remote())["pid"] for actor in engine.actors]
        assert now[1] != pids[1]  # restarted (the trap's worker too: the trap is gone, so its process died)
        assert [r.round for r in killed.history.records] == [0, 1, 2, 3, 4]
        uninterrupted = run(AutoEngine(), strategy, rounds=4)
        assert_same_run(killed, uninterrupted)
        assert_same_kept(killed.kept, uninterrupted.kept)
        if strategy == "scaffold":
            # A worker restarted on a node that lost its disk (here: its folder removed while it is
            # idle) has lost its clients' states: the driver says how to go on, in one line.
            shutil.rmtree(engine.placement[1]["folder"])
            ray.kill(engine.actors[1], no_restart=False)
            with pytest.raises(
                FedforgeError, match=r"^Ray worker 1 lost client \d+'s state \(.*continue with --resume$"
            ):
                engine.gather()


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_resume_continues_on_the_ray_engine_as_if_uninterrupted(tmp_path, capsys, strategy):
    # SCAFFOLD: the checkpoint's client states go to their workers, and come back in the next checkpoint.
    base = [
        "run",
        "-q",
        "--strategy",
        strategy,
        "--dataset",
        "synthetic",
        "--num-clients",
        "6",
        "--clients-per-round",
        "3",
        "--model",
        "logreg",
        "--out-dir",
        str(tmp_path),
    ]
    ray_flags = ["--engine", "ray", "--ray-workers", "2", "--ray-cpus-per-worker", "0.5"]
    assert main([*base, "--name", "stopped", "--rounds", "2"]) == 0  # the engine may change on resume
    assert main(["run", "-q", "--resume", str(tmp_path / "stopped"), "--rounds", "4", *ray_flags]) == 0
    assert main([*base, "--name", "whole", "--rounds", "4"]) == 0
    resumed, whole = (torch.load(tmp_path / name / "model.pt") for name in ("stopped", "whole"))
    torch.testing.assert_close(resumed, whole)
    # The resumed run's checkpoint holds its clients' states, gathered from the workers: the whole run's.
    kept = [load_checkpoint(tmp_path / name, "cpu").kept for name in ("stopped", "whole")]
    assert bool(kept[1].client_states) == (strategy == "scaffold")
    assert_same_kept(kept[0], kept[1])
    capsys.readouterr()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ray-workers", "0"], "ray_workers must be an integer >= 1, got 0"),
        (["--ray-cpus-per-worker", "0"], "ray_cpus_per_worker must be > 0, got 0.0"),
        (
            ["--ray-workers", "5"],
            "5 Ray workers of 1 CPU each need 5 CPU, and the cluster has 2: use fewer --ray-workers or less per worker",
        ),
        (
            ["--ray-address", "127.0.0.1:1"],
            "cannot reach the Ray cluster at '127.0.0.1:1' within 10 s (Connection "
            "refused): is `ray start --head` running there?",
        ),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, capsys, flags, message):
    argv = [
        "run",
        "-q",
        "--dataset",
        "synthetic",
        "--num-clients",
        "4",
        "--clients-per-round",
        "2",
        "--model",
        "logreg",
        "--out-dir",
        str(tmp_path),
        "--engine",
        "ray",
        *flags,
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"fedforge: error: {message}"]


def test_ray_missing_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    argv = [
        "run",
        "-q",
        "--dataset",
        "synthetic",
        "--num-clients",
        "4",
        "--clients-per-round",
        "2",
        "--model",
        "logreg",
        "--out-dir",
        str(tmp_path),
        "--engine",
        "ray",
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fedforge: error: engine ray needs Ray, which is not installed: pip install 'fedforge[ray]'"
    ]


def test_an_address_that_does_not_answer_as_ray_fails_within_the_bound():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, says nothing
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(
            ConfigError,
            match=rf"^cannot reach the Ray cluster at '{address}' within 0.5 s "
            rf"\(something listens there, but not as Ray does\)",
        ):
            RayEngine(blobs_data, seed=SEED, address=address, connect_timeout=0.5)
        # Without the bound ray.init waits for minutes; 60 s leaves a loaded machine room for the
        # bound's own work (importing grpc, a channel) and still tells a bound from no bound.
        assert time.monotonic() - started < 60


def test_a_worker_that_cannot_load_the_data_says_why():
    with pytest.raises(
        ConfigError,
        match=r"^a Ray worker cannot load the run's data: DataError: fashion-mnist not "
        r"found in /nowhere$",
    ):
        RayEngine(failing_data, seed=SEED, workers=1, cpus_per_worker=0.5)


@pytest.mark.parametrize(
    "costs, workers, expected",
    [
        ([1, 1, 1, 1], 2, [(0, 2), (2, 4)]),
        ([5, 1, 1, 1, 1, 1], 2, [(0, 1), (1, 6)]),
        ([1, 1], 3, [(0, 1), (1, 2), (2, 2)]),
        ([3, 3, 3], 1, [(0, 3)]),
    ],
)
def test_shares_are_consecutive_and_balanced(costs, workers, expected):
    assert [(r.start, r.stop) for r in shares(costs, workers)] == expected


def test_workers_hold_their_share_and_a_margin_of_their_neighbours():
    assert [(r.start, r.stop) for r in holdings([1] * 100, 2)] == [(0, 55), (45, 100)]
    assert [(r.start, r.stop) for r in holdings([1] * 90, 3)] == [(0, 33), (27, 63), (57, 90)]
    assert [(r.start, r.stop) for r in holdings([1] * 5, 1)] == [(0, 5)]
    assert [(r.start, r.stop) for r in holdings([1, 1], 3)] == [(0, 2), (0, 2), (2, 2)]  # at least one; none empty


def test_shared_clients_even_out_the_work():
    # Tasks 0-1 can only go to worker 0 and task 4 to worker 1; 2 and 3 to either.
    candidates = [[0], [0], [0, 1], [0, 1], [1]]
    assert assign(candidates, [5, 5, 4, 3, 1], 2) == [0, 0, 1, 1, 1]
    assert assign(candidates, [1, 1, 4, 3, 9], 2) == [0, 0, 0, 0, 1]
    # Equal costs: the lower task first; equal loads: the lower worker.
    assert assign(candidates, [1, 1, 3, 3, 2], 2) == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="task 0: no worker holds its client"):
        assign([[]], [1], 2)
