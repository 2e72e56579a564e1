"""--resume checks what it resumes: the checkpoint's checksum, and settings that would change the result."""

import json
import math
import subprocess
import sys

import pytest
from helpers import PROCESS_S, bound

from fedforge.cli import main
from fedforge.history import History, RoundRecord

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
