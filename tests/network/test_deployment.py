"""Server and clients as separate processes on 127.0.0.1, over real gRPC sockets."""

import itertools
import json
import sys

import pytest
import torch
from cluster import BASE
from helpers import bound

from fedforge.cli import main as fedforge


def simulated_model(tmp_path, *flags):
    assert fedforge(["run", "-q", *BASE, *flags, "--out-dir", str(tmp_path / "sim"), "--name", "sim"]) == 0
    return torch.load(tmp_path / "sim" / "sim" / "model.pt")


def assert_same_model(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold", "feddyn"])
def test_all_alive_equals_the_simulation(cluster, tmp_path, strategy):
    flags = ["--rounds", "3", "--strategy", strategy]
    server, port = cluster.server("--insecure", "--min-clients", "3", *BASE, *flags)
    clients = [cluster.client(i, port) for i in range(3)]
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients)
    assert "plaintext mode" in server.text() and all("plaintext mode" in c.text() for c in clients)
    networked = torch.load(tmp_path / "runs" / "net" / "model.pt")
    assert_same_model(networked, simulated_model(tmp_path, *flags))


def test_a_learning_rate_schedule_over_the_network_equals_the_simulation(cluster, tmp_path):
    """Each task carries the round's lr: the networked run ends at the scheduled simulation's
    weights, not at the constant lr's, and records each round's lr as the simulation does."""
    flags = ["--rounds", "4", "--lr", "0.2", "--lr-schedule", "cosine:warmup=2"]
    server, port = cluster.server("--insecure", "--min-clients", "3", *BASE, *flags)
    clients = [cluster.client(i, port) for i in range(3)]
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients)
    networked = torch.load(tmp_path / "runs" / "net" / "model.pt")
    assert_same_model(networked, simulated_model(tmp_path, *flags))
    history = json.loads((tmp_path / "runs" / "net" / "history.json").read_text())["rounds"]
    simulated = json.loads((tmp_path / "sim" / "sim" / "history.json").read_text())["rounds"]
    assert [r["metrics"]["lr"] for r in history[1:]] == [r["metrics"]["lr"] for r in simulated[1:]]
    assert [r["metrics"]["lr"] for r in history[1:3]] == [0.1, 0.2]  # the warm-up: lr * r / 2
    constant = simulated_model(tmp_path, "--rounds", "4", "--lr", "0.2")
    assert not torch.allclose(networked["1.weight"], constant["1.weight"])


OWN_LOOP_APP = """
import dataclasses
import json
import os

import torch
import torch.nn.functional as F

import fedforge as ff
from fedforge.network.client import PartitionOf
from fedforge.tasks import CLASSIFICATION


def train(module, batches, config):  # plain SGD, noting what each round asks
    with open(f"seen-{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps([config.round, config.rounds, config.lr, config.local_epochs]) + "\\n")
    for x, y in batches:
        loss = F.cross_entropy(module(x), y)
        grads = torch.autograd.grad(loss, list(module.parameters()))
        with torch.no_grad():
            for p, g in zip(module.parameters(), grads):
                p -= config.lr * g
    return None


APP = ff.ClientApp(
    data=lambda client_id, config: PartitionOf("synthetic", client_id, 3).load(config),
    task=dataclasses.replace(CLASSIFICATION, name="own-loop", train=train),
)
"""


def test_a_client_apps_own_training_loop_sees_the_round_and_its_config(cluster, tmp_path):
    """A deployment client's own loop (its ClientApp's Task.train) is told each round's number, the
    run's rounds and the round's lr, as in simulation."""
    (tmp_path / "own_loop.py").write_text(OWN_LOOP_APP)
    flags = ["--rounds", "3", "--lr", "0.1", "--lr-schedule", "step:step_size=1,gamma=0.5"]
    server, port = cluster.server("--insecure", "--min-clients", "3", *BASE, *flags)
    clients = [cluster.app_client(i, port, "own_loop:APP") for i in range(3)]
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients), [c.text() for c in clients]
    seen = [[json.loads(line) for line in f.read_text().splitlines()] for f in sorted(tmp_path.glob("seen-*.jsonl"))]
    assert seen == [[[1, 3, 0.1, 1], [2, 3, 0.05, 1], [3, 3, 0.025, 1]]] * 3


def test_refusals_are_logged_and_training_continues(cluster, tmp_path):
    modes = ["shape", "nan", "oversized", "many", "huge", "steps", "loss", "late"]
    server, port = cluster.server(
        "--insecure",
        "--min-clients",
        "3",
        "--min-fit-clients",
        "2",
        "--rounds",
        str(len(modes)),
        "--max-message-mb",
        "0.05",
        "--round-timeout",
        str(bound(30)),
        *BASE,
    )
    first = cluster.client(0, port)
    cluster.client(1, port)
    server.wait_for("client 0 connected")
    server.wait_for("client 1 connected")
    wrong_secret = cluster.client(2, port, token="client-3.token", name="wrong-secret")
    unknown = cluster.client(9, port, token="client-3.token", name="unknown", part=2)
    assert wrong_secret.wait() == 1 and unknown.wait() == 1
    cluster.client(0, port, name="second")  # the same id again: the newer session wins
    assert first.wait() == 1
    evil = cluster.stub(2, port, ",".join(modes))
    assert server.wait() == 0, server.text()
    log = server.text()
    assert "wrong secret for client 2" in log and "unknown client id 9" in log  # the log tells them apart,
    for refused in (wrong_secret, unknown):  # the answer does not
        assert "refused by the server: authentication failed" in refused.text()
    assert "replaced by a newer session of client 0" in first.text()
    assert "refused the update of client 2: 1.weight: (3, 3)" in log or "refused the update of client 2" in log
    assert "refused the update of client 2: it holds NaN" in log
    assert "exceeds the limit" in log
    assert "refused the update of client 2: num_examples 1000000000000000000 is not between" in log
    assert "refused a message from client 2: header integer out of range" in log
    assert "refused the update of client 2: num_steps" in log
    assert "refused the update of client 2: train_loss 1e+308 is not a number in" in log
    assert "discarded a UPDATE from client 2 for task" in log and "late or not an update" in log
    history = json.loads(
        (tmp_path / "runs" / "net" / "history.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"history.json holds {c}: not JSON"),
    )
    assert [r["round"] for r in history["rounds"]] == list(range(len(modes) + 1))
    assert history["rounds"][-1]["test_accuracy"] > history["rounds"][0]["test_accuracy"]
    assert all(sorted(r["clients"]) == [0, 1, 2] for r in history["rounds"][1:])  # the stub was in every round
    evil.kill()


def test_tls_with_the_right_and_a_wrong_root_certificate(cluster, tmp_path):
    cluster.fedforge("certs", "--out", "certs")
    cluster.fedforge("certs", "--out", "other")
    server, port = cluster.server(
        "--tls-cert", "certs/server.pem", "--tls-key", "certs/server.key", "--min-clients", "3", "--rounds", "2", *BASE
    )
    impostor = cluster.client(3, port, "--root-cert", "other/ca.pem", "--give-up-after", "2", name="wrong-ca", part=0)
    clients = [cluster.client(i, port, "--root-cert", "certs/ca.pem") for i in range(3)]
    assert impostor.wait() == 2  # never got through the TLS handshake
    assert "TLS handshake failed: the server's certificate is not one --root-cert vouches for" in impostor.text()
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients)
    assert "plaintext" not in server.text()


def test_enroll_command(tmp_path):
    assert (
        fedforge(
            ["enroll", "--tokens", str(tmp_path / "t.json"), "--client-id", "7", "--out", str(tmp_path / "7.token")]
        )
        == 0
    )
    from fedforge.network.auth import load_tokens, read_secret, verify

    tokens = load_tokens(tmp_path / "t.json")
    assert verify(tokens, 7, read_secret(tmp_path / "7.token")) is None
    assert verify(tokens, 7, "guess") == "wrong secret for client 7"
    assert (tmp_path / "7.token").stat().st_mode & 0o077 == 0  # readable by its owner only


@pytest.mark.parametrize(
    "argv, message",
    [
        (["server", "--tokens", "missing.json", "--insecure"], "token file missing.json not found"),
        (["server", "--tokens", "t.json"], "give --tls-cert and --tls-key, or --insecure"),
        (
            ["client", "--server", "x:1", "--client-id", "1", "--token-file", "t", "--partition-of", "a:1/2"],
            "give --root-cert",
        ),
        (["client", "--server", "x:1", "--client-id", "1", "--token-file", "t", "--insecure"], "give one of --app"),
        (
            [
                "client",
                "--server",
                "x:1",
                "--client-id",
                "1",
                "--token-file",
                "t",
                "--partition-of",
                "mnist:5/2",
                "--insecure",
            ],
            "--partition-of must look like fashion-mnist:3/10 (index < count)",
        ),
        (
            [
                "client",
                "--server",
                "x:1",
                "--client-id",
                "1",
                "--token-file",
                "t",
                "--partition-of",
                "mnist:1/2",
                "--insecure",
            ],
            "token file t not found",
        ),
        (
            [
                "client",
                "--server",
                "x:1",
                "--client-id",
                "1",
                "--token-file",
                "t",
                "--partition-of",
                "mnist:1/2",
                "--insecure",
                "--secagg-min-clients",
                "1",
            ],
            "--secagg-min-clients must be a count >= 2, got 1",
        ),
        (
            ["server", "--tokens", "t.json", "--insecure", "--secure-aggregation", "--strategy", "krum"],
            "secure aggregation cannot serve strategy 'krum': Krum compares the updates with each other",
        ),
        (
            ["server", "--tokens", "t.json", "--insecure", "--secure-aggregation", "--strategy", "scaffold"],
            "secure aggregation cannot serve strategy 'scaffold'",
        ),
        (
            [
                "server",
                "--tokens",
                "t.json",
                "--insecure",
                "--secure-aggregation",
                "--dp",
                "central",
                "--noise-multiplier",
                "1",
            ],
            "secure aggregation with dp central",
        ),
        (
            ["server", "--tokens", "t.json", "--insecure", "--secure-aggregation", "--secagg-threshold", "0.3"],
            "secagg threshold must be a count >= 2 or a fraction in [0.5, 1), got 0.3",
        ),
        (
            ["server", "--tokens", "t.json", "--insecure", "--rounds", "2000000"],
            "rounds must be at most 1,000,000 in a deployment, got 2000000",
        ),
        (["server", "--tokens", "t.json", "--insecure", "--lr", "1e7"], "lr must be at most 1e+06 in a deployment"),
        (
            ["server", "--tokens", "t.json", "--insecure", "--device-speeds", "lognormal:sigma=1.0"],
            "device profiles and the virtual clock are for simulations",
        ),
        (
            ["server", "--tokens", "t.json", "--insecure", "--secure-aggregation", "--secagg-threshold", "2"],
            "threshold 2 of 5 holders: it must be more than half of them",
        ),
        (
            [
                "server",
                "--tokens",
                "t.json",
                "--insecure",
                "--secure-aggregation",
                "--secagg-max-examples",
                "1000000000",
            ],
            "can wrap a 32-bit ring",
        ),
        (
            ["server", "--tokens", "t.json", "--insecure", "--secagg-clip", "3"],
            "--secagg-clip without --secure-aggregation",
        ),
    ],
)
def test_deployment_flags_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.json").write_text('{"clients": {}}')
    assert fedforge(argv) == 2
    assert message in capsys.readouterr().err


def test_a_client_with_its_own_data_folder(cluster, tmp_path):
    """--data DIR: the client's examples from its own train.npz, not from a demo partition."""
    import numpy as np

    from fedforge.config import Config
    from fedforge.experiment import load

    config = Config(dataset="synthetic", num_clients=3, clients_per_round=3, model="logreg", batch_size=10)
    data = load(config, progress=False)[1]
    part = data.train.subset(data.partition[2])
    (tmp_path / "mine").mkdir()
    np.savez(tmp_path / "mine" / "train.npz", x=part.x.numpy(), y=part.y.numpy())
    server, port = cluster.server("--insecure", "--min-clients", "3", "--rounds", "2", *BASE)
    clients = [cluster.client(i, port) for i in range(2)]
    own = cluster.start(
        "own-data",
        [
            sys.executable,
            "-m",
            "fedforge",
            "client",
            "--threads",
            "1",
            "--insecure",
            "--server",
            f"127.0.0.1:{port}",
            "--client-id",
            "2",
            "--token-file",
            "client-2.token",
            "--data",
            "mine",
        ],
    )
    assert server.wait() == 0, server.text()
    assert own.wait() == 0 and f"joined ({len(part)} examples)" in own.text()
    assert all(c.wait() == 0 for c in clients)
    networked = torch.load(tmp_path / "runs" / "net" / "model.pt")
    assert_same_model(networked, simulated_model(tmp_path, "--rounds", "2"))


def test_a_regression_with_adam_over_the_network_equals_the_simulation(cluster, tmp_path):
    """Another task (diabetes regression, Adam on the clients): the clients learn it from the
    server's settings, and the networked run ends at the simulation's weights."""
    pytest.importorskip("sklearn")
    flags = [
        "--dataset",
        "diabetes",
        "--task",
        "regression",
        "--optimizer",
        "adam",
        "--num-clients",
        "3",
        "--clients-per-round",
        "3",
        "--batch-size",
        "16",
        "--rounds",
        "3",
        "--model",
        "mlp",
    ]
    server, port = cluster.server("--insecure", "--min-clients", "3", *flags)
    clients = [cluster.client(i, port, dataset="diabetes") for i in range(3)]
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients)
    assert "final test r2" in server.text()
    networked = torch.load(tmp_path / "runs" / "net" / "model.pt")
    assert fedforge(["run", "-q", *flags, "--out-dir", str(tmp_path / "sim"), "--name", "sim"]) == 0
    assert_same_model(networked, torch.load(tmp_path / "sim" / "sim" / "model.pt"))


CUSTOM_APP = """
import torch
import torch.nn.functional as F
from torch import nn

import fedforge as ff
from fedforge.experiment import load


def huber(outputs, target):
    return F.smooth_l1_loss(outputs.reshape(target.shape), target)


def sums(outputs, target):
    outputs = outputs.reshape(target.shape)
    return {"loss": F.smooth_l1_loss(outputs, target, reduction="sum"), "abs_error": (outputs - target).abs().sum()}


TASK = ff.Task("huber", huber, sums, optimizer=torch.optim.Adam, optimizer_options={"betas": (0.8, 0.9)},
               target="target")


def model(input_shape, num_classes):
    return nn.Sequential(nn.Linear(input_shape[0], 16), nn.Tanh(), nn.Linear(16, 1))


def data(client_id, config):  # this client's own rows, as a dict naming the target
    federated = load(config, progress=False)[1]
    part = federated.train.subset(federated.partition[client_id])
    return {"features": part.x.numpy(), "target": part.y.numpy()}


APP = ff.ClientApp(data=data, task=TASK, model=model)
"""


def test_a_custom_task_from_the_clients_app_equals_the_simulation(cluster, tmp_path, monkeypatch):
    """`fedforge client --app`: the client's own loss, metric, optimizer options, model and data
    code; the server imports only the task and model it evaluates. Same weights as simulating."""
    pytest.importorskip("sklearn")
    (tmp_path / "custom_app.py").write_text(CUSTOM_APP)
    flags = [
        "--dataset",
        "diabetes",
        "--task",
        "custom_app:TASK",
        "--model",
        "custom_app:model",
        "--num-clients",
        "3",
        "--clients-per-round",
        "3",
        "--batch-size",
        "16",
        "--rounds",
        "3",
        "--lr",
        "0.05",
    ]
    server, port = cluster.server("--insecure", "--min-clients", "3", *flags)
    clients = [cluster.app_client(i, port, "custom_app:APP") for i in range(3)]
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients), [c.text() for c in clients]
    history = json.loads((tmp_path / "runs" / "net" / "history.json").read_text())
    assert history["rounds"][-1]["metrics"]["test_abs_error"] > 0
    networked = torch.load(tmp_path / "runs" / "net" / "model.pt")
    monkeypatch.chdir(tmp_path)
    assert fedforge(["run", "-q", *flags, "--out-dir", str(tmp_path / "sim"), "--name", "sim"]) == 0
    assert_same_model(networked, torch.load(tmp_path / "sim" / "sim" / "model.pt"))


def test_client_side_clipping_over_the_network_spends_the_simulations_epsilon(cluster, tmp_path):
    """--dp client in deployment: the clients clip, the server adds noise from the OS's source (so
    the weights differ from the seeded simulation's) and spends exactly the simulation's epsilon."""
    flags = ["--rounds", "2", "--dp", "client", "--target-epsilon", "3", "--delta", "0.01", "--clip", "0.5"]
    server, port = cluster.server("--insecure", "--min-clients", "3", *BASE, *flags)
    clients = [cluster.client(i, port) for i in range(3)]
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients)
    networked = json.loads((tmp_path / "runs" / "net" / "history.json").read_text())["rounds"]
    simulated_model(tmp_path, *flags)
    simulated = json.loads((tmp_path / "sim" / "sim" / "history.json").read_text())["rounds"]
    assert [r["metrics"]["epsilon"] for r in networked] == [r["metrics"]["epsilon"] for r in simulated]
    assert all(r["metrics"]["over_bound"] == 0 for r in networked if r["round"] > 0)  # no honest update clipped
    assert 0 < networked[-1]["metrics"]["epsilon"] <= 3
    assert networked[-1]["test_loss"] != simulated[-1]["test_loss"]  # the server's noise is not the seed's


@pytest.mark.parametrize("mode", ["local", "client"])
def test_an_update_of_norm_a_million_moves_the_model_by_at_most_an_honest_clients_bound(cluster, tmp_path, mode):
    """A hostile client sends a well-formed update of norm 10^6, neither clipped nor noised, in each
    round. The server clips it to what an honest client's stays within (local: `local_bound`;
    client: C), so each round moves the model by at most the bound of three honest updates (plus,
    in client mode, the server's noise), counts it in `over_bound` and logs it; the honest
    clients' updates are never clipped."""
    from fedforge.privacy import local_bound

    z, clip, m = 0.5, 0.5, 3
    flags = ["--rounds", "2", "--dp", mode, "--noise-multiplier", str(z), "--clip", str(clip), "--delta", "0.01"]
    server, port = cluster.server("--insecure", "--min-clients", "3", *BASE, *flags)
    honest = [cluster.client(i, port) for i in range(2)]
    cluster.stub(2, port, "norm,norm")
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in honest)
    models = [torch.load(tmp_path / f"stub-2-task-{t}.pt") for t in (1, 2)]
    models.append(torch.load(tmp_path / "runs" / "net" / "model.pt"))
    size = sum(v.numel() for v in models[0].values())
    noise = local_bound(clip, z, size) - clip  # what the norm of N(0, (zC)^2 I_d) stays within (but w.p. 1e-9)
    bound = local_bound(clip, z, size) if mode == "local" else (m * clip + noise) / m
    for before, after in itertools.pairwise(models):
        moved = torch.cat([(after[k] - before[k]).flatten() for k in before]).norm().item()
        assert 0 < moved <= bound, (moved, bound)
    rounds = json.loads((tmp_path / "runs" / "net" / "history.json").read_text())["rounds"]
    assert [r["metrics"]["over_bound"] for r in rounds if r["round"] > 0] == [1, 1]  # the stub's, no honest one
    assert server.text().count("client 2 sent an update of norm 1e+06, above the") == 2
