"""The Ray engine against the in-process one: same clients, same batches, same final weights; faults; errors.

One local Ray for the module (2 CPUs); workers take half a CPU each so that three fit.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from ray_problem import (  # noqa: E402
    CLIENT,
    SEED,
    WORKER_ENV,
    Net,
    assert_same_run,
    blobs_data,
    failing_data,
    held_out_data,
    run,
)

from fedforge.algorithms import PLAIN, Ditto, FedPer, FedRep, Roles  # noqa: E402
from fedforge.checkpoint import load_checkpoint  # noqa: E402
from fedforge.cli import main  # noqa: E402
from fedforge.engines import AutoEngine, SequentialEngine  # noqa: E402
from fedforge.engines.base import RoundFailed  # noqa: E402
from fedforge.engines.ray import RayEngine, _is_own, assign, holdings, shares  # noqa: E402
from fedforge.errors import ConfigError, FedforgeError  # noqa: E402
from fedforge.llm.models import save_tiny_llama  # noqa: E402
from fedforge.privacy.run import DifferentialPrivacy  # noqa: E402
from fedforge.scenarios import Scenario  # noqa: E402
from fedforge.schedules import Cosine  # noqa: E402
from fedforge.tasks import CLASSIFICATION  # noqa: E402


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


def assert_same_kept(a, b):
    """The same clients keep the same client states and optimizer states."""
    assert a.client_states.keys() == b.client_states.keys() and a.optimizer_states.keys() == b.optimizer_states.keys()
    for c, state in a.client_states.items():
        torch.testing.assert_close(state.flat(), b.client_states[c].flat())
    for c, optimizer in a.optimizer_states.items():
        torch.testing.assert_close(optimizer.slots, b.optimizer_states[c].slots)


def test_clients_keep_their_state_on_their_home_worker_and_a_resumed_run_is_exact():
    arrived, saved = [], {}
    with RayEngine(blobs_data, seed=SEED, workers=2, cpus_per_worker=0.5) as engine:
        on_ray = run(
            engine,
            "scaffold",
            rounds=4,
            on_client=arrived.append,
            checkpoint=lambda progress: saved.setdefault(progress.state.round, progress),
        )
        trained = {c for record in on_ray.history.records for c in record.clients}
        # The driver holds none of it: no update brought a state back (the engine refuses a task
        # that carries one), and the engine knows only who keeps one, on which (home) worker.
        assert arrived and all(u.client_state is None and u.optimizer_state is None for u in arrived)
        assert engine._stateful == trained
        assert all(engine._held[engine._home_of(c)] for c in trained)
        # The checkpoint's and the result's states, gathered from the workers, are the round loop's in process.
        sequential = run(SequentialEngine(), "scaffold", rounds=4)
        assert_same_run(on_ray, sequential)
        assert_same_kept(on_ray.kept, sequential.kept)
        assert_same_kept(saved[2].kept, run(SequentialEngine(), "scaffold", rounds=2).kept)
        # Resumed from round 2 (the workers are handed its states, and forget the run's round 4 ones).
        resumed = run(engine, "scaffold", rounds=4, resume=saved[2])
        # Kept optimizer states live on the workers alike.
        adam = dataclasses.replace(
            CLIENT,
            lr=0.01,
            task=dataclasses.replace(CLASSIFICATION, optimizer=torch.optim.Adam, keep_optimizer_state=True),
        )
        kept_optimizers = run(engine, client=adam)
        in_process = run(SequentialEngine(), client=adam)
        assert_same_run(kept_optimizers, in_process)
        assert kept_optimizers.kept.optimizer_states and not kept_optimizers.kept.client_states
        assert_same_kept(kept_optimizers.kept, in_process.kept)
    assert_same_run(resumed, sequential)
    assert_same_kept(resumed.kept, sequential.kept)


def failing_once(engine_class):
    """`engine_class`, with round 2's first attempt failing after its clients trained (too few reported)."""

    class FailsOnce(engine_class):
        failed = False

        def run(self, model, global_state, tasks, config):
            updates = super().run(model, global_state, tasks, config)
            if config.round != 2 or self.failed:
                return updates
            self.failed = True
            return self._failed(updates)

        @staticmethod
        def _failed(updates):
            assert list(updates)  # the clients trained: their new states are pending
            raise RoundFailed("too few clients reported")
            yield

    return FailsOnce


def test_a_failed_attempt_moves_no_state_on():
    # As in the round loop: only the retry that counts commits its clients' new states.
    with failing_once(RayEngine)(blobs_data, seed=SEED, workers=2, cpus_per_worker=0.5) as engine:
        on_ray = run(engine, "scaffold", rounds=3)
    sequential = run(failing_once(SequentialEngine)(), "scaffold", rounds=3)
    assert on_ray.history.records[2].clients != run(SequentialEngine(), "scaffold", rounds=2).history.records[2].clients
    assert_same_run(on_ray, sequential)
    assert_same_kept(on_ray.kept, sequential.kept)


def test_personal_models_are_evaluated_on_the_workers_as_in_process():
    # FedPer: each client's head stays on its worker, which evaluates the client's personal model.
    client = dataclasses.replace(CLIENT, algorithm=FedPer())
    kwargs = {"rounds": 3, "client": client, "data": held_out_data, "personalized_eval": True}
    with RayEngine(held_out_data, seed=SEED, workers=2, cpus_per_worker=0.5) as engine:
        on_ray = run(engine, **kwargs)
    sequential = run(SequentialEngine(), **kwargs)
    assert_same_run(on_ray, sequential)
    assert_same_kept(on_ray.kept, sequential.kept)
    for a, b in zip(on_ray.history.records[1:], sequential.history.records[1:], strict=True):
        own = {k: v for k, v in a.metrics.items() if k.startswith("personalized_")}
        assert own and own == pytest.approx({k: b.metrics[k] for k in own}, rel=1e-5)


@pytest.mark.parametrize("strategy, algorithm", [("feddyn", None), ("fedavg", Ditto(lam=0.1)), ("fedavg", FedRep())])
def test_stateful_algorithms_on_the_workers_equal_the_sequential_engine(strategy, algorithm):
    # FedDyn's gradients, Ditto's personal copies and FedRep's heads live on the workers across rounds.
    client = CLIENT if algorithm is None else dataclasses.replace(CLIENT, algorithm=algorithm)
    with RayEngine(blobs_data, seed=SEED, workers=2, cpus_per_worker=0.5) as engine:
        on_ray = run(engine, strategy, rounds=3, client=client)
    sequential = run(SequentialEngine(), strategy, rounds=3, client=client)
    assert_same_run(on_ray, sequential)
    assert on_ray.kept.client_states  # each algorithm keeps a state, which the workers handed back
    assert_same_kept(on_ray.kept, sequential.kept)


def test_frozen_entries_stay_with_the_workers_model_and_follow_its_changes():
    # A frozen entry (a pretrained base) is not sent each round: the workers use their copy of the
    # model, sent again when the model's tensors are written (here: its frozen layer doubled).
    client = dataclasses.replace(CLIENT, algorithm=PLAIN.with_roles(Roles(frozen=["net.0.*"])))
    model = Net()
    own = model.state_dict()["net.0.weight"]
    assert _is_own(own.detach(), own) and not _is_own(own.clone(), own) and not _is_own(own[:1], own)
    with RayEngine(blobs_data, seed=SEED, workers=2, cpus_per_worker=0.5) as engine:
        first = run(engine, rounds=2, client=client, model=model)
        assert_same_run(first, run(SequentialEngine(), rounds=2, client=client, model=Net()))
        with torch.no_grad():
            model.net[0].weight.mul_(2.0)
        second = run(engine, rounds=2, client=client, model=model)
    doubled = Net()
    with torch.no_grad():
        doubled.net[0].weight.mul_(2.0)
    assert_same_run(second, run(SequentialEngine(), rounds=2, client=client, model=doubled))
    assert not torch.allclose(first.state.params["net.2.weight"], second.state.params["net.2.weight"])


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


def test_lora_fine_tuning_on_ray_sends_only_the_adapters_and_equals_in_process(tmp_path, capsys):
    # A tiny Llama's LoRA adapters trained on Ray workers (which load the text and the model folder
    # themselves): the weights of the in-process run, and each round moves only the adapters.
    scenes = Path(__file__).parents[2] / "examples" / "data" / "shakespeare_scenes.txt"
    save_tiny_llama(tmp_path / "llama", [scenes.read_text()], context=64)
    base = [
        "run",
        "-q",
        *("--model", f"hf:{tmp_path / 'llama'}", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj"),
        *("--task", "causal-lm", "--dataset", f"shakespeare-text:{scenes}", "--truncation", "--max-length", "48"),
        *("--partition", "natural", "--num-clients", "16", "--clients-per-round", "4", "--rounds", "2"),
        *("--optimizer", "adamw", "--lr", "0.01", "--batch-size", "8", "--out-dir", str(tmp_path)),
    ]
    ray_flags = ["--engine", "ray", "--ray-workers", "2", "--ray-cpus-per-worker", "0.5"]
    assert main([*base, "--name", "ray", *ray_flags]) == 0, capsys.readouterr().err
    assert main([*base, "--name", "here", "--engine", "sequential"]) == 0, capsys.readouterr().err
    on_ray, here = (torch.load(tmp_path / name / "model.pt") for name in ("ray", "here"))
    torch.testing.assert_close(on_ray, here)
    adapters = 2 * 2 * 2 * 4 * 64 * 4  # 2 layers x (q, v) x (A, B) x rank 4 x hidden 64, float32
    rounds = json.loads((tmp_path / "ray" / "history.json").read_text())["rounds"]
    assert [r["metrics"]["payload_up"] for r in rounds[1:]] == [4 * adapters] * 2
    capsys.readouterr()
