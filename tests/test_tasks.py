"""Tasks: a task's loss, metrics and optimizer, hand-checked, and end to end."""

import copy
import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedforge as ff
from fedforge.algorithms import Proximal
from fedforge.cli import main
from fedforge.client import ClientConfig, ClientPlan, epoch_orders, train_client
from fedforge.data import TensorData
from fedforge.errors import ConfigError
from fedforge.evaluation import evaluate
from fedforge.tasks import CLASSIFICATION, LANGUAGE_MODEL, REGRESSION, Task, make_task


def regression_data(n=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1 * torch.randn(n, generator=g) + 4.0
    return TensorData(x, y)


def test_regression_metrics_by_hand():
    data = regression_data(50)
    model = nn.Linear(5, 1)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    result = evaluate(model, state, data, batch_size=16, task=REGRESSION)  # batches of 16 combine exactly
    with torch.no_grad():
        prediction = model(data.x).squeeze(1).double()
    y = data.y.double()
    mse = float(((prediction - y) ** 2).mean())
    assert result.metrics["mse"] == pytest.approx(mse, rel=1e-6) and result.loss == result.metrics["mse"]
    assert result.metrics["mae"] == pytest.approx(float((prediction - y).abs().mean()), rel=1e-6)
    assert result.metrics["r2"] == pytest.approx(1 - mse / float(((y - y.mean()) ** 2).mean()), rel=1e-6)
    assert result.accuracy is None


def test_language_model_metrics_by_hand():
    torch.manual_seed(0)
    tokens = torch.randint(0, 7, (6, 9))
    data = TensorData(tokens[:, :-1], tokens[:, 1:])
    model = nn.Sequential(nn.Embedding(7, 7))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    result = evaluate(model, state, data, batch_size=4, task=LANGUAGE_MODEL)
    with torch.no_grad():
        logits = model(data.x)
    loss = float(F.cross_entropy(logits.reshape(-1, 7), data.y.reshape(-1)))
    assert result.loss == pytest.approx(loss, rel=1e-6)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    accuracy = float((logits.argmax(-1) == data.y).float().mean())
    assert result.metrics["token_accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_adam_clients_equal_a_plain_torch_loop(optimizer, mu):
    """With FedProx's mu the loop adds mu/2 ||w - w_global||^2 to the loss, as the paper writes it."""
    data = regression_data(70)
    task = make_task("regression", optimizer=optimizer)
    config = ClientConfig(local_epochs=2, batch_size=32, lr=0.05, weight_decay=0.01, task=task, algorithm=Proximal(mu))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    update = train_client(
        copy.deepcopy(model),
        start,
        data,
        config,
        client_id=0,
        generator=torch.Generator().manual_seed(4),
    )

    reference = copy.deepcopy(model)
    opt = task.optimizer(reference.parameters(), lr=0.05, weight_decay=0.01)
    for order in epoch_orders(len(data), 2, torch.Generator().manual_seed(4)):
        for begin in range(0, len(order), 32):
            idx = order[begin : begin + 32]
            opt.zero_grad()
            loss = F.mse_loss(reference(data.x[idx]).squeeze(1), data.y[idx])
            loss = loss + mu / 2 * sum(((p - start[n]) ** 2).sum() for n, p in reference.named_parameters())
            loss.backward()
            opt.step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(start[name] + update.delta[name], value)
    assert set(update.metrics) == {"loss", "mse", "mae", "r2"} and update.train_accuracy is None


def test_regression_with_adam_learns_and_every_engine_agrees(caplog):
    data = regression_data(300)
    federated = ff.FederatedData(data, np.array_split(np.arange(300), 6), regression_data(100, seed=1))
    config = ClientConfig(batch_size=16, lr=0.05, task=make_task("regression", optimizer="adam"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    runs = []
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        for engine in (ff.SequentialEngine(), ff.VectorizedEngine(), ff.AutoEngine()):
            runs.append(
                ff.simulate(
                    copy.deepcopy(model), federated, rounds=5, clients_per_round=3, client=config, engine=engine, seed=2
                )
            )
    assert not any("cannot batch" in r.getMessage() for r in caplog.records)  # vectorized, through torch.func
    for other in runs[1:]:
        for name, value in runs[0].state.params.items():
            torch.testing.assert_close(other.state.params[name], value)
    history = runs[0].history
    assert history.column("test_r2")[-1] > 0.5 > history.column("test_r2")[0]
    assert history.final.test_accuracy is None and history.final.train_loss is not None
    assert {"train_mae", "test_mae", "test_mse", "test_r2"} <= set(history.final.metrics)


def test_a_task_of_your_own_through_the_python_api():
    """A loss and metrics of one's own: here a Huber loss, and the share of predictions within 1."""
    huber = Task(
        "huber",
        loss=lambda out, y: F.huber_loss(out.squeeze(1), y),
        metric_sums=lambda out, y: {
            "loss": F.huber_loss(out.squeeze(1), y, reduction="sum"),
            "within_1": ((out.squeeze(1) - y).abs() < 1).sum(),
        },
        primary="within_1",
        higher_is_better=True,
    )
    data = regression_data(200)
    federated = ff.FederatedData(data, np.array_split(np.arange(200), 4), regression_data(100, seed=1))
    torch.manual_seed(0)
    result = ff.simulate(
        nn.Linear(5, 1),
        federated,
        rounds=6,
        clients_per_round=4,
        seed=0,
        client=ClientConfig(local_epochs=5, batch_size=10, lr=0.1, task=huber),
    )
    within = result.history.column("test_within_1")
    assert within[-1] > 0.8 > within[0]


def test_a_loss_that_is_not_a_scalar_is_named():
    task = Task("bad", loss=lambda out, y: (out.squeeze(1) - y) ** 2, metric_sums=lambda out, y: {"loss": out.sum()})
    with pytest.raises(
        ConfigError,
        match=r"task bad: the loss must be a scalar tensor \(the batch's mean\), got "
        r"\(32,\)",
    ):
        train_client(
            nn.Linear(5, 1),
            {k: v.detach() for k, v in nn.Linear(5, 1).state_dict().items()},
            regression_data(40),
            ClientConfig(task=task),
            client_id=0,
            generator=torch.Generator(),
        )


def test_classification_is_still_the_default():
    assert ClientConfig().task is CLASSIFICATION and CLASSIFICATION.is_tutorial_classification
    assert not make_task("classification", optimizer="adam").is_tutorial_classification


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer", "lbfgs"], "unknown optimizer 'lbfgs' (choose from: sgd, adam, adamw)"),
        (
            ["--task", "ranking"],
            "unknown task 'ranking' (choose from: classification, regression, language-model, causal-lm, "
            "sequence-classification, or package.module:object)",
        ),
        (["--optimizer", "adam", "--momentum", "0.9"], "momentum is SGD's; Adam takes its own options"),
    ],
)
def test_bad_task_flags_are_one_line(capsys, tmp_path, argv, message):
    assert main(["run", "-q", "--dataset", "synthetic", "--out-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_diabetes_regression_from_the_command_line(capsys, tmp_path):
    pytest.importorskip("sklearn")
    assert (
        main(
            [
                "run",
                "--dataset",
                "diabetes",
                "--task",
                "regression",
                "--optimizer",
                "adam",
                "--lr",
                "0.01",
                "--num-clients",
                "5",
                "--clients-per-round",
                "5",
                "--rounds",
                "3",
                "--local-epochs",
                "2",
                "--batch-size",
                "16",
                "--out-dir",
                str(tmp_path),
                "--name",
                "d",
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "test r2" in out and "test mae" in out and "final test r2" in out
    rows = json.loads((tmp_path / "d" / "history.json").read_text())["rounds"]
    assert rows[-1]["metrics"]["test_r2"] > rows[0]["metrics"]["test_r2"]
    header = (tmp_path / "d" / "history.csv").read_text().splitlines()[0].split(",")
    assert {"test_r2", "test_mae", "train_r2"} <= set(header)
    assert (tmp_path / "d" / "accuracy.png").stat().st_size > 0


def plain_sgd_loop(module, batches, config):
    """The loss/optimizer form written as a loop of one's own: the two must agree."""
    optimizer = torch.optim.SGD(module.parameters(), lr=config.lr)
    total = count = 0
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        optimizer.step()
        total, count = total + loss.item() * len(y), count + len(y)
    return {"loss": total / count}


def own_loop_task(train=plain_sgd_loop):
    import dataclasses

    return dataclasses.replace(CLASSIFICATION, name="mine", train=train)


@pytest.mark.parametrize("max_steps", [None, 3])
def test_an_own_training_loop_equals_the_built_in_form(max_steps):
    from helpers import blobs

    data = blobs(70)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = ClientPlan(max_steps=max_steps)
    ours = train_client(
        copy.deepcopy(model),
        start,
        data,
        ClientConfig(batch_size=16, lr=0.1, task=own_loop_task()),
        client_id=1,
        generator=torch.Generator().manual_seed(3),
        plan=plan,
    )
    built_in = train_client(
        copy.deepcopy(model),
        start,
        data,
        ClientConfig(batch_size=16, lr=0.1),
        client_id=1,
        generator=torch.Generator().manual_seed(3),
        plan=plan,
    )
    assert ours.num_steps == built_in.num_steps == (max_steps or 5)
    for name in start:
        torch.testing.assert_close(ours.delta[name], built_in.delta[name])
    assert ours.train_loss == pytest.approx(built_in.train_loss, rel=1e-5)


def test_an_own_loop_that_returns_nothing_is_measured_and_fedprox_is_refused():
    from helpers import blobs

    data = blobs(40)
    model = nn.Sequential(nn.Linear(8, 4))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    silent = own_loop_task(lambda module, batches, config: [None for _ in batches] and None)
    update = train_client(
        copy.deepcopy(model), start, data, ClientConfig(task=silent), client_id=0, generator=torch.Generator()
    )
    assert set(update.metrics) == {"loss", "accuracy"} and update.num_steps == 2
    with pytest.raises(ConfigError, match="task mine trains with a loop of its own: algorithm fedprox's phases"):
        train_client(
            copy.deepcopy(model),
            start,
            data,
            ClientConfig(task=own_loop_task(), algorithm=Proximal(0.1)),
            client_id=0,
            generator=torch.Generator(),
        )


HUBER_MODULE = """
import torch.nn.functional as F
from fedforge.tasks import Task

def huber(targets):
    return Task("huber", loss=lambda out, y: F.huber_loss(out.squeeze(1), y),
                metric_sums=lambda out, y: {"loss": F.huber_loss(out.squeeze(1), y, reduction="sum"),
                                            "within_1": ((out.squeeze(1) - y).abs() < 1).sum()},
                primary="within_1", higher_is_better=True, targets=targets)

NUMBERS = huber("numbers")
UNSAID = huber(None)
"""


def test_a_task_of_your_own_on_a_csv_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "huber_task.py").write_text(HUBER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = regression_data(400)
    rows = ["a,b,c,d,e,y"] + [
        ",".join(f"{v:.6f}" for v in [*x.tolist(), y.item()]) for x, y in zip(data.x, data.y, strict=True)
    ]
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    flags = [
        "run",
        "-q",
        "--dataset",
        f"csv:{tmp_path / 'table.csv'}",
        "--target",
        "y",
        "--model",
        "logreg",
        "--num-clients",
        "4",
        "--clients-per-round",
        "4",
        "--rounds",
        "5",
        "--local-epochs",
        "3",
        "--batch-size",
        "10",
        "--lr",
        "0.05",
        "--out-dir",
        str(tmp_path / "runs"),
    ]
    assert main([*flags, "--task", "huber_task:NUMBERS", "--name", "h"]) == 0
    history = json.loads((tmp_path / "runs" / "h" / "history.json").read_text())["rounds"]
    # The target column came as numbers (one output, float targets): the loss falls, within_1 rises.
    assert history[-1]["test_loss"] < history[0]["test_loss"] / 2
    assert history[-1]["metrics"]["test_within_1"] > history[0]["metrics"]["test_within_1"]
    capsys.readouterr()
    assert main([*flags, "--task", "huber_task:UNSAID", "--name", "u"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "task huber: dataset csv:" + str(tmp_path / "table.csv") + " needs to know how to prepare "
        "its target column for it: give the task targets='classes', 'numbers' or 'tokens'"
    ), err
    assert "\n" not in err
    with pytest.raises(ConfigError, match="targets must be one of classes, numbers, tokens, got 'labels'"):
        Task("bad", loss=F.mse_loss, metric_sums=lambda out, y: {}, targets="labels")
