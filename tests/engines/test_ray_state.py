"""The Ray engine with clients that keep state (on their home worker), frozen entries held by the
workers' model, and LoRA fine-tuning: the in-process runs' weights and states.

One local Ray for the module (2 CPUs); workers take half a CPU each. A file of its own, beside
test_ray.py, so that the two run in parallel test processes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from ray_problem import (  # noqa: E402
    CLIENT,
    SEED,
    WORKER_ENV,
    BNNet,
    Net,
    assert_same_kept,
    assert_same_run,
    blobs_data,
    held_out_data,
    run,
)

from fedforge.algorithms import PLAIN, Ditto, FedBN, FedPer, FedRep, Roles  # noqa: E402
from fedforge.cli import main  # noqa: E402
from fedforge.engines import SequentialEngine  # noqa: E402
from fedforge.engines.base import RoundFailed  # noqa: E402
from fedforge.engines.ray import RayEngine, _is_own  # noqa: E402
from fedforge.llm.models import save_tiny_llama  # noqa: E402
from fedforge.tasks import CLASSIFICATION  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env=WORKER_ENV)
    yield
    ray.shutdown()


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


@pytest.mark.parametrize(
    "strategy, algorithm, model",
    [("feddyn", None, Net), ("fedavg", Ditto(lam=0.1), Net), ("fedavg", FedRep(), Net), ("fedavg", FedBN(), BNNet)],
)
def test_stateful_algorithms_on_the_workers_equal_the_sequential_engine(strategy, algorithm, model):
    # FedDyn's gradients, Ditto's personal copies, FedRep's heads and FedBN's BatchNorm layers (their
    # running statistics too) live on the workers across rounds.
    client = CLIENT if algorithm is None else dataclasses.replace(CLIENT, algorithm=algorithm)
    with RayEngine(blobs_data, seed=SEED, workers=2, cpus_per_worker=0.5) as engine:
        on_ray = run(engine, strategy, rounds=3, client=client, model=model())
    sequential = run(SequentialEngine(), strategy, rounds=3, client=client, model=model())
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
