"""An hf: model with LoRA over the network: each client loads its own copy of the model, only the
adapters travel, and the run equals the simulation. Tiny Llama saved into a tmp folder, real gRPC
sockets on 127.0.0.1."""

import json
import sys

import pytest
import torch
from test_personal import TappedServer, assert_same_model, simulated

from fedforge.algorithms import nbytes
from fedforge.network.wire import Kind

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("peft")
from fedforge.llm.models import save_tiny_llama  # noqa: E402

# The clients' data: their parts of the run's partition of their copy of the dataset the server
# names (it names the folder, not its path).
APP = """
from fedforge.app import ClientApp
from fedforge.experiment import federated_data


def data(client_id, config):
    assert config.dataset == "hf:tokens"
    federated = federated_data(config.replace(dataset=DATASET))
    return federated.train.subset(federated.partition[client_id])


app = ClientApp(data=data)
"""


def _tiny_llama(folder):
    save_tiny_llama(folder, ["abcdefghijklmnopqrstuvwxyz .,;!?\n"], context=64)


def _tokens(folder):
    g = torch.Generator().manual_seed(0)
    motif = torch.randint(4, 30, (6,), generator=g)
    rows = torch.stack([motif.roll(-int(p)).repeat(5)[:25] for p in torch.randint(0, 6, (120,), generator=g)])
    columns = {
        "input_ids": rows[:, :-1],
        "attention_mask": torch.ones(120, 24, dtype=torch.long),
        "labels": rows[:, 1:],
    }
    datasets.Dataset.from_dict({k: v.tolist() for k, v in columns.items()}).save_to_disk(str(folder))


def _deploy(cluster, tmp_path, monkeypatch, *server_flags):
    """A LoRA run of 3 client processes, each with its own copy of the model and its part of the
    data; the server's received messages, its final adapters, and the simulation's."""
    torch.set_num_threads(1)
    _tiny_llama(tmp_path / "llama")
    _tokens(tmp_path / "tokens")
    (tmp_path / "lm_app.py").write_text(f"DATASET = {'hf:' + str(tmp_path / 'tokens')!r}\n{APP}")
    flags = [
        *("--dataset", f"hf:{tmp_path / 'tokens'}", "--target", "labels", "--task", "language-model"),
        *("--model", f"hf:{tmp_path / 'llama'}", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj"),
        *("--optimizer", "adamw", "--lr", "0.02", "--batch-size", "16"),
        *("--rounds", "2", "--num-clients", "3", "--clients-per-round", "3"),
    ]
    server = TappedServer(tmp_path, monkeypatch, *flags, *server_flags)
    clients = [
        cluster.start(
            f"client-{i}",
            [
                *(sys.executable, "-m", "fedforge", "client", "--threads", "1", "--insecure"),
                *("--server", f"127.0.0.1:{server.port}", "--client-id", str(i), "--token-file", f"client-{i}.token"),
                *("--app", "lm_app:app", "--model", f"hf:{tmp_path / 'llama'}"),
            ],
        )
        for i in range(3)
    ]
    assert server.wait() == 0, [c.text() for c in clients]
    assert all(c.wait() == 0 for c in clients), [c.text() for c in clients]
    model = torch.load(server.run_dir / "model.pt")
    assert len(model) == 8 and all(".lora_" in n for n in model)  # 2 layers x (q, v) x (A, B)
    reference, history = simulated(tmp_path, *flags)
    return server, model, reference, history


def test_a_lora_run_over_the_network_equals_the_simulation_and_sends_only_the_adapters(cluster, tmp_path, monkeypatch):
    server, model, reference, history = _deploy(cluster, tmp_path, monkeypatch)
    assert_same_model(model, reference)
    updates = [m for m in server.received if m.kind == Kind.UPDATE]
    assert len(updates) == 6
    for message in updates:  # each client's update: its adapters' delta, nothing else
        assert {n.partition("/")[2] for n in message.tensors} == model.keys()
        assert nbytes(message.tensors) == nbytes(model) == 8 * 4 * 64 * 4
    assert [r["metrics"]["payload_up"] for r in history[1:]] == [3 * nbytes(model)] * 2
    # On the wire: the adapters and each message's header (its metrics, the tensors' names and shapes).
    sent = [r["metrics"]["bytes_up"] for r in json.loads((server.run_dir / "history.json").read_text())["rounds"][1:]]
    assert all(3 * nbytes(model) < b < 3 * (nbytes(model) + 4096) for b in sent), sent


def test_secure_aggregation_sums_the_adapters(cluster, tmp_path, monkeypatch):
    """The server sees masked adapters only (one word per adapter entry and a few more: the weight and
    the loss), never a client's update, and unmasks their sum: the simulation's run within the fixed
    point's error."""
    server, model, reference, _ = _deploy(cluster, tmp_path, monkeypatch, "--secure-aggregation")
    assert not [m for m in server.received if m.kind == Kind.UPDATE]
    masked = [m for m in server.received if m.kind == Kind.SA_MASKED]
    assert len(masked) == 6
    entries = sum(v.numel() for v in model.values())
    for message in masked:
        assert not any(name.startswith("delta/") for name in message.tensors)
        words = sum(t.numel() for t in message.tensors.values())
        assert entries <= words <= entries + 8, (words, entries)
    assert model.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(model[name], value, rtol=0, atol=1e-4)
