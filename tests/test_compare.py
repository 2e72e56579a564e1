import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import PROCESS_S, bound

import fedforge as ff
from fedforge.cli import main
from fedforge.compare import ComparedRun, RoundDone, compare, comparison_table, variants_from_file
from fedforge.config import Config
from fedforge.errors import ConfigError
from fedforge.history import History, RoundRecord

BASE = Config(dataset="synthetic", num_clients=6, clients_per_round=3, model="logreg", rounds=3, batch_size=10)


@pytest.mark.parametrize("jobs", [1, 2])
def test_runs_share_partition_seed_and_selected_clients(tmp_path, jobs):
    done: list[RoundDone] = []
    runs = compare(
        BASE,
        {"fedavg": {"strategy": "fedavg"}, "fedprox": {"strategy": "fedprox", "proximal_mu": 1.0}, "lr": {"lr": 0.1}},
        out_dir=tmp_path,
        jobs=jobs,
        on_round=done.append,
    )
    # Every round of every run is reported, in each run's order, also from worker processes.
    for run in runs:
        assert [d.record for d in done if d.label == run.label] == run.history.records
    assert [r.label for r in runs] == ["fedavg", "fedprox", "lr"]
    clients = [r.history.column("clients") for r in runs]
    assert clients[0] == clients[1] == clients[2] and len(clients[0]) == 4
    assert runs[0].history.final.test_accuracy != runs[2].history.final.test_accuracy
    assert runs[1].config.proximal_mu == 1.0
    for r in runs:
        assert (tmp_path / r.label / "history.json").exists()


def test_table_and_rounds_to_target(tmp_path):
    runs = compare(BASE, {"a": {}}, out_dir=tmp_path)
    accuracies = runs[0].history.column("test_accuracy")
    target = accuracies[2]
    table = comparison_table(runs, target=target)
    first = next(i for i, a in enumerate(accuracies) if a >= target)
    assert table.splitlines()[2].split(" | ")[3] == str(first)
    assert "not reached" in comparison_table(runs, target=1.01)


def test_bad_variant_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="run 'x': unknown key 'proximal'"):
        compare(BASE, {"ok": {}, "x": {"proximal": 1}}, out_dir=tmp_path)
    assert not (tmp_path / "ok").exists()


def test_compare_command(tmp_path, capsys):
    runs_file = tmp_path / "runs.toml"
    runs_file.write_text('[prox]\nstrategy = "fedprox"\nproximal_mu = 0.5\n')
    code = main(
        [
            "compare",
            "--dataset",
            "synthetic",
            "--num-clients",
            "6",
            "--clients-per-round",
            "3",
            "--model",
            "logreg",
            "--rounds",
            "2",
            "--strategies",
            "fedavg",
            "median",
            "--runs",
            str(runs_file),
            "--out-dir",
            str(tmp_path),
            "--name",
            "c",
            "--target",
            "0.5",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| fedavg |" in out and "| median |" in out and "| prox |" in out
    for name in ("comparison.md", "comparison.csv", "comparison.png"):
        assert (tmp_path / "c" / name).exists()
    assert json.loads((tmp_path / "c" / "prox" / "history.json").read_text())["rounds"][-1]["round"] == 2


def test_a_diverging_run_is_reported_not_fatal(tmp_path):
    runs = compare(BASE, {"ok": {}, "boom": {"lr": 1e30, "model": "mlp"}}, out_dir=tmp_path)
    assert runs[0].diverged is None and runs[1].diverged and "diverged" in runs[1].diverged
    assert "diverged in round 1" in comparison_table(runs)


def test_resume_continues_cut_short_runs_and_reports_finished_ones(tmp_path):
    variants = {"a": {}, "prox": {"strategy": "fedprox", "proximal_mu": 0.5}}
    short = compare(BASE.replace(rounds=2), variants, out_dir=tmp_path / "c")
    resumed = compare(BASE, variants, out_dir=tmp_path / "c", resume=True)
    fresh = compare(BASE, variants, out_dir=tmp_path / "fresh")
    for s, r, f in zip(short, resumed, fresh, strict=True):
        assert r.history.column("test_accuracy") == f.history.column("test_accuracy")
        assert r.history.column("test_accuracy")[:3] == s.history.column("test_accuracy")
        assert r.history.final.round == 3
        assert r.wall_seconds >= sum(rec.seconds for rec in s.history.records)
    again = compare(BASE, variants, out_dir=tmp_path / "c", resume=True)
    for r, a in zip(resumed, again, strict=True):  # finished: nothing is run again
        assert a.history.column("seconds") == r.history.column("seconds")


def test_resume_refuses_a_run_made_with_other_settings(tmp_path):
    compare(BASE.replace(rounds=1), {"a": {}}, out_dir=tmp_path)
    with pytest.raises(
        ConfigError, match=r"cannot resume .*a: it was run with other settings \(lr 0.01 there, 0.5 here\)"
    ):
        compare(BASE, {"a": {"lr": 0.5}}, out_dir=tmp_path, resume=True)
    compare(BASE, {"a": {"engine": "sequential"}}, out_dir=tmp_path, resume=True)  # how it runs may change


def test_compare_resume_needs_a_name(capsys):
    assert main(["compare", "--strategies", "fedavg", "--resume"]) == 2
    assert "--resume needs --name" in capsys.readouterr().err


def test_other_tasks_are_compared_by_their_primary_metric(tmp_path):
    """A regression's table shows r2; a language model's perplexity is reached from above."""
    pytest.importorskip("sklearn")
    base = Config(
        dataset="diabetes",
        task="regression",
        optimizer="adam",
        model="mlp",
        num_clients=3,
        clients_per_round=3,
        rounds=2,
        batch_size=16,
    )
    runs = compare(base, {"a": {}}, out_dir=tmp_path)
    table = comparison_table(runs)
    assert "final r2" in table.splitlines()[0]
    assert float(table.splitlines()[2].split(" | ")[1]) == pytest.approx(
        runs[0].history.final.metric("test_r2"), abs=1e-4
    )
    records = [
        RoundRecord(
            round=r,
            clients=(),
            test_loss=None,
            test_accuracy=None,
            train_loss=None,
            train_accuracy=None,
            metrics={"test_perplexity": p},
        )
        for r, p in enumerate([80, 40, 20])
    ]
    run = ComparedRun("lm", Config(task="language-model"), History(records), 1.0)
    assert (run.metric, run.best, run.rounds_to(50), run.rounds_to(10)) == ("perplexity", 20, 1, None)


def test_a_dotted_label_in_the_runs_file_is_one_line(tmp_path):
    path = tmp_path / "runs.toml"
    path.write_text('[lr0.1]\nlr = 0.1\n["lr0.2"]\nlr = 0.2\n')
    with pytest.raises(ConfigError, match=r'\[lr0\.1\] is read as a table inside \'lr0\'; quote .*\["lr0\.1"\]'):
        variants_from_file(path)
    path.write_text('["lr0.1"]\nlr = 0.1\n')
    assert variants_from_file(path) == {"lr0.1": {"lr": 0.1}}


def test_runs_may_complete_the_shared_settings(tmp_path, capsys):
    """A noise multiplier shared by runs that each turn differential privacy on in the runs file;
    a shared setting a run does not complete is still one line."""
    runs = tmp_path / "runs.toml"
    runs.write_text('[tight]\ndp = "client"\nclip = 0.2\n[loose]\ndp = "client"\nclip = 2.0\n')
    flags = [
        "--dataset",
        "synthetic",
        "--num-clients",
        "6",
        "--clients-per-round",
        "3",
        "--model",
        "logreg",
        "--rounds",
        "1",
        "--batch-size",
        "10",
        "--delta",
        "0.01",
        "--out-dir",
        str(tmp_path),
        "--name",
        "c",
    ]
    assert main(["compare", *flags, "--noise-multiplier", "1.0", "--runs", str(runs)]) == 0
    for label, clip in (("tight", 0.2), ("loose", 2.0)):
        record = json.loads((tmp_path / "c" / label / "history.json").read_text())["rounds"][-1]
        assert record["metrics"]["noise_multiplier"] == 1.0 and record["metrics"]["clip"] == clip
    capsys.readouterr()
    assert main(["compare", *flags, "--noise-multiplier", "1.0", "--strategies", "fedavg"]) == 2
    assert "noise_multiplier are for differential privacy: add --dp client" in capsys.readouterr().err


def test_compare_prints_a_line_per_finished_round(tmp_path):
    """Not a terminal: a line per round of each run as it finishes, then the table."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedforge",
            "compare",
            *("--dataset", "synthetic", "--num-clients", "6", "--clients-per-round", "3", "--model", "logreg"),
            *("--rounds", "2", "--strategies", "fedavg", "median", "--out-dir", str(tmp_path), "--name", "c"),
        ],
        capture_output=True,
        text=True,
        timeout=bound(PROCESS_S),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    progress = [line.split("  ")[0] for line in lines if not line.startswith(("|", "outputs in"))]
    assert progress == [
        "fedavg: initial model",
        "fedavg: round 1/2",
        "fedavg: round 2/2",
        "median: initial model",
        "median: round 1/2",
        "median: round 2/2",
    ]
    history = json.loads((tmp_path / "c" / "median" / "history.json").read_text())["rounds"]
    assert f"test accuracy {history[-1]['test_accuracy']:.4f}" in lines[5]
    assert lines.index("| run | final accuracy | best accuracy | wall s |") == 6
    quiet = subprocess.run(
        [
            *(sys.executable, "-m", "fedforge", "compare", "-q", "--dataset", "synthetic", "--num-clients", "6"),
            *("--model", "logreg", "--rounds", "1", "--strategies", "fedavg", "--out-dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=bound(PROCESS_S),
    )
    assert quiet.returncode == 0 and quiet.stdout.startswith("| run |"), quiet.stderr


def _own_data_and_model():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    train, test = ff.TensorData(x[:200], y[:200]), ff.TensorData(x[200:], y[200:])
    parts = np.array_split(np.random.default_rng(0).permutation(200), 5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return ff.FederatedData(train, parts, test), model


def test_compare_simulations_on_ones_own_data_and_model(tmp_path):
    data, model = _own_data_and_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done: list[RoundDone] = []
    runs = ff.compare_simulations(
        model,
        data,
        {
            "fedavg": {},
            "fedprox": {"strategy": ff.make_strategy("fedprox", proximal_mu=0.5)},
            "adam": {"client": ff.ClientConfig(batch_size=10, lr=0.01, optimizer="adam")},
        },
        rounds=3,
        clients_per_round=3,
        client=ff.ClientConfig(batch_size=10, lr=0.1),
        seed=0,
        on_round=done.append,
    )
    assert [r.label for r in runs] == ["fedavg", "fedprox", "adam"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # every run starts from it
    clients = [r.history.column("clients") for r in runs]
    assert clients[0] == clients[1] == clients[2] and len(clients[0]) == 4
    alone = ff.simulate(model, data, rounds=3, clients_per_round=3, client=ff.ClientConfig(batch_size=10, lr=0.1))
    assert runs[0].history.column("test_accuracy") == alone.history.column("test_accuracy")
    assert runs[1].history.column("test_loss") != runs[0].history.column("test_loss")
    assert [d.line().split("  ")[0] for d in done[:4]] == [
        "fedavg: initial model",
        "fedavg: round 1/3",
        "fedavg: round 2/3",
        "fedavg: round 3/3",
    ]
    assert len(done) == 12
    table = ff.write_comparison(runs, tmp_path, target=0.5, title="mine")  # the command line's outputs
    assert table.splitlines()[0] == "| run | final accuracy | best accuracy | rounds to 0.5 | wall s |"
    assert f"| adam | {runs[2].final:.4f} |" in table
    for name in ("comparison.md", "comparison.csv", "comparison.png"):
        assert (tmp_path / name).exists()
    assert ff.write_comparison(runs, tmp_path / "plain").splitlines()[0] == (  # as docs/strategies.md shows it
        "| run | final accuracy | best accuracy | wall s |"
    )


def test_compare_simulations_reports_a_diverging_run_and_refuses_nothing_to_compare():
    data, model = _own_data_and_model()
    runs = ff.compare_simulations(
        model, data, {"ok": {}, "boom": {"client": ff.ClientConfig(lr=1e30)}}, rounds=2, clients_per_round=3
    )
    assert runs[0].diverged is None and runs[1].diverged and "diverged" in runs[1].diverged
    assert runs[1].history.final.round == 0 and "diverged in round 1" in ff.comparison_table(runs)
    with pytest.raises(ConfigError, match="nothing to compare"):
        ff.compare_simulations(model, data, {}, rounds=1, clients_per_round=1)
    with pytest.raises(ConfigError, match="run 'a': on_round is compare_simulations' own"):
        ff.compare_simulations(model, data, {"a": {"on_round": print}}, rounds=1, clients_per_round=1)


def test_compare_shows_a_progress_bar_on_a_terminal(tmp_path):
    """stdout a terminal: one bar (tqdm, on stderr) over every run's rounds instead of the lines."""
    import os
    import pty

    main_end, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedforge",
                "compare",
                *("--dataset", "synthetic", "--num-clients", "6", "--clients-per-round", "3", "--model", "logreg"),
                *("--rounds", "2", "--strategies", "fedavg", "median", "--out-dir", str(tmp_path), "--name", "c"),
            ],
            stdout=terminal,
            stderr=subprocess.PIPE,
            text=True,
            timeout=bound(PROCESS_S),
        )
        os.close(terminal)
        out = b""
        while chunk := _read_or_none(main_end):
            out += chunk
    finally:
        os.close(main_end)
    assert proc.returncode == 0, proc.stderr
    text = out.decode()
    assert "| fedavg |" in text and "round 1/2" not in text  # the table; no progress lines
    assert "/4 [" in proc.stderr and "median: round 2/2" in proc.stderr  # 2 runs x 2 rounds, the latest shown


def _read_or_none(fd: int) -> bytes | None:
    import os

    try:
        return os.read(fd, 65536)
    except OSError:  # the terminal's other end is closed: all read
        return None


def test_the_table_csv_and_plot_show_a_personalized_evaluation(tmp_path, monkeypatch):
    """A column of the primary metric's last personalized evaluation when any run has one ("n/a" for
    a run without), in comparison.md and .csv, and a dashed line in the plot."""

    def history(personalized: list[float | None]) -> History:
        return History(
            [
                RoundRecord(
                    r,
                    (0, 1),
                    1.0,
                    0.5 + r / 10,
                    train_loss=0.5,
                    metrics={} if p is None else {"personalized_accuracy": p},
                )
                for r, p in enumerate(personalized)
            ]
        )

    runs = [
        ComparedRun("ditto", None, history([None, 0.8, 0.9, None]), 1.0, task=ff.CLASSIFICATION),
        ComparedRun("fedavg", None, history([None] * 4), 1.0, task=ff.CLASSIFICATION),
    ]
    assert (runs[0].personalized, runs[1].personalized) == (0.9, None)  # the last round that evaluated it
    plotted = []
    monkeypatch.setattr("fedforge.compare.save_figure", lambda fig, path: plotted.append(fig))
    table = ff.write_comparison(runs, tmp_path, title="t").splitlines()
    assert table[0] == "| run | final accuracy | best accuracy | final personalized accuracy | wall s |"
    assert table[2] == "| ditto | 0.8000 | 0.8000 | 0.9000 | 1.0 |"
    assert table[3] == "| fedavg | 0.8000 | 0.8000 | n/a | 1.0 |"
    rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert rows[0] == "run,round,test_accuracy,personalized_accuracy,test_loss,train_loss,global_train_loss,seconds"
    assert [row.split(",")[3] for row in rows[1:5]] == ["", "0.8", "0.9", ""]
    labels = [line.get_label() for line in plotted[0].axes[0].get_lines()]
    assert labels == ["ditto", "ditto, personalized", "fedavg"]
    # The progress line of a round that evaluated it.
    done = RoundDone("ditto", runs[0].history.records[2], 3, "accuracy")
    assert done.line() == "ditto: round 2/3  test accuracy 0.7000  personalized accuracy 0.9000  0.00 s"
    # Without any: the table and the CSV as before.
    assert "personalized" not in comparison_table(runs[1:])
