"""Whole runs of the CLI on the real Fashion-MNIST."""

import json
import os
import signal
import subprocess
import sys

import torch
from helpers import PROCESS_S, bound, wait_for

from fedforge import evaluate
from fedforge.cli import main
from fedforge.config import Config
from fedforge.models import build_model


def test_tutorial_experiment_on_fashion_mnist(tmp_path, fashion, capsys):
    assert main(["run", "--dataset", "fashion-mnist", "--out-dir", str(tmp_path), "--name", "tutorial"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "tutorial"
    assert sorted(p.name for p in run.iterdir()) == [
        "accuracy.png",
        "checkpoint.pt",
        "config.toml",
        "history.csv",
        "history.json",
        "model.pt",
    ]
    history = json.loads((run / "history.json").read_text())["rounds"]
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4, 5]
    assert all(len(r["clients"]) == 5 for r in history[1:])
    final = history[-1]["test_accuracy"]
    assert final >= 0.75, f"the tutorial reaches 76-77% here, fedforge got {final}"
    assert "initial model" in out and "round 5/5" in out
    # The saved model is the final global model.
    model = build_model("mlp", (1, 28, 28), 10)
    state = torch.load(run / "model.pt")
    assert evaluate(model, state, fashion.test).accuracy == final
    # The resolved config reproduces the run's settings.
    config = Config.load(run / "config.toml")
    assert (config.dataset, config.name, config.rounds, config.lr) == ("fashion-mnist", "tutorial", 5, 0.01)
    assert (run / "history.csv").read_text().count("\n") == 7
    assert (run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def small_run(tmp_path, name, *extra):
    argv = [
        "run",
        "-q",
        "--dataset",
        "fashion-mnist",
        "--num-clients",
        "60",
        "--clients-per-round",
        "2",
        "--rounds",
        "2",
        "--out-dir",
        str(tmp_path),
        "--name",
        name,
        *extra,
    ]
    assert main(argv) == 0
    return torch.load(tmp_path / name / "model.pt"), json.loads((tmp_path / name / "history.json").read_text())


def test_same_seed_same_weights_on_real_data(tmp_path, fashion):
    a, ha = small_run(tmp_path, "a", "--seed", "3")
    b, hb = small_run(tmp_path, "b", "--seed", "3")
    c, _ = small_run(tmp_path, "c", "--seed", "4")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["clients"] for r in ha["rounds"]] == [r["clients"] for r in hb["rounds"]]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_config_file_and_flag_override(tmp_path, fashion):
    (tmp_path / "exp.toml").write_text(
        'dataset = "fashion-mnist"\nrounds = 1\nnum_clients = 60\n'
        'clients_per_round = 0.05\npartition = "dirichlet"\nalpha = 0.3\n'
    )
    assert (
        main(
            [
                "run",
                "-q",
                "--config",
                str(tmp_path / "exp.toml"),
                "--rounds",
                "2",
                "--out-dir",
                str(tmp_path),
                "--name",
                "x",
                "--client-test-fraction",
                "0.1",
            ]
        )
        == 0
    )
    history = json.loads((tmp_path / "x" / "history.json").read_text())["rounds"]
    assert len(history) == 3 and len(history[1]["clients"]) == 3
    assert history[-1]["federated_accuracy"] is not None
    saved = Config.load(tmp_path / "x" / "config.toml")
    assert (saved.rounds, saved.partition, saved.alpha, saved.client_test_fraction) == (2, "dirichlet", 0.3, 0.1)


def test_ctrl_c_saves_the_completed_rounds(tmp_path, fashion):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedforge",
            "run",
            "--dataset",
            "fashion-mnist",
            "--num-clients",
            "60",
            "--clients-per-round",
            "1",
            "--rounds",
            "1000",
            "--out-dir",
            str(tmp_path),
            "--name",
            "stop",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    history = tmp_path / "stop" / "history.json"
    wait_for(
        lambda: proc.poll() is not None or (history.exists() and len(json.loads(history.read_text())["rounds"]) >= 3),
        PROCESS_S,
        "round 2 in history.json",
    )
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=bound(PROCESS_S))
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    rounds = json.loads(history.read_text())["rounds"]
    assert 3 <= len(rounds) < 1001
    assert torch.load(tmp_path / "stop" / "model.pt").keys() == build_model("mlp", (1, 28, 28), 10).state_dict().keys()
    assert (tmp_path / "stop" / "accuracy.png").exists()
    assert not [p for p in (tmp_path / "stop").iterdir() if p.name.startswith(".")], "a temp file was left"


def test_partition_command(tmp_path, fashion, capsys):
    plot = tmp_path / "p.png"
    assert (
        main(
            [
                "partition",
                "-q",
                "--dataset",
                "fashion-mnist",
                "--partition",
                "dirichlet",
                "--alpha",
                "0.1",
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:11]]
    assert [int(r[0]) for r in rows] == list(range(10))
    assert sum(int(r[1]) for r in rows) == 60_000
    assert all(sum(map(int, r[2:])) == int(r[1]) for r in rows)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_run_resume_continues_to_the_same_result(tmp_path, capsys):
    common = [
        "run",
        "-q",
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
    assert main([*common, "--rounds", "5", "--name", "straight"]) == 0
    assert main([*common, "--rounds", "2", "--name", "pieces"]) == 0
    assert main(["run", "-q", "--resume", str(tmp_path / "pieces"), "--rounds", "5"]) == 0
    a, b = torch.load(tmp_path / "straight" / "model.pt"), torch.load(tmp_path / "pieces" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rounds = json.loads((tmp_path / "pieces" / "history.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4, 5]
    assert Config.load(tmp_path / "pieces" / "config.toml").rounds == 5
