"""Every bad input: one line naming the value, exit status 2, no traceback."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PROCESS_S, bound

from fedforge.cli import main
from fedforge.data import FASHION_MNIST


def fedforge(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own exit
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--dataset", "cifar"],
            "unknown dataset 'cifar' (choose from: mnist, fashion-mnist, synthetic, digits, diabetes, shakespeare, "
            "shakespeare-text, or csv:PATH, parquet:PATH, hf:PATH, jsonl:PATH, shakespeare-text:PATH)",
        ),
        (
            ["--model", "resnet"],
            "unknown model 'resnet' (choose from: mlp, 2nn, cnn, simple-cnn, resnet8, logreg, tabular-mlp, "
            "char-lstm, or package.module:factory, hf:PATH)",
        ),
        (["--partition", "zipf"], "unknown partition 'zipf' (choose from: iid, dirichlet, shards, quantity, natural)"),
        (["--clients-per-round", "11"], "clients_per_round must be between 1 and num_clients=10, got 11"),
        (["--lr", "0"], "lr must be > 0, got 0.0"),
        (["--lr", "-0.5"], "lr must be > 0, got -0.5"),
        (["--rounds", "0"], "rounds must be >= 1, got 0"),
        (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["--engine", "gpu"], "unknown engine 'gpu' (choose from: auto, sequential, vectorized, ray)"),
        (["--max-memory", "lots"], "max_memory must be auto or a size like 512MiB or 2GB, got 'lots'"),
        (["--max-memory", "0MB"], "max_memory must be auto or a size like 512MiB or 2GB, got '0MB'"),
        (
            ["--dataset", "fashion-mnist", "--num-clients", "70000", "--clients-per-round", "5"],
            "num_clients=70000 is more than the 60000 training examples",
        ),
    ],
)
def test_bad_flags(capsys, tmp_path, argv, message):
    code, _, err = fedforge(capsys, "run", "--out-dir", str(tmp_path), *argv)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def _write_tables(tmp_path):
    (tmp_path / "heart.csv").write_text(
        "age,chol,sick\n" + "".join(f"{40 + i},{180 + 3 * i},{i % 2}\n" for i in range(20))
    )
    (tmp_path / "cities.csv").write_text("age,city,sick\n50,paris,0\n60,rome,1\n70,oslo,0\n")
    (tmp_path / "notes.txt").write_text("not a table\n")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--dataset", "csv:{tmp}/heart.csv", "--target", "disease"],
            "{tmp}/heart.csv has no column 'disease' (its columns: age, chol, sick)",
        ),
        (
            ["--dataset", "csv:{tmp}/cities.csv", "--target", "sick"],
            "{tmp}/cities.csv: column(s) 'city' are not numbers (e.g. 'paris' on line 2); encode them as numbers first",
        ),
        (["--dataset", "parquet:{tmp}/notes.txt", "--target", "sick"], "{tmp}/notes.txt is not a Parquet file"),
        (["--dataset", "csv:{tmp}/nothing.csv", "--target", "sick"], "{tmp}/nothing.csv does not exist"),
        (["--dataset", "hf:{tmp}", "--target", "sick"], "{tmp} is not a Hugging Face dataset"),
        (
            ["--dataset", "csv:{tmp}/heart.csv"],
            "dataset 'csv:{tmp}/heart.csv' needs a target, the column to predict (--target COLUMN)",
        ),
        (["--target", "sick"], "target 'sick' is for csv:, parquet: and hf: datasets only, not 'mnist'"),
        (["--dataset", "csv:"], "dataset 'csv:' names no file: give csv:PATH"),
    ],
)
def test_bad_table_datasets(capsys, tmp_path, argv, message):
    pytest.importorskip("pyarrow")
    pytest.importorskip("datasets")
    _write_tables(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, _, err = fedforge(capsys, "run", "-q", "--out-dir", str(tmp_path / "runs"), *argv)
    assert code == 2
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_csv_dataset_runs_and_partitions(capsys, tmp_path):
    _write_tables(tmp_path)
    flags = ["--dataset", f"csv:{tmp_path}/heart.csv", "--target", "sick", "--num-clients", "5"]
    code, out, _ = fedforge(
        capsys,
        "run",
        "-q",
        "--model",
        "tabular-mlp",
        "--clients-per-round",
        "2",
        "--rounds",
        "1",
        "--out-dir",
        str(tmp_path / "runs"),
        *flags,
    )
    assert code == 0 and "final test accuracy" in out and "outputs in" in out
    assert [p.name.split("-2")[0] for p in (tmp_path / "runs").iterdir()] == ["csv-heart-tabular-mlp-fedavg"]
    code, out, _ = fedforge(capsys, "partition", "-q", *flags)
    assert code == 0 and out.splitlines()[0].split()[:2] == ["client", "examples"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("rounds = [", "malformed TOML"),
        ("rouns = 3", "unknown key 'rouns'; did you mean 'rounds'?"),
    ],
)
def test_bad_config_file(capsys, tmp_path, text, message):
    (tmp_path / "exp.toml").write_text(text)
    code, _, err = fedforge(capsys, "run", "--config", str(tmp_path / "exp.toml"))
    assert code == 2 and message in err and err.count("\n") == 1


def test_corrupt_dataset_file(capsys, tmp_path):
    for filename, _ in FASHION_MNIST.files.values():
        shutil.copy(Path("/usr/share/datasets/fashion-mnist") / filename, tmp_path / filename)
    labels = tmp_path / FASHION_MNIST.files["train_labels"][0]
    raw = bytearray(labels.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    labels.write_bytes(bytes(raw))
    code, _, err = fedforge(
        capsys, "run", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs")
    )
    assert code == 2 and str(labels) in err and "corrupt" in err and err.count("\n") == 1


def test_diverging_run_stops_with_a_message(capsys, tmp_path):
    code, out, err = fedforge(
        capsys,
        "run",
        "-q",
        "--dataset",
        "fashion-mnist",
        "--lr",
        "1e30",
        "--rounds",
        "3",
        "--out-dir",
        str(tmp_path),
        "--name",
        "nan",
    )
    assert code == 1
    assert "diverged" in err and "lower the learning rate" in err and err.count("\n") == 1
    assert "nan" not in out.replace("--name nan", "").lower().split("accuracy")[-1]
    assert (tmp_path / "nan" / "history.json").exists()  # the initial evaluation was saved


def test_real_process_exit_status_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedforge", "run", "--rounds", "-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=bound(PROCESS_S),
    )
    assert proc.returncode == 2
    assert proc.stderr == "fedforge: error: rounds must be >= 1, got -1\n"


BATCHNORM_MODEL = """
import torch.nn as nn


def with_batchnorm(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes))
"""


@pytest.mark.parametrize(
    "model, engine, says",
    [
        ("logreg", "auto", "engine: vectorized (fastmlp kernel)"),
        ("bn_models:with_batchnorm", "vectorized", "engine: vectorized (torch.func kernel)"),
        (
            "bn_models:with_batchnorm",
            "auto",
            "engine: sequential (auto: BatchNorm1d: no faster batched than one client at a time on the CPU)",
        ),
    ],
)
def test_run_says_which_engine_trained_the_clients_and_why(model, engine, says, capsys, tmp_path, monkeypatch):
    (tmp_path / "bn_models.py").write_text(BATCHNORM_MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    flags = ["--dataset", "synthetic", "--num-clients", "3", "--clients-per-round", "2", "--rounds", "1"]
    flags += ["--engine", engine]
    code, out, err = fedforge(capsys, "run", "-q", *flags, "--model", model, "--out-dir", "runs", "--name", "e")
    sys.modules.pop("bn_models", None)
    assert code == 0, err
    assert says in out.splitlines()
