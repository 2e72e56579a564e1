"""A deployment whose every setting is in TOML files: the server's and each client's."""

import json
import sys

from own_strategy import notes, write_strategy

SERVER_TOML = """
rounds = 2
dataset = "synthetic"
num_clients = 3
clients_per_round = 3
model = "logreg"
out_dir = "runs"
name = "net"

[client]
batch_size = 10

[strategy]
name = "{strategy}"
server_lr = 0.5

[server]
address = "127.0.0.1:0"
tokens = "tokens.json"
tls_cert = "certs/server.pem"
tls_key = "certs/server.key"
min_clients = 3
min_fit_clients = 3
min_available_clients = 3
secure_aggregation = true
secagg_threshold = 2
dashboard = 0
threads = 1
"""

CLIENT_TOML = """
[node]
server = "127.0.0.1:{port}"
client_id = {i}
token_file = "client-{i}.token"
root_cert = "certs/ca.pem"
partition_of = "synthetic:{i}/3"
threads = 1
"""


def test_a_deployment_from_config_files_with_tls_quorum_secure_aggregation_dashboard_and_own_strategy(
    cluster, tmp_path
):
    cluster.fedforge("certs", "--out", "certs")
    strategy = write_strategy(tmp_path, "own_strategy_net")
    (tmp_path / "server.toml").write_text(SERVER_TOML.format(strategy=strategy))
    server = cluster.start("server", [sys.executable, "-m", "fedforge", "server", "-q", "--config", "server.toml"])
    port = int(server.wait_for(r"listening on port (\d+)").group(1))
    assert server.wait_for(r"dashboard at (https?://127\.0\.0\.1:\d+/)")
    clients = []
    for i in range(3):
        (tmp_path / f"client-{i}.toml").write_text(CLIENT_TOML.format(port=port, i=i))
        clients.append(
            cluster.start(f"client-{i}", [sys.executable, "-m", "fedforge", "client", "--config", f"client-{i}.toml"])
        )
    assert server.wait() == 0, server.text()
    assert all(c.wait() == 0 for c in clients), [c.text() for c in clients]
    log = server.text()
    assert "plaintext" not in log and not any("plaintext" in c.text() for c in clients)  # TLS from the files
    assert "the sum of 3 masked updates" in log  # secure aggregation, its quorum of 3
    assert notes(tmp_path) == ["0.5", "0.5"]  # the server's own strategy, with its option from [strategy]
    history = json.loads((tmp_path / "runs" / "net" / "history.json").read_text())
    assert len(history["rounds"]) == 3 and all(sorted(r["clients"]) == [0, 1, 2] for r in history["rounds"][1:])
