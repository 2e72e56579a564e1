"""What a deployment says when the parts do not fit: data prepared unlike the server's test data,
a model that does not fit the data, a server that cannot be reached."""

import json
import re
import sys
import time
import urllib.request

import pytest
from cluster import free_port

from fedforge.cli import build_parser
from fedforge.network.client import DEFAULT_GIVE_UP_AFTER
from fedforge.network.inputs import InputSummary
from fedforge.network.settings import ClientNodeSettings

# A client whose own code scales the pixels to [0, 1] (as x / 255 does), while the server's
# built-in digits are in [-1, 1].
UNIT_RANGE_APP = """
import fedforge as ff
from fedforge.experiment import load


def data(client_id, config):
    federated = load(config, progress=False)[1]
    part = federated.train.subset(federated.partition[client_id])
    return part.x * 0.5 + 0.5, part.y


APP = ff.ClientApp(data=data)
"""

DIGITS = [
    "--dataset",
    "digits",
    "--num-clients",
    "3",
    "--clients-per-round",
    "3",
    "--model",
    "logreg",
    "--batch-size",
    "32",
]


@pytest.mark.parametrize("secure", [(), ("--secure-aggregation",)], ids=["plain", "secure-aggregation"])
def test_a_client_whose_inputs_differ_from_the_servers_test_inputs_says_so(cluster, tmp_path, secure):
    """The client warns on its console and flags its updates (under secure aggregation, which
    sends no update, its keys); the server warns once per such client, on its console and on the
    dashboard; the clients prepared like the server say nothing."""
    pytest.importorskip("sklearn")
    (tmp_path / "unit_range_app.py").write_text(UNIT_RANGE_APP)
    server, port = cluster.server(
        "--insecure", "--min-clients", "3", "--rounds", "40", "--dashboard", "0", *DIGITS, *secure
    )
    url = server.wait_for(r"dashboard at (\S+)").group(1)
    odd = cluster.app_client(0, port, "unit_range_app:APP")
    fine = [cluster.client(i, port, dataset="digits") for i in (1, 2)]
    odd.wait_for(r"client 0: this client's training inputs differ markedly .*their mean is", timeout=120)
    warning = "client 0 says its training inputs differ markedly from the server's test inputs"
    server.wait_for(re.escape(warning), timeout=120)
    for _ in range(600):
        with urllib.request.urlopen(url + "api/state", timeout=30) as response:
            log = json.loads(response.read())["log"]
        if any(warning in entry["message"] for entry in log):
            break
    else:
        raise AssertionError(f"the dashboard's log has no {warning!r}: {log}")
    server.wait_for(r"round 5/40", timeout=120)  # several updates of client 0 have come since
    assert server.text().count(warning) == 1
    assert "client 1 says" not in server.text() and "client 2 says" not in server.text()
    assert all("differ markedly" not in c.text() for c in fine)


# The server's logreg has the same tensors (a Linear of 64 inputs after a layer without weights),
# but this model forgets to flatten the 1x8x8 images.
UNFLATTENED_APP = """
from torch import nn

import fedforge as ff
from fedforge.experiment import load


def data(client_id, config):
    return load(config, progress=False)[1].train


def model(input_shape, num_classes):
    return nn.Sequential(nn.Identity(), nn.Linear(64, num_classes))


APP = ff.ClientApp(data=data, model=model)
"""


def test_a_clients_model_that_does_not_fit_its_data_is_one_line(cluster, tmp_path):
    pytest.importorskip("sklearn")
    (tmp_path / "unflattened_app.py").write_text(UNFLATTENED_APP)
    _, port = cluster.server(
        "--insecure",
        "--min-clients",
        "1",
        "--dataset",
        "digits",
        "--num-clients",
        "1",
        "--clients-per-round",
        "1",
        "--model",
        "logreg",
    )
    client = cluster.app_client(0, port, "unflattened_app:APP")
    assert client.wait() == 2, client.text()
    errors = [line for line in client.text().splitlines() if "error" in line.lower()]
    assert errors == [
        "fedforge: error: model unflattened_app:model does not fit the data: on a batch of inputs of "
        "shape (2, 1, 8, 8) it fails with RuntimeError: mat1 and mat2 shapes cannot be multiplied "
        "(16x8 and 64x10)"
    ], client.text()
    assert "Traceback" not in client.text()


@pytest.mark.parametrize(
    "header, reason",
    [
        ({"shape": [1, 8, 8], "mean": 0.0}, "not a dict of shape, mean and std"),
        ({"shape": [1] * 9, "mean": 0.0, "std": 1.0}, "at most 8 sizes"),
        ({"shape": [0], "mean": 0.0, "std": 1.0}, "at most 8 sizes"),
        ({"shape": [2**40], "mean": 0.0, "std": 1.0}, "at most 8 sizes"),
        ({"shape": "1,8,8", "mean": 0.0, "std": 1.0}, "at most 8 sizes"),
        ({"shape": [True], "mean": 0.0, "std": 1.0}, "at most 8 sizes"),
        ({"shape": [64], "mean": float("nan"), "std": 1.0}, "its mean is not a number"),
        ({"shape": [64], "mean": 1e300, "std": 1.0}, "its mean is not a number"),
        ({"shape": [64], "mean": 0.0, "std": -1.0}, "its std is not a number"),
        ({"shape": [64], "mean": 0.0, "std": "1"}, "its std is not a number"),
    ],
)
def test_a_hostile_servers_summary_is_refused_with_its_reason(header, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        InputSummary.from_header(header)


def test_what_differs_markedly():
    server = InputSummary((1, 8, 8), -0.4, 0.75)
    assert server.differs(InputSummary((1, 8, 8), -0.1, 0.7)) is None  # 0.4 standard deviations apart
    assert "mean" in server.differs(InputSummary((1, 8, 8), 0.3, 0.375))  # [0, 1] instead of [-1, 1]
    assert "standard deviation" in server.differs(InputSummary((1, 8, 8), -0.4, 2.0))
    assert "shape" in server.differs(InputSummary((64,), -0.4, 0.75))


def knock(cluster, name, server, *flags):
    """A client of `server` that gives up after 5 s without one."""
    return cluster.start(
        name,
        [
            sys.executable,
            "-m",
            "fedforge",
            "client",
            "--threads",
            "1",
            "--server",
            server,
            "--client-id",
            "0",
            "--token-file",
            "client-0.token",
            "--partition-of",
            "synthetic:0/3",
            "--give-up-after",
            "5",
            *flags,
        ],
    )


def test_a_client_that_cannot_connect_says_why_and_gives_up(cluster, tmp_path):
    cluster.fedforge("certs", "--out", "certs")
    cluster.fedforge("certs", "--out", "other")  # another CA
    plain, plain_port = cluster.server(
        "--insecure",
        "--min-clients",
        "3",
        "--dataset",
        "synthetic",
        "--num-clients",
        "3",
        "--clients-per-round",
        "3",
        name="plain",
    )
    tls, tls_port = cluster.server(
        "--tls-cert",
        "certs/server.pem",
        "--tls-key",
        "certs/server.key",
        "--min-clients",
        "3",
        "--dataset",
        "synthetic",
        "--num-clients",
        "3",
        "--clients-per-round",
        "3",
        name="tls",
    )
    closed = f"127.0.0.1:{free_port()}"
    cases = {
        "refused": (
            knock(cluster, "refused", closed, "--insecure"),
            f"cannot connect to {closed}: connection refused (is the server running, on that port?)",
        ),
        "unresolved": (
            knock(cluster, "unresolved", "nonexistent.invalid:1", "--insecure"),
            "cannot connect to nonexistent.invalid:1: its name could not be resolved",
        ),
        "tls-to-plain": (
            knock(cluster, "tls-to-plain", f"127.0.0.1:{plain_port}", "--root-cert", "certs/ca.pem"),
            f"cannot connect to 127.0.0.1:{plain_port}: TLS handshake failed: is the server using TLS?",
        ),
        "plain-to-tls": (
            knock(cluster, "plain-to-tls", f"127.0.0.1:{tls_port}", "--insecure"),
            f"cannot connect to 127.0.0.1:{tls_port}: the server closed the connection at once: is it "
            f"using TLS? (then --root-cert, not --insecure)",
        ),
        "other-ca": (
            knock(cluster, "other-ca", f"127.0.0.1:{tls_port}", "--root-cert", "other/ca.pem"),
            f"cannot connect to 127.0.0.1:{tls_port}: TLS handshake failed: the server's certificate is not "
            f"one --root-cert vouches for",
        ),
    }
    assert all(client.wait() == 2 for client, _ in cases.values()), [c.text() for c, _ in cases.values()]
    # Neither server's console shows gRPC's C-core lines (I1207 12:00:00.000 ... ssl_transport_security.cc:...]
    # Handshake failed ...), and fedforge's own lines are there.
    for server in (plain, tls):
        assert not re.search(r"^[IWEF]\d{4} |Handshake failed|\.cc:\d+\]", server.text(), re.M), server.text()
        assert "waiting for 3 clients" in server.text()
    for name, (client, words) in cases.items():
        assert words in client.text(), (name, client.text())
        assert "no server for 5 s; giving up" in client.text()
        assert "UNAVAILABLE" not in client.text() and not re.search(r"^[IWEF]\d{4} ", client.text(), re.M)


def test_the_time_without_a_server_counts_from_the_connections_end(cluster, tmp_path):
    """A client connected (idle, never selected) for longer than --give-up-after that then loses
    its server keeps trying for --give-up-after seconds from that moment."""
    server, port = cluster.server(
        "--insecure", "--min-clients", "3", "--dataset", "synthetic", "--num-clients", "3", "--clients-per-round", "3"
    )
    client = knock(cluster, "idle", f"127.0.0.1:{port}", "--insecure")
    client.wait_for("joined", timeout=120)
    time.sleep(7)  # what is tested is time connected: longer than the client's 5 s
    server.kill()
    assert client.wait() == 2, client.text()
    lost = client.text().index("connection lost")
    assert "connection refused" in client.text()[lost:], client.text()


def test_give_up_after_has_a_finite_default_shown_in_help(capsys):
    parser = build_parser()
    assert ClientNodeSettings.__dataclass_fields__["give_up_after"].default == DEFAULT_GIVE_UP_AFTER == 600
    with pytest.raises(SystemExit):
        parser.parse_args(["client", "--help"])
    assert "(inf: never) (default: 600.0)" in " ".join(capsys.readouterr().out.split())
