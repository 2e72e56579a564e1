"""--resume checks what it resumes (the checkpoint's checksum, settings that would change the result)
and continues exactly: what the clients keep between their rounds (SCAFFOLD's controls, FedPer's
heads, Ditto's copies, kept optimizer states) included."""

import dataclasses
import io
import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from helpers import PROCESS_S, bound
from test_simulation import make_model, small_problem

from fedforge import ClientConfig, simulate
from fedforge.algorithms import Ditto, FedPer
from fedforge.cli import main
from fedforge.engines import SequentialEngine
from fedforge.history import History, RoundRecord
from fedforge.simulation import Kept, Progress
from fedforge.strategies import FedDyn, Scaffold
from fedforge.tasks import CLASSIFICATION

BASE = ["--dataset", "synthetic", "--num-clients", "3", "--clients-per-round", "3", "--model", "logreg", "-q"]


def fedforge(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def run_dir(tmp_path, capsys):
    assert fedforge(capsys, "run", *BASE, "--rounds", "2", "--out-dir", str(tmp_path), "--name", "r")[0] == 0
    return tmp_path / "r"


@pytest.mark.parametrize(
    "flags, changed",
    [
        (["--lr", "0.5"], "lr 0.01 there, 0.5 here"),
        (["--seed", "3"], "seed 0 there, 3 here"),
        (["--strategy", "fedprox"], "strategy 'fedavg' there, 'fedprox' here"),
        (["--num-clients", "4"], "num_clients 3 there, 4 here"),
    ],
)
def test_a_setting_that_changes_the_result_is_refused_by_name(capsys, run_dir, flags, changed):
    saved = (run_dir / "config.toml").read_text()
    code, _, err = fedforge(capsys, "run", "-q", "--resume", str(run_dir), "--rounds", "3", *flags)
    assert code == 2
    assert err.strip().splitlines() == [
        f"fedforge: error: cannot resume {run_dir}: it was run with other settings ({changed})"
    ]
    assert (run_dir / "config.toml").read_text() == saved  # not rewritten


def test_a_config_file_given_on_resume_is_checked_too(capsys, run_dir, tmp_path):
    (tmp_path / "other.toml").write_text("seed = 7\nrounds = 3\n")
    code, _, err = fedforge(capsys, "run", "-q", "--resume", str(run_dir), "--config", str(tmp_path / "other.toml"))
    assert code == 2 and "(seed 0 there, 7 here)" in err
    (tmp_path / "same.toml").write_text("seed = 0\nrounds = 3\n")  # only how long it runs: allowed
    assert fedforge(capsys, "run", "-q", "--resume", str(run_dir), "--config", str(tmp_path / "same.toml"))[0] == 0
    rounds = json.loads((run_dir / "history.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]


@pytest.mark.parametrize("damage", ["truncate", "empty", "random", "flip"])
def test_a_damaged_checkpoint_is_named_in_one_line(capsys, run_dir, damage):
    path = run_dir / "checkpoint.pt"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(bytes(range(256)) * 40)
    else:
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    code, _, err = fedforge(capsys, "run", "-q", "--resume", str(run_dir), "--rounds", "3")
    assert code == 2
    assert err.strip().splitlines() == [
        f"fedforge: error: cannot resume: {path} is damaged ({path.stat().st_size} "
        "bytes that fail their checksum: truncated or overwritten)"
    ]


def test_the_server_checks_the_checkpoint_before_it_listens(run_dir, tmp_path):
    (tmp_path / "tokens.json").write_text('{"clients": {}}')
    (run_dir / "checkpoint.pt").write_bytes(b"garbage")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedforge",
            "server",
            "--tokens",
            str(tmp_path / "tokens.json"),
            "--insecure",
            "--address",
            "127.0.0.1:0",
            "--resume",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=bound(PROCESS_S),
    )
    assert proc.returncode == 2
    assert "listening" not in proc.stdout
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"fedforge: error: cannot resume: {run_dir}/checkpoint.pt is damaged")
    )


def test_history_json_stays_json_when_a_number_is_not_finite():
    history = History([RoundRecord(round=0, clients=(), test_loss=math.inf, test_accuracy=0.1, train_loss=math.nan)])
    text = history.to_json()
    row = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))["rounds"][0]
    assert row["test_loss"] is None and row["train_loss"] is None and row["test_accuracy"] == 0.1


# Runs whose clients keep something between their rounds: 6 clients, 3 a round, so most train twice or more.
STATEFUL = {
    "scaffold": {"strategy": Scaffold()},
    "feddyn": {"strategy": FedDyn()},
    "fedper": {"client": ClientConfig(batch_size=16, lr=0.1, algorithm=FedPer())},
    "ditto": {"client": ClientConfig(batch_size=16, lr=0.1, algorithm=Ditto(lam=0.1))},
    "kept optimizer state": {
        "client": ClientConfig(
            batch_size=16, lr=0.1, momentum=0.9, task=dataclasses.replace(CLASSIFICATION, keep_optimizer_state=True)
        )
    },
}


def stateful_run(kind, **kwargs):
    return simulate(
        make_model(),
        small_problem(partition="dirichlet"),
        rounds=4,
        clients_per_round=3,
        engine=SequentialEngine(),
        seed=3,
        **{"client": ClientConfig(batch_size=16, lr=0.1), **STATEFUL[kind], **kwargs},
    )


class Stop(Exception):
    pass


def stopped(kind, at) -> Progress:
    """The progress a run of `kind` hands its checkpoint after round `at`, where it is stopped."""
    saved: list[Progress] = []

    def checkpoint(progress):
        saved.append(progress)
        if progress.state.round == at:
            raise Stop

    with pytest.raises(Stop):
        stateful_run(kind, checkpoint=checkpoint)
    return saved[-1]


def tables(kept: Kept) -> dict:
    """What the clients keep, as plain tables by client id (optimizer states flattened)."""
    optimizers = {
        c: {"step": o.step, **{f"{s}/{k}": v for s, t in o.slots.items() for k, v in t.items()}}
        for c, o in kept.optimizer_states.items()
    }
    return {"client": {c: s.flat() for c, s in kept.client_states.items()}, "optimizer": optimizers}


def same_tables(a: dict, b: dict) -> bool:
    return all(
        a[part].keys() == b[part].keys()
        and all(a[part][c].keys() == b[part][c].keys() for c in a[part])
        and all(torch.equal(a[part][c][k], b[part][c][k]) for c in a[part] for k in a[part][c])
        for part in a
    )


@pytest.mark.parametrize("kind", STATEFUL)
def test_a_stateful_run_resumed_mid_run_equals_the_uninterrupted_one(kind):
    whole = stateful_run(kind)
    progress = stopped(kind, at=2)
    assert progress.kept and [r.round for r in progress.records] == [0, 1, 2]
    resumed = stateful_run(kind, resume=progress)
    assert resumed.history.column("clients") == whole.history.column("clients")
    assert resumed.state.params.keys() == whole.state.params.keys()
    assert all(torch.equal(resumed.state.params[k], v) for k, v in whole.state.params.items())
    assert tables(whole.kept)["client" if kind != "kept optimizer state" else "optimizer"]
    assert same_tables(tables(resumed.kept), tables(whole.kept))


@pytest.mark.parametrize("kind", STATEFUL)
def test_the_older_resume_form_starts_the_clients_afresh_and_says_so(kind, caplog):
    whole = stateful_run(kind)
    progress = stopped(kind, at=2)
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        resumed = stateful_run(kind, resume=(progress.state, progress.records))
    assert "resuming at round 2 from (state, records), without what the clients keep" in caplog.text
    assert not same_tables(tables(resumed.kept), tables(whole.kept))


STATEFUL_FLAGS = {
    "scaffold": ["--strategy", "scaffold"],
    "fedper": ["--algorithm", "fedper", "--model", "mlp"],  # logreg's one layer is all head
    "ditto": ["--algorithm", "ditto"],
    "kept optimizer state": ["--keep-optimizer-state", "--momentum", "0.9"],
}


def checkpoint_payload(run_dir):
    data = (run_dir / "checkpoint.pt").read_bytes()
    return torch.load(io.BytesIO(data[data.index(b"\n") + 1 + 32 :]), weights_only=True)


@pytest.mark.parametrize("kind", STATEFUL_FLAGS)
def test_run_resume_of_a_stateful_run_equals_the_uninterrupted_one(capsys, tmp_path, kind):
    common = [
        "run",
        "--dataset",
        "synthetic",
        "--num-clients",
        "6",
        "--clients-per-round",
        "3",
        "--model",
        "logreg",
        "-q",
        "--engine",
        "sequential",
        "--out-dir",
        str(tmp_path),
        *STATEFUL_FLAGS[kind],
    ]
    assert fedforge(capsys, *common, "--rounds", "4", "--name", "straight")[0] == 0
    assert fedforge(capsys, *common, "--rounds", "2", "--name", "pieces")[0] == 0
    code, _, err = fedforge(capsys, "run", "-q", "--resume", str(tmp_path / "pieces"), "--rounds", "4")
    assert code == 0, err
    a, b = checkpoint_payload(tmp_path / "straight"), checkpoint_payload(tmp_path / "pieces")
    assert a["round"] == b["round"] == 4
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    kept = {"client": a["client_states"], "optimizer": a["optimizer_states"]}
    assert kept["client" if kind != "kept optimizer state" else "optimizer"]
    assert same_tables({"client": b["client_states"], "optimizer": b["optimizer_states"]}, kept)
