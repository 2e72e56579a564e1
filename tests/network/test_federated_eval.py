"""Federated evaluation in a deployment: a server without test data of its own has its clients
evaluate each round's global model on their held-out examples. The server runs in this process
(every message it decodes kept) or as a process; the clients are processes on 127.0.0.1."""

import json
import re

import pytest
import torch
from cluster import BASE
from test_personal import MLP, VALIDATION_APP, TappedServer, assert_same_model, networked, simulated

from fedforge.engines.network import evaluation_from, evaluators, pooled
from fedforge.network.wire import Kind, Message

FLAGS = [*MLP, "--rounds", "2", "--client-test-fraction", "0.2"]


def federated(history):
    return [r[k] for r in history for k in ("federated_loss", "federated_accuracy")]


def test_a_server_without_test_data_records_its_clients_evaluation_as_the_simulation_does(
    cluster, tmp_path, monkeypatch
):
    """With --no-server-eval every connected client evaluates each round's global model (the
    initial one too) on its held-out rows; the example-weighted means of their reports are the
    simulation's federated_loss and federated_accuracy (the global model on all clients' held-out
    rows side by side), and there is no test_* at all."""
    model, history, received = networked(cluster, tmp_path, monkeypatch, *FLAGS, "--no-server-eval")
    reference, simulated_history = simulated(tmp_path, *FLAGS)
    assert_same_model(model, reference)
    assert [r["round"] for r in history] == [0, 1, 2]
    assert all(r["test_loss"] is None and r["test_accuracy"] is None for r in history)
    mine, theirs = federated(history), federated(simulated_history)
    assert None not in mine, mine
    # The final weights are the same bits; each client sums its loss in float32 over its own batches,
    # the simulation over batches of all clients' rows: 7e-8 apart (measured), float32's round-off.
    assert mine == pytest.approx(theirs, rel=1e-6, abs=1e-9)
    assert mine[:2] != mine[-2:]  # the model moved: each round's evaluation is of that round's model
    evaluations = [m for m in received if m.kind == Kind.EVALUATION]
    assert len(evaluations) == 9 and sum(m.header["num_examples"] for m in evaluations[:3]) == sum(
        m.header["num_examples"] for m in evaluations[-3:]
    )
    assert all(not m.tensors and len(m.header["metrics"]) <= 32 for m in evaluations)


def test_with_server_eval_the_server_evaluates_and_its_clients_are_not_asked(cluster, tmp_path, monkeypatch):
    """By default (a server with test data) nothing changes: the server evaluates, no client is asked."""
    _, history, received = networked(
        cluster, tmp_path, monkeypatch, *MLP, "--rounds", "1", "--client-test-fraction", "0.2"
    )
    assert all(r["test_accuracy"] is not None and r["federated_accuracy"] is not None for r in history)
    assert not [m for m in received if m.kind == Kind.EVALUATION]


def test_under_secure_aggregation_the_clients_still_evaluate_the_global_model(cluster, tmp_path, monkeypatch):
    """Under secure aggregation no update is seen, but each client's evaluation of the global model
    (not its update) is: the initial model's is the simulation's, and every round has one."""
    flags = [*MLP, "--rounds", "1", "--client-test-fraction", "0.2"]
    _, history, received = networked(
        cluster, tmp_path, monkeypatch, *flags, "--secure-aggregation", "--no-server-eval", name="secure"
    )
    _, simulated_history = simulated(tmp_path, *flags)
    assert federated(history)[:2] == pytest.approx(federated(simulated_history)[:2], rel=1e-6, abs=1e-9)
    assert None not in federated(history)
    assert not [m for m in received if m.kind == Kind.UPDATE]
    assert len([m for m in received if m.kind == Kind.EVALUATION]) == 6


def test_clients_evaluate_the_global_model_with_their_own_validation_data_and_metric(cluster, tmp_path, monkeypatch):
    """ClientApp.validation and ClientApp.evaluate serve the global model's evaluation too: the
    round's federated_<metric> are the clients' own metrics (no loss: federated_loss is None)."""
    (tmp_path / "validating.py").write_text(VALIDATION_APP)
    monkeypatch.chdir(tmp_path)
    server = TappedServer(tmp_path, monkeypatch, *BASE[:-4], "--model", "mlp", "--rounds", "1", "--no-server-eval")
    clients = [cluster.app_client(i, server.port, "validating:APP") for i in range(3)]
    assert server.wait() == 0, [c.text() for c in clients]
    assert all(c.wait() == 0 for c in clients), [c.text() for c in clients]
    history = json.loads((server.run_dir / "history.json").read_text())["rounds"]
    evaluations = [m.header for m in server.received if m.kind == Kind.EVALUATION]
    assert len(evaluations) == 6 and all(0 < h["num_examples"] < 250 for h in evaluations)
    for record, answers in zip(history, (evaluations[:3], evaluations[3:]), strict=True):
        assert record["federated_loss"] is None and record["federated_accuracy"] is None
        assert 0 <= record["metrics"]["federated_right"] <= 1
        total = sum(h["num_examples"] for h in answers)
        expected = sum(h["metrics"]["count"] * h["num_examples"] for h in answers) / total
        assert record["metrics"]["federated_count"] == pytest.approx(expected, rel=1e-12)


def test_hostile_evaluations_are_refused_and_logged_and_a_client_that_leaves_does_not_fail_the_round(cluster):
    """A stub client answers the server's evaluations with a NaN metric, 10**18 examples, 40 metrics,
    100 kB, and then leaves mid-evaluation: each is one logged refusal, the run finishes, and every
    round's federated evaluation is the two honest clients'."""
    server, port = cluster.server(
        *MLP,
        "--rounds",
        "4",
        "--client-test-fraction",
        "0.2",
        "--insecure",
        "--no-server-eval",
        "--min-clients",
        "3",
        "--min-fit-clients",
        "2",
    )
    stub = cluster.stub(2, port, "zero,zero,zero,zero,eval-nan,eval-many,eval-metrics,eval-big,eval-exit")
    clients = [cluster.client(i, port, dataset="digits") for i in range(2)]
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients)
    log = server.text()
    for reason in (
        "header number is not finite",
        "num_examples 1000000000000000000 is not between 0 and 10000000",
        "evaluation metrics must be at most 32 named numbers",
        "exceeds the limit of 65536",
        "client 2 disconnected before its EVALUATION",
    ):
        assert reason in log, (reason, log, stub.text())
    history = json.loads((cluster.tmp / "runs" / "net" / "history.json").read_text())["rounds"]
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4]
    assert all(r["federated_accuracy"] is not None and 0 <= r["federated_accuracy"] <= 1 for r in history)
    assert all(r["test_accuracy"] is None for r in history)


def test_evaluators_take_the_fraction_rounded_up_in_turn_from_round_to_round():
    clients = [0, 1, 2, 3, 4]
    assert [evaluators(clients, 0.4, r) for r in range(4)] == [[0, 1], [2, 3], [4, 0], [1, 2]]
    assert [evaluators(clients, 0.3, r) for r in range(3)] == [[0, 1], [2, 3], [4, 0]]
    assert evaluators(clients, 1.0, 7) == clients and evaluators(clients, 0.0, 1) == []
    assert evaluators([], 1.0, 3) == [] and evaluators([9], 0.01, 5) == [9]


def test_pooled_weighs_each_metric_by_the_examples_of_the_clients_that_report_it():
    evaluation = pooled([({"loss": 1.0, "accuracy": 0.5}, 10), ({"loss": 3.0}, 30), ({}, 0)])
    assert evaluation is not None
    assert (evaluation.loss, evaluation.accuracy, evaluation.num_examples) == (2.5, 0.5, 40)
    assert pooled([({}, 0)]) is None and pooled([]) is None


@pytest.mark.parametrize(
    "header, tensors, reason",
    [
        ({"metrics": {"loss": 1.0}, "num_examples": -1}, {}, "not between 0 and 100"),
        ({"metrics": {"loss": 1.0}, "num_examples": 101}, {}, "not between 0 and 100"),
        ({"metrics": {"loss": 1.0}, "num_examples": 1.5}, {}, "not between 0 and 100"),
        ({"metrics": {"loss": 1e16}, "num_examples": 5}, {}, "loss 1e+16 is not a number"),
        ({"metrics": {"loss": True}, "num_examples": 5}, {}, "loss True is not a number"),
        ({"metrics": {f"m{i}": 0.0 for i in range(33)}, "num_examples": 5}, {}, "at most 32"),
        ({"metrics": {"x" * 65: 0.0}, "num_examples": 5}, {}, "at most 32"),
        ({"metrics": {}, "num_examples": 5}, {}, "0 metrics of 5 examples"),
        ({"metrics": {"loss": 1.0}, "num_examples": 0}, {}, "1 metrics of 0 examples"),
        ({"metrics": {"loss": 1.0}, "num_examples": 5, "extra": 1}, {}, "no tensors"),
        ({"metrics": {"loss": 1.0}, "num_examples": 5}, {"w": torch.zeros(2)}, "no tensors"),
    ],
)
def test_an_evaluation_out_of_bounds_is_refused(header, tensors, reason):
    message = Message(Kind.EVALUATION, {"task": 1, "client": 0, **header}, tensors)
    with pytest.raises(ValueError, match=re.escape(reason)):
        evaluation_from(message, max_examples=100)
