"""A real `fedforge client` process in front of a scripted, hostile server (fake_server.py):
whatever the server sends, the client answers with one logged line and a documented exit
status, runs no code its operator did not name, and trains no more than its limits allow."""

import json
import queue
import sys

import grpc
import pytest
import torch
from cluster import BASE
from fake_server import FakeServer

from fedforge.client import ClientConfig, ClientPlan, client_batches
from fedforge.config import Config
from fedforge.experiment import load
from fedforge.models import build_model
from fedforge.network.auth import read_secret
from fedforge.network.hub import CLIENT_ID_KEY, METHOD, SECRET_KEY
from fedforge.network.wire import Kind, Message, decode, encode

SETTINGS = {
    "seed": 0,
    "dataset": "synthetic",
    "num_clients": 3,
    "clients_per_round": 3,
    "model": "logreg",
    "batch_size": 10,
}
CONFIG = Config(**SETTINGS)


def welcome(**changes) -> Message:
    return Message(Kind.WELCOME, {"config": {**SETTINGS, **changes}})


def global_state() -> dict[str, torch.Tensor]:
    data = load(CONFIG, progress=False)[1].train
    return build_model("logreg", tuple(data.x.shape[1:]), 10, seed=0).state_dict()


def task(tensors=None, **changes) -> Message:
    header = {
        "task": 1,
        "seed": 7,
        "counted": 0,
        "epochs": None,
        "max_steps": None,
        "proximal_mu": 0.0,
        "measure_initial_loss": False,
        "clip": None,
        "noise_multiplier": 0.0,
        **changes,
    }
    header = {k: v for k, v in header.items() if v != "absent"}
    state = {f"global/{k}": v for k, v in global_state().items()}
    return Message(Kind.TASK, header, state if tensors is None else tensors(state))


def evaluate(tensors=None, **changes) -> Message:
    """A request to evaluate the global model (the server's after a round, under federated evaluation)."""
    header = {"task": 2, "algorithm": {"name": "fedavg", "options": {}}, **changes}
    state = {f"global/{k}": v for k, v in global_state().items()}
    return Message(Kind.EVALUATE, header, state if tensors is None else tensors(state))


DONE = Message(Kind.SHUTDOWN, {"status": "done"})


def algorithm(**roles) -> dict:
    """FedAvg's clients described with role patterns, as a server's --personal or --frozen sends them."""
    return {"name": "fedavg", "options": {}, **roles}


def client(cluster, server: FakeServer, *flags, name="client"):
    return cluster.start(
        name,
        [
            sys.executable,
            "-m",
            "fedforge",
            "client",
            "--threads",
            "1",
            "--insecure",
            "--server",
            f"127.0.0.1:{server.port}",
            "--client-id",
            "0",
            "--token-file",
            "client-0.token",
            "--give-up-after",
            "120",
            *flags,
        ],
    )


def partition_client(cluster, server, *flags, name="client"):
    return client(cluster, server, "--partition-of", "synthetic:0/3", *flags, name=name)


def refused(proc, reason: str) -> None:
    """The client exited with status 3 after one line naming `reason`, without a traceback."""
    assert proc.wait(120) == 3, proc.text()
    text = proc.text()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "refused a message from the server" in line]
    assert len(lines) == 1 and reason in lines[0], text


def test_a_well_formed_task_is_answered(cluster):
    with FakeServer([welcome(), task(), DONE]) as server:
        proc = partition_client(cluster, server)
        assert proc.wait(120) == 0, proc.text()
    assert [(m.kind, m.header["task"]) for m in server.replies] == [(Kind.UPDATE, 1)]


def test_a_request_to_evaluate_is_answered_with_the_held_out_examples_metrics(cluster):
    """A client without held-out examples (synthetic's partition holds none) answers 0 examples
    and no metrics; the request's task id and its own client id name the answer."""
    with FakeServer([welcome(), evaluate(), task(), evaluate(task=3), DONE]) as server:
        proc = partition_client(cluster, server)
        assert proc.wait(120) == 0, proc.text()
    assert [(m.kind, m.header["task"]) for m in server.replies] == [
        (Kind.EVALUATION, 2),
        (Kind.UPDATE, 1),
        (Kind.EVALUATION, 3),
    ]
    assert server.replies[0].header == {"task": 2, "client": 0, "metrics": {}, "num_examples": 0}
    assert not server.replies[0].tensors


def test_an_evaluate_before_the_welcome_is_refused(cluster):
    with FakeServer([evaluate()]) as server:
        refused(partition_client(cluster, server), "a EVALUATE before its welcome")


# A task whose lr is NaN: JSON's NaN, which encode() never writes, as a hostile server could.
NAN_LR = encode(task(lr=0.5)).replace(b'"lr":0.5', b'"lr":NaN')
NAN = lambda state: {k: torch.full_like(v, float("nan")) for k, v in state.items()}  # noqa: E731
EXTRA = lambda state: {**state, "global/evil": torch.zeros(3)}  # noqa: E731


@pytest.mark.parametrize(
    "message, reason",
    [
        (task(seed="absent"), "seed None is not an integer"),
        (task(epochs="ten"), "epochs 'ten' is not an integer"),
        (task(epochs=-5), "epochs -5 is not an integer"),
        (task(epochs=10**9), "epochs 1000000000 is not an integer in [1, 1000] (this client's --max-epochs)"),
        (task(task="one"), "task 'one' is not an integer"),
        (task(counted="absent"), "counted None is not an integer"),
        (task(counted=1), "counted 1 is not an integer in [0, 0]"),  # a round counted before the task's first
        (task(counted=3, round=3, rounds=3), "counted 3 is not an integer in [0, 2]"),
        (task(clip=-1.0), "clip -1.0 is not a number"),
        (task(NAN), "its global tensors hold NaN or infinite values"),
        (task(EXTRA), "tensors ['global/evil'] are not of this client's model"),
        (Message(Kind.UPDATE, {"task": 1}), "a UPDATE message, which only clients send"),
        (task(lr=-0.1), "lr -0.1 is not a number in [1e-30, 1e+06]"),
        (task(lr=1e30), "lr 1e+30 is not a number in [1e-30, 1e+06]"),
        (task(lr=0), "lr 0 is not a number in [1e-30, 1e+06]"),
        (task(lr="0.1"), "lr '0.1' is not a number"),
        (NAN_LR, "a malformed message: header number is not finite"),
        (task(round=4, rounds=3), "round 4 is not an integer in [1, 3]"),
        (task(round=0, rounds=3), "round 0 is not an integer in [1, 3]"),
        (task(round=2), "round 2 is not an integer in [0, 0]"),
        (task(round=1, rounds=10**9), "rounds 1000000000 is not an integer in [0, 1000000]"),
        (task(local_epochs=5000), "local_epochs 5000 is not an integer in [1, 1000] (this client's --max-epochs)"),
        (task(momentum=1.0), "task 1: momentum must be in [0, 1), got 1.0"),
        (task(weight_decay=-1.0), "weight_decay -1.0 is not a number in [0, 1e+06]"),
        (welcome(batch_size="ten"), "batch_size must be int, got 'ten'"),
        # A request to evaluate the global model is checked as a task is.
        (evaluate(task="two"), "task 'two' is not an integer"),
        (evaluate(NAN), "its global tensors hold NaN or infinite values"),
        (evaluate(EXTRA), "tensors ['global/evil'] are not of this client's model"),
        (evaluate(lambda state: {k: v.double() for k, v in state.items()}), "is torch.float64, the model's"),
        (evaluate(algorithm={"name": "os.system", "options": {}}), "algorithm 'os.system' is not a built-in one"),
        (Message(Kind.EVALUATION, {"task": 1}), "a EVALUATION message, which only clients send"),
        # Hostile algorithm descriptions: a name that is not a built-in, role patterns that are not a
        # short list of short strings, or that match nothing (or everything) of the client's model.
        (task(algorithm={"name": "os.system", "options": {}}), "algorithm 'os.system' is not a built-in one"),
        (task(algorithm={"name": "fedavg", "options": {}, "code": "x"}), "algorithm must be {name, options}"),
        (task(algorithm=algorithm(personal="1.*")), "personal must be 1 to 32 name patterns"),
        (task(algorithm=algorithm(personal=["1.*"] * 33)), "personal must be 1 to 32 name patterns"),
        (task(algorithm=algorithm(frozen=["x" * 201])), "frozen must be 1 to 32 name patterns"),
        (task(algorithm=algorithm(frozen=[3])), "frozen must be 1 to 32 name patterns"),
        (task(algorithm=algorithm(personal=["head.*"])), "personal pattern 'head.*' matches no entry of the model"),
        (task(algorithm=algorithm(personal=["1.*"])), "leave no entry of this client's model shared"),
    ],
)
def test_a_malformed_message_is_one_line_and_status_3(cluster, message, reason):
    script = [message] if isinstance(message, Message) and message.kind == Kind.WELCOME else [welcome(), message]
    with FakeServer(script) as server:
        refused(partition_client(cluster, server), reason)


def test_a_welcomes_lr_past_the_bound_is_refused_at_the_first_task(cluster):
    # A task without an lr of its own (an older server's) trains with the welcome's, bounded the same.
    with FakeServer([welcome(lr=1e38), task()]) as server:
        refused(partition_client(cluster, server), "lr 1e+38 is not a number in [1e-30, 1e+06]")


def personal_task(round_: int, counted: int) -> Message:
    """Round `round_` of 3 for a client whose bias is personal (kept in its client state), the server
    saying that its update last counted in round `counted`; the same global model and seed each time."""
    shared = lambda state: {"global/1.weight": state["global/1.weight"]}  # noqa: E731
    return task(shared, round=round_, rounds=3, counted=counted, algorithm=algorithm(personal=["1.bias"]))


def deltas(update: Message) -> dict[str, torch.Tensor]:
    return {k: v for k, v in update.tensors.items() if k.startswith("delta/")}


def test_a_client_keeps_the_state_of_exactly_the_updates_the_server_counted(cluster):
    """Round 1's update is not counted (refused, late, or of a failed round): round 2 starts from the
    same state, so its update is round 1's to the bit. Round 2's is counted: round 3 starts from the
    bias round 2 left, and the finished run's word commits round 3's (the file says so)."""
    from fedforge.network.state import read_state

    done = Message(Kind.SHUTDOWN, {"status": "done", "counted": 3})
    script = [welcome(), personal_task(1, 0), personal_task(2, 0), personal_task(3, 2), done]
    with FakeServer(script) as server:
        proc = partition_client(cluster, server, "--state-dir", "states")
        assert proc.wait(120) == 0, proc.text()
    first, second, third = (deltas(m) for m in server.replies)
    assert first.keys() == {"delta/1.weight"}  # the personal bias never travels
    assert all(torch.equal(first[k], second[k]) for k in first), "round 1's state was not dropped"
    assert not torch.equal(second["delta/1.weight"], third["delta/1.weight"]), "round 2's state was not committed"
    assert "the server has not counted its update of round 1: it starts task 1 from its state of round 0" in proc.text()
    model = build_model("logreg", tuple(load(CONFIG, progress=False)[1].train.x.shape[1:]), 10, seed=0)
    saved = read_state(cluster.tmp / "states" / "client-0.pt", 0, model)
    assert (saved.counted, saved.round, saved.pending) == (3, 0, None)
    assert saved.committed.client is not None and saved.committed.client.personal.keys() == {"1.bias"}


@pytest.mark.parametrize(
    "script, reason",
    [
        # It committed round 1's state; the server then says that none of its updates counted.
        (
            [personal_task(1, 0), personal_task(2, 1), personal_task(3, 0)],
            "task 1: the server counts this client's updates up to round 0, but this client has committed its "
            "update of round 1 (was the server resumed from an older checkpoint?)",
        ),
        # The server says it counted round 2, of which this client trained nothing.
        (
            [personal_task(1, 0), personal_task(3, 2)],
            "task 1: the server counted this client's update of round 2, and this client holds no state of it",
        ),
    ],
)
def test_a_server_whose_word_disagrees_with_the_clients_state_is_refused(cluster, script, reason):
    with FakeServer([welcome(), *script]) as server:
        refused(partition_client(cluster, server, "--state-dir", "states"), reason)


def test_a_task_whose_training_diverges_is_one_line_and_status_3(cluster):
    """A weight decay of 1e6 at lr 1 multiplies the weights by -999,999 a step: the client's
    training diverges. The server's task, not this client's settings, so one line and status 3
    (before: status 1, "refused")."""
    with FakeServer([welcome(), task(lr=1.0, weight_decay=1e6), DONE]) as server:
        proc = partition_client(cluster, server)
        assert proc.wait() == 3, proc.text()
    text = proc.text()
    assert "Traceback" not in text and "the server's task cannot be trained: " in text, text
    assert not server.replies


def test_a_task_before_the_welcome_is_refused(cluster):
    with FakeServer([task()]) as server:
        refused(partition_client(cluster, server), "a TASK before its welcome")


def test_with_retry_on_server_failure_a_refused_message_is_waited_out(cluster):
    with FakeServer([welcome(), task(epochs="ten")]) as server:
        proc = partition_client(cluster, server, "--retry-on-server-failure")
        proc.wait_for(
            r"(?s)refused a message from the server \(epochs 'ten'.*waiting for it to come back.*"
            r"refused a message from the server \(epochs 'ten'",
            timeout=120,
        )
        assert server.sessions >= 2 and proc.popen.poll() is None
        proc.kill()


@pytest.mark.parametrize(
    "flags, message, reason",
    [
        (["--max-batch-size", "5"], welcome(), "batch_size 10 is above this client's --max-batch-size 5"),
        (["--max-epochs", "2"], welcome(local_epochs=3), "local_epochs 3 is above this client's --max-epochs 2"),
        (["--max-steps", "4"], task(epochs=2), "asks for"),
    ],
)
def test_the_clients_limits_bound_what_a_server_may_ask(cluster, flags, message, reason):
    script = [message] if message.kind == Kind.WELCOME else [welcome(), message]
    with FakeServer(script) as server:
        proc = partition_client(cluster, server, *flags)
        refused(proc, reason)
    if "--max-steps" in flags:
        assert "above this client's --max-steps 4" in proc.text()


def test_training_past_max_round_seconds_leaves_the_round_and_the_client_stays(cluster):
    """1000 epochs of a few steps each, within the step limit, but not within 0.05 s: the
    client sends nothing for that task and takes the run's end as usual."""
    procs = []
    script = [
        welcome(),
        task(epochs=1000),
        lambda: procs[0].wait_for("left task 1 after --max-round-seconds", timeout=120),
        DONE,
    ]
    with FakeServer(script, reply_timeout=0.01) as server:
        procs.append(partition_client(cluster, server, "--max-round-seconds", "0.05"))
        assert procs[0].wait(120) == 0, procs[0].text()
    assert server.replies == []


def test_the_batch_order_is_drawn_epoch_by_epoch():
    """A task of 10**9 epochs cut at 3 steps draws one epoch's permutation, not 10**9 of them
    (it used to build them all first: 5.3 GB in 45 s and growing), and the same batches."""
    x, y = torch.arange(50.0).reshape(50, 1), torch.arange(50)
    config, generator = ClientConfig(batch_size=10), torch.Generator().manual_seed(3)
    batches = list(client_batches(x, y, config, ClientPlan(epochs=10**9, max_steps=3), generator))
    reference = torch.Generator().manual_seed(3)
    first = torch.randperm(50, generator=reference)
    assert [b[1].tolist() for b in batches] == [first[i : i + 10].tolist() for i in (0, 10, 20)]
    assert torch.equal(generator.get_state(), reference.get_state())  # nothing more was drawn


MARKER = """
from pathlib import Path
from torch import nn

Path("imported.marker").write_text("the server's code ran here")


def factory(input_shape, num_classes):
    return nn.Linear(input_shape[0], num_classes)
"""


@pytest.mark.parametrize(
    "what, name", [("model", "rt_marker:factory"), ("task", "rt_marker:factory"), ("task", "os:getpid")]
)
def test_code_the_server_names_is_refused_unless_allowed(cluster, tmp_path, what, name):
    (tmp_path / "rt_marker.py").write_text(MARKER)
    with FakeServer([welcome(**{what: name}), DONE]) as server:
        refused(
            partition_client(cluster, server), f"the server names {what} {name!r}, code this client does not import"
        )
    assert not (tmp_path / "imported.marker").exists()


def test_code_on_the_clients_allow_list_is_imported(cluster, tmp_path):
    (tmp_path / "rt_marker.py").write_text(MARKER)
    with FakeServer([welcome(model="rt_marker:factory"), DONE]) as server:
        proc = partition_client(cluster, server, "--allow", "rt_marker:factory")
        assert proc.wait(120) == 0, proc.text()
    assert "joined" in proc.text() and (tmp_path / "imported.marker").exists()


def test_a_clients_own_model_replaces_the_servers_reference(cluster, tmp_path):
    """--model on the client's command line: the server's reference is never imported."""
    (tmp_path / "rt_marker.py").write_text(MARKER)
    with FakeServer([welcome(model="rt_marker:factory"), task(), DONE]) as server:
        proc = partition_client(cluster, server, "--model", "logreg")
        assert proc.wait(120) == 0, proc.text()
    assert [m.kind for m in server.replies] == [Kind.UPDATE]
    assert not (tmp_path / "imported.marker").exists()


def test_a_message_past_max_message_mb_is_refused(cluster):
    """--max-message-mb 1 and a 2 MiB welcome (it used to pass: the bound was 4x the flag)."""
    padded = Message(Kind.WELCOME, welcome().header, {"padding": torch.zeros(2 << 18)})
    with FakeServer([padded, DONE]) as server:
        refused(
            partition_client(cluster, server, "--max-message-mb", "1"),
            f"a message larger than --max-message-mb ({1 << 20} bytes)",
        )


SECRETS = {
    "mlflow": "http://alice:hunter2@mlflow.internal:5000",
    "tensorboard": "/srv/secret-tb",
    "data_dir": "/srv/secret-data",
    "out_dir": "/srv/secret-runs",
    "name": "secret-run-name",
}


def test_the_welcome_holds_only_the_listed_settings():
    from fedforge.network.welcome import SETTINGS, welcome_header

    settings = welcome_header(Config(**{**CONFIG.__dict__, **SECRETS}))
    assert set(settings) == {"config"} and set(settings["config"]) <= set(SETTINGS)
    text = json.dumps(settings)
    assert not [v for v in SECRETS.values() if v in text]


def test_a_real_server_sends_an_enrolled_client_only_the_listed_settings(cluster, tmp_path):
    from fedforge.network.welcome import SETTINGS

    (tmp_path / "tb").mkdir()
    server, port = cluster.server(
        "--insecure",
        "--min-clients",
        "2",
        *BASE,
        "--tensorboard",
        str(tmp_path / "tb"),
        "--data-dir",
        str(tmp_path / "secret-data"),
    )
    outbox: queue.Queue = queue.Queue()
    metadata = ((CLIENT_ID_KEY, "0"), (SECRET_KEY, read_secret(tmp_path / "client-0.token")))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.stream_stream(METHOD)(iter(outbox.get, None), metadata=metadata)
        raw = next(stream)
        outbox.put(None)
    message = decode(raw)
    assert message.kind == Kind.WELCOME and set(message.header) == {"config"}
    assert set(message.header["config"]) <= set(SETTINGS), set(message.header["config"]) - set(SETTINGS)
    for secret in (str(tmp_path / "tb"), "secret-data", "runs", "net"):
        assert secret.encode() not in raw
    server.kill()
