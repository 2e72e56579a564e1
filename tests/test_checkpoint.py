"""--resume holds every value of a checkpoint against the run before anything runs (items 10-12 of
issue 22): another run's checkpoint, other shapes, rounds out of range, and an accountant edited to
spend less are each refused in one line, by `fedforge run` and by `fedforge server` before it listens.

Each edit is made as someone with write access to the run folder would: the payload rewritten and
its (unkeyed) SHA-256 recomputed, so the file passes its checksum.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from fedforge.cli import main
from fedforge.strategies import StrategyState

BASE = ["--dataset", "synthetic", "--num-clients", "3", "--clients-per-round", "3", "--model", "logreg", "-q"]
# A private run that stops at its budget after a few rounds (fixed-size sampling: RDP, fast).
DP = [
    "--dataset",
    "synthetic",
    "--num-clients",
    "30",
    "--clients-per-round",
    "10",
    "--model",
    "logreg",
    "-q",
    "--dp",
    "central",
    "--noise-multiplier",
    "3.0",
    "--target-epsilon",
    "3",
    "--delta",
    "1e-3",
    "--rounds",
    "50",
]


def fedforge(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rewrite(path, change) -> None:
    """Edit the checkpoint's payload with `change(payload)` and recompute its SHA-256."""
    data = path.read_bytes()
    head = data.index(b"\n") + 1
    payload = torch.load(io.BytesIO(data[head + 32 :]), weights_only=True)
    change(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(data[:head] + hashlib.sha256(buffer.getvalue()).digest() + buffer.getvalue())


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedforge: error: cannot resume"), err
    return lines[0]


@pytest.fixture
def run_dir(tmp_path, capsys):
    assert (
        fedforge(
            capsys, "run", *BASE, "--rounds", "2", "--strategy", "fedavgm", "--out-dir", str(tmp_path), "--name", "r"
        )[0]
        == 0
    )
    return tmp_path / "r"


def test_another_runs_checkpoint_is_refused_by_its_settings(capsys, run_dir, tmp_path):
    assert (
        fedforge(
            capsys,
            "run",
            *BASE,
            "--rounds",
            "2",
            "--strategy",
            "fedavgm",
            "--seed",
            "1",
            "--out-dir",
            str(tmp_path),
            "--name",
            "seed1",
        )[0]
        == 0
    )
    (run_dir / "checkpoint.pt").write_bytes((tmp_path / "seed1" / "checkpoint.pt").read_bytes())
    history = (run_dir / "history.json").read_text()
    code, _, err = fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "3")
    assert code == 2
    assert one_error(err) == (
        f"fedforge: error: cannot resume: {run_dir}/checkpoint.pt: it was written by a run "
        f"with other settings (seed 1 there, 0 here)"
    )
    assert (run_dir / "history.json").read_text() == history  # nothing ran


def test_a_checkpoint_whose_history_is_not_the_runs_is_refused(capsys, run_dir):
    def edit(payload):
        rounds = json.loads(payload["history"])
        rounds["rounds"][1]["test_accuracy"] = 0.99
        payload["history"] = json.dumps(rounds)

    rewrite(run_dir / "checkpoint.pt", edit)
    code, _, err = fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "3")
    assert code == 2 and one_error(err).endswith(
        "its round 1 differs from the run's history.json: it is another run's checkpoint, or one of the two was edited"
    )


def _set(key, value):
    def edit(payload):
        payload[key] = value

    return edit


def _weight(name, value):
    def edit(payload):
        payload["params"][name] = value

    return edit


# A well-formed accountant's state (what `Accountant.state()` writes).
ACCOUNTANT = {
    "sampling": {"kind": "poisson", "q": 0.1, "num_clients": 30},
    "noise_multiplier": 1.0,
    "method": "pld",
    "local": False,
    "rounds": 2,
}


def _velocity(payload):
    payload["extras"]["velocity"]["1.weight"] = torch.zeros(3, 3)


def _moments(payload):
    payload["extras"] = {"m": {}, "v": {}}
    payload["extras_kind"] = "fedforge.strategies.state.Moments"


def _kindless(change):
    """`change`, in a checkpoint written before the state's kind was stored (format 2 all the same)."""

    def edit(payload):
        payload.pop("extras_kind")
        change(payload)

    return edit


def _drop_weight(payload):
    del payload["params"]["1.bias"]


EDITS = {
    "a weight of another shape": (
        _weight("1.weight", torch.zeros(10, 7)),
        "1.weight in its weights is torch.float32 of shape (10, 7), this run's model has "
        "torch.float32 of shape (10, 60)",
    ),
    "a weight of another type": (
        _weight("1.bias", torch.zeros(10, dtype=torch.int64)),
        "1.bias in its weights is torch.int64 of shape (10,)",
    ),
    "a weight missing": (_drop_weight, "its weights lack 1.bias"),
    "a weight that is not a tensor": (_weight("1.bias", 3.0), "1.bias in its weights is not a dense tensor"),
    "a foreign weight": (
        _weight("conv.weight", torch.zeros(1)),
        "its weights hold conv.weight, which this run's model does not have",
    ),
    "the strategy's state of another shape": (
        _velocity,
        "1.weight in its strategy state 'velocity' is torch.float32 of shape (3, 3)",
    ),
    "a negative round": (_set("round", -1), "its round -1 is not a round (an integer >= 0)"),
    "a round that is not a number": (_set("round", "2"), "its round '2' is not a round"),
    "a round past the history": (_set("round", 3), "its history holds rounds [0, 1, 2], not 0 to its round 3"),
    "another run's facts": (
        _set("run", {"num_clients": 5, "client_lr": 0.01, "client_momentum": 0.0}),
        "its run's facts RunInfo(num_clients=5",
    ),
    "settings that are not plain values": (_set("settings", {"seed": torch.zeros(3)}), "cannot be read (TypeError)"),
    "a privacy state in a run without privacy": (
        _set("privacy", {"accountant": ACCOUNTANT, "stage": {"clip": 1.0}}),
        "it holds a privacy accountant, and this run has no differential privacy",
    ),
    "a privacy state without its accountant's values": (
        _set("privacy", {"accountant": {}, "stage": {"clip": 1.0}}),
        "accountant state is incomplete or malformed (KeyError: 'sampling')",
    ),
    "a privacy state that is not a table": (
        _set("privacy", [1.0]),
        "its privacy state is not a table with an accountant",
    ),
    "a strategy state of another strategy": (
        _moments,
        "its strategy state is Moments, this run's strategy keeps Momentum",
    ),
    "a strategy state of another strategy, its kind not stored": (
        _kindless(_set("extras", {"m": {}, "v": {}})),
        "its strategy state is Moments, this run's strategy keeps Momentum",
    ),
    "a strategy state that is not its kind's": (
        _set("extras", {"velocity": {}, "speed": {}}),
        "its strategy state, a fedforge.strategies.state.Momentum, holds speed, velocity, not velocity",
    ),
    "a strategy state of an unknown kind": (
        _set("extras_kind", "mine.Gone"),
        "its strategy state is a mine.Gone, which is not defined here (import its module)",
    ),
    "a strategy state of no kind, its kind not stored": (
        _kindless(_set("extras", {"velocity": {}, "speed": {}})),
        "its strategy state holds speed, velocity: no kind of state",
    ),
}


@pytest.mark.parametrize("edit", EDITS)
def test_every_value_of_a_checkpoint_is_checked_in_one_line(capsys, run_dir, edit):
    change, message = EDITS[edit]
    rewrite(run_dir / "checkpoint.pt", change)
    code, out, err = fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "3")
    assert code == 2, out + err
    assert message in one_error(err)
    assert one_error(err).startswith(f"fedforge: error: cannot resume: {run_dir}/checkpoint.pt")


def test_a_checkpoint_past_the_runs_rounds_is_refused_not_skipped(capsys, run_dir):
    code, _, err = fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "1")
    assert code == 2
    assert one_error(err).endswith("it is at round 2, past the run's 1 rounds (give --rounds 2 or more)")
    assert fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "2")[0] == 0  # finished: nothing to do


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("edit", ["a weight of another shape", "a negative round", "a round past the history"])
def test_the_server_checks_every_value_before_it_listens(run_dir, tmp_path, edit):
    (tmp_path / "tokens.json").write_text('{"clients": {}}')
    change, message = EDITS[edit]
    rewrite(run_dir / "checkpoint.pt", change)
    port = _free_port()
    # No client ever comes: the server must exit on its own, having never listened.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedforge",
            "server",
            "-q",
            "--threads",
            "1",
            "--tokens",
            str(tmp_path / "tokens.json"),
            "--insecure",
            "--address",
            f"127.0.0.1:{port}",
            "--resume",
            str(run_dir),
            "--rounds",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "listening" not in proc.stdout and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
    with socket.socket() as s:  # nothing holds the port
        s.bind(("127.0.0.1", port))


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    assert main(["run", *DP, "--out-dir", str(out), "--name", "p"]) == 0
    return out / "p"


@pytest.fixture
def private(dp_run, tmp_path):
    """A copy of a private run that stopped at its budget."""
    copy = tmp_path / "p"
    copy.mkdir()
    for path in dp_run.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


def _accountant(**values):
    def edit(payload):
        payload["privacy"]["accountant"].update(values)

    return edit


def _no_privacy(payload):
    payload["privacy"] = None


def _rewound(payload):
    """A consistent rewind to round 0: round, accountant, counted updates and the checkpoint's own history agree."""
    payload["round"] = 0
    payload["privacy"] = None
    payload["counted"] = {}
    history = json.loads(payload["history"])
    payload["history"] = json.dumps({"rounds": history["rounds"][:1]})


PRIVACY_EDITS = {
    "the accountant's rounds set to 0": (
        _accountant(rounds=0),
        "its privacy accountant counts 0 rounds spent, and it is at round",
    ),
    "more noise in the accountant": (
        _accountant(noise_multiplier=5.0),
        "its privacy accountant has noise multiplier 5.0, the run 3.0",
    ),
    "another sampling in the accountant": (
        _accountant(sampling={"kind": "fixed", "num_clients": 300, "clients_per_round": 10}),
        "is not this run's",
    ),
    "no accountant": (_no_privacy, "it holds no privacy accountant after"),
    "the whole checkpoint rewound to round 0": (_rewound, "the run's history.json records"),
}


@pytest.mark.parametrize("edit", PRIVACY_EDITS)
def test_a_resume_that_would_lower_the_epsilon_spent_is_refused(capsys, private, edit):
    spent = json.loads((private / "history.json").read_text())["rounds"][-1]["metrics"]["epsilon"]
    assert 2 < spent <= 3  # stopped at its budget
    change, message = PRIVACY_EDITS[edit]
    rewrite(private / "checkpoint.pt", change)
    code, out, err = fedforge(capsys, "run", "--resume", str(private))
    assert code == 2, out + err
    assert message in one_error(err)
    assert json.loads((private / "history.json").read_text())["rounds"][-1]["metrics"]["epsilon"] == spent


def test_an_untouched_private_run_resumes_to_its_budget_stop(capsys, private):
    rounds = len(json.loads((private / "history.json").read_text())["rounds"])
    code, _, err = fedforge(capsys, "run", "--resume", str(private))
    assert code == 0, err
    assert len(json.loads((private / "history.json").read_text())["rounds"]) == rounds  # the budget stops it again


def test_a_signed_checkpoint_is_resumed_only_with_its_key(capsys, tmp_path):
    key, other = tmp_path / "key", tmp_path / "other"
    key.write_text("k" * 32)
    other.write_text("o" * 32)
    assert (
        fedforge(
            capsys,
            "run",
            *BASE,
            "--rounds",
            "2",
            "--out-dir",
            str(tmp_path),
            "--name",
            "s",
            "--checkpoint-key-file",
            str(key),
        )[0]
        == 0
    )
    path = tmp_path / "s" / "checkpoint.pt"
    signed = path.read_bytes()
    assert signed.startswith(b"fedforge checkpoint 2 hmac\n")

    def resume(*flags):
        code, _, err = fedforge(capsys, "run", "--resume", str(tmp_path / "s"), "--rounds", "3", *flags)
        return code, err

    code, err = resume()
    assert code == 2 and one_error(err).endswith(f"{path} is signed with a key: give its --checkpoint-key-file")
    code, err = resume("--checkpoint-key-file", str(other))
    assert code == 2 and one_error(err).endswith(f"{path} fails its signature: written with another key, or edited")
    # Write access alone: an edit with the SHA-256 recomputed, signed or unsigned, is refused.
    rewrite(path, _set("round", 1))
    code, err = resume("--checkpoint-key-file", str(key))
    assert code == 2 and "fails its signature" in one_error(err)
    path.write_bytes(b"fedforge checkpoint 2\n" + signed[len(b"fedforge checkpoint 2 hmac\n") :])
    rewrite(path, lambda payload: None)
    code, err = resume("--checkpoint-key-file", str(key))
    assert code == 2 and one_error(err).endswith(
        f"{path} is not signed, and a checkpoint key was given: it was not "
        "written with that key (replaced, or a run started without it)"
    )
    path.write_bytes(signed)
    code, err = resume("--checkpoint-key-file", str(key))
    assert code == 0, err
    assert [r["round"] for r in json.loads((tmp_path / "s" / "history.json").read_text())["rounds"]] == [0, 1, 2, 3]
    assert path.read_bytes().startswith(b"fedforge checkpoint 2 hmac\n")


def test_a_short_checkpoint_key_is_refused(capsys, tmp_path):
    (tmp_path / "key").write_text("short")
    code, _, err = fedforge(
        capsys, "run", *BASE, "--out-dir", str(tmp_path), "--checkpoint-key-file", str(tmp_path / "key")
    )
    assert code == 2 and err.strip().startswith(f"fedforge: error: checkpoint key file {tmp_path}/key holds 5 bytes")


def _as_old(path) -> None:
    """The checkpoint as fedforge wrote it before checkpoints carried their settings (format 1)."""
    data = path.read_bytes()
    head = data.index(b"\n") + 1
    path.write_bytes(b"fedforge checkpoint 1\n" + data[head:])
    rewrite(path, lambda payload: payload.pop("settings"))


def test_an_older_fedforges_checkpoint_resumes_with_a_warning_and_its_values_checked(capsys, caplog, run_dir):
    _as_old(run_dir / "checkpoint.pt")
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        code, _, err = fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "3")
    assert code == 0, err
    assert "written by an older fedforge: it does not record its run's settings" in caplog.text
    assert [r["round"] for r in json.loads((run_dir / "history.json").read_text())["rounds"]] == [0, 1, 2, 3]
    _as_old(run_dir / "checkpoint.pt")
    rewrite(run_dir / "checkpoint.pt", _set("round", -1))
    code, _, err = fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "3")
    assert code == 2 and "its round -1 is not a round" in err.strip().splitlines()[-1]


def test_a_state_of_ones_own_with_momentums_fields_does_not_stop_a_fedavgm_resume(capsys, run_dir):
    @dataclass(frozen=True)
    class Mine(StrategyState):
        velocity: dict

    code, _, err = fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "3")
    assert code == 0, err
    # One written before the kind was stored still resumes by its field names, while it is the only such kind.
    del Mine
    gc.collect()
    rewrite(run_dir / "checkpoint.pt", lambda payload: payload.pop("extras_kind"))
    code, _, err = fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "4")
    assert code == 0, err


def test_config_toml_edited_to_another_setting_is_refused(capsys, run_dir):
    path = run_dir / "config.toml"
    path.write_text(path.read_text().replace("seed = 0\n", "seed = 1\n"))
    code, _, err = fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "3")
    assert code == 2
    assert one_error(err) == (
        f"fedforge: error: cannot resume: {run_dir}/checkpoint.pt: it was written by a run "
        f"with other settings (seed 0 there, 1 here)"
    )


def test_a_checkpoint_holds_the_global_state_and_no_clients_update(run_dir):
    data = (run_dir / "checkpoint.pt").read_bytes()
    payload = torch.load(io.BytesIO(data[data.index(b"\n") + 1 + 32 :]), weights_only=True)
    assert set(payload) == {
        "params",
        "round",
        "extras",
        "extras_kind",
        "run",
        "privacy",
        "client_states",
        "optimizer_states",
        "counted",
        "history",
        "settings",
    }
    assert payload["client_states"] == payload["optimizer_states"] == {}  # FedAvgM's clients keep nothing
    rounds = json.loads(payload["history"])["rounds"]
    last = {c: r["round"] for r in rounds for c in r["clients"]}  # every selected client reported
    assert payload["counted"] == last and last  # which round each client's update last counted in
    assert payload["extras_kind"] == "fedforge.strategies.state.Momentum"
    model = torch.load(run_dir / "model.pt", weights_only=True)
    assert payload["params"].keys() == model.keys()
    assert all(torch.equal(payload["params"][k], model[k]) for k in model)  # the global model, as published
    assert set(payload["extras"]) == {"velocity"}  # FedAvgM's server momentum: one tensor per weight
    assert payload["extras"]["velocity"].keys() == model.keys()


def test_the_server_refuses_an_accountant_that_would_spend_less_before_it_listens(private, tmp_path):
    (tmp_path / "tokens.json").write_text('{"clients": {}}')
    change, message = PRIVACY_EDITS["the accountant's rounds set to 0"]
    rewrite(private / "checkpoint.pt", change)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedforge",
            "server",
            "-q",
            "--threads",
            "1",
            "--tokens",
            str(tmp_path / "tokens.json"),
            "--insecure",
            "--address",
            "127.0.0.1:0",
            "--resume",
            str(private),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "listening" not in proc.stdout and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


@pytest.fixture
def stateful_dir(tmp_path, capsys):
    """A run whose clients keep SCAFFOLD's controls and their SGD momentum between rounds."""
    flags = ["--strategy", "scaffold", "--keep-optimizer-state", "--momentum", "0.9", "--engine", "sequential"]
    assert fedforge(capsys, "run", *BASE, "--rounds", "2", *flags, "--out-dir", str(tmp_path), "--name", "c")[0] == 0
    return tmp_path / "c"


def _client_entry(key, value, client=0):
    def edit(payload):
        payload["client_states"][client][key] = value

    return edit


def _optimizer_entry(key, value, client=0):
    def edit(payload):
        payload["optimizer_states"][client][key] = value

    return edit


def _drop_client_entry(payload):
    del payload["client_states"][0]["algorithm/1.bias"]


def _another_client(payload):
    payload["client_states"][7] = payload["client_states"][0]


CLIENT_EDITS = {
    "a client that is not the run's": (_another_client, "it holds the state of client 7, not one of this run's 3"),
    "a control of another shape": (
        _client_entry("algorithm/1.weight", torch.zeros(3, 3)),
        "1.weight in its client 0's algorithm state is torch.float32 of shape (3, 3), this run's model has "
        "torch.float32 of shape (10, 60)",
    ),
    "a control of another type": (
        _client_entry("algorithm/1.bias", torch.zeros(10, dtype=torch.float64)),
        "1.bias in its client 0's algorithm state is torch.float64 of shape (10,)",
    ),
    "a control missing": (_drop_client_entry, "its client 0's algorithm state lacks 1.bias"),
    "a control that is not a tensor": (
        _client_entry("algorithm/1.bias", 3.0),
        "1.bias in its client 0's algorithm state is not a dense tensor",
    ),
    "a foreign entry": (
        _client_entry("algorithm/conv.weight", torch.zeros(1)),
        "its client 0's algorithm state holds conv.weight, which this run's clients do not keep",
    ),
    "a personal entry SCAFFOLD's clients do not keep": (
        _client_entry("personal/1.bias", torch.zeros(10)),
        "its client 0's personal state holds 1.bias, which this run's clients do not keep",
    ),
    "an entry of no part": (
        _client_entry("secret/1.bias", torch.zeros(10)),
        "its client 0's state holds 'secret/1.bias', not personal/, algorithm/ or copy/ NAME",
    ),
    "a long name of no part": (
        _client_entry("x" * 100_000, torch.zeros(10)),
        f"its client 0's state holds {'x' * 60!r}, not personal/",
    ),
    "client states that are not tables": (_set("client_states", [1.0]), "its client states are not tables"),
    "a client id that is not a number": (
        _set("client_states", {"0": {}}),
        "its client states are not tables of tensors by client id",
    ),
    "an optimizer slot the run's SGD does not keep": (
        _optimizer_entry("exp_avg/1.bias", torch.zeros(10)),
        "its client 0's optimizer state has slot 'exp_avg', which this run's optimizer does not keep",
    ),
    "a momentum buffer of another shape": (
        _optimizer_entry("momentum_buffer/1.bias", torch.zeros(11)),
        "1.bias in its client 0's optimizer state's slot 'momentum_buffer' is torch.float32 of shape (11,)",
    ),
    "a negative step": (
        _optimizer_entry("step", torch.tensor(-1.0, dtype=torch.float64)),
        "its client 0's optimizer state has step -1.0, not a count",
    ),
    "a step of another type": (
        _optimizer_entry("step", torch.zeros(3)),
        "its client 0's optimizer state has a step that is not a float64 scalar",
    ),
    "an optimizer state without its step": (
        lambda payload: payload["optimizer_states"][0].pop("step"),
        "its client 0's optimizer state has no step",
    ),
    "counted rounds that are not a table": (_set("counted", [1]), "its counted rounds are not rounds by client id"),
    "a counted round past the checkpoint's": (_set("counted", {0: 10**12}), "it counts client 0's update in round"),
    "a counted round 0": (_set("counted", {0: 0}), "it counts client 0's update in round 0, not one of its"),
    "a counted client not of the run": (_set("counted", {7: 1}), "it counts an update of client 7, not one of"),
}


@pytest.mark.parametrize("edit", CLIENT_EDITS)
def test_what_the_clients_keep_is_checked_in_one_line(capsys, stateful_dir, edit):
    change, message = CLIENT_EDITS[edit]
    rewrite(stateful_dir / "checkpoint.pt", change)
    history = (stateful_dir / "history.json").read_text()
    code, out, err = fedforge(capsys, "run", "--resume", str(stateful_dir), "--rounds", "3")
    assert code == 2, out + err
    assert message in one_error(err)
    assert one_error(err).startswith(f"fedforge: error: cannot resume: {stateful_dir}/checkpoint.pt")
    assert (stateful_dir / "history.json").read_text() == history  # nothing ran


def test_what_clients_keep_in_a_run_whose_clients_keep_nothing_is_refused(capsys, run_dir):
    rewrite(run_dir / "checkpoint.pt", _set("optimizer_states", {0: {"step": torch.ones((), dtype=torch.float64)}}))
    code, _, err = fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "3")
    assert code == 2
    assert one_error(err).endswith("it holds the clients' optimizer states, and this run's task keeps none")
    rewrite(run_dir / "checkpoint.pt", _set("optimizer_states", {}))
    rewrite(run_dir / "checkpoint.pt", _set("client_states", {1: {"algorithm/1.bias": torch.zeros(10)}}))
    code, _, err = fedforge(capsys, "run", "--resume", str(run_dir), "--rounds", "3")
    assert code == 2
    assert "its client 1's algorithm state holds 1.bias, which this run's clients do not keep" in one_error(err)


def test_a_checkpoint_written_before_it_held_the_clients_keep_resumes_with_them_afresh(capsys, caplog, stateful_dir):
    def older(payload):
        payload.pop("client_states")
        payload.pop("optimizer_states")

    rewrite(stateful_dir / "checkpoint.pt", older)
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        code, _, err = fedforge(capsys, "run", "--resume", str(stateful_dir), "--rounds", "3")
    assert code == 0, err
    assert "written before checkpoints held what the clients keep between their rounds" in caplog.text
