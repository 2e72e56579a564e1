"""--tensorboard and --mlflow: what a run logs, read back with TensorBoard's and MLflow's own readers."""

import json
import queue
import sys
from pathlib import Path

import pytest

from fedforge.cli import main as fedforge
from fedforge.network.auth import enroll

pytest.importorskip("torch.utils.tensorboard")
pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

BASE = [
    "-q",
    "--dataset",
    "synthetic",
    "--num-clients",
    "3",
    "--clients-per-round",
    "3",
    "--model",
    "logreg",
    "--batch-size",
    "10",
    "--rounds",
    "2",
]


def events(log_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def scalar(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def history(run_dir) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())["rounds"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A 2-round run with both trackers, the MLflow store at its default place (out_dir/mlflow.db)."""
    tmp = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's own default would put artifacts in ./mlruns: none must appear here
        assert (
            fedforge(
                [
                    "run",
                    *BASE,
                    "--lr",
                    "0.05",
                    "--out-dir",
                    str(tmp / "runs"),
                    "--name",
                    "t",
                    "--tensorboard",
                    str(tmp / "tb"),
                    "--mlflow",
                ]
            )
            == 0
        )
    assert not (tmp / "mlruns").exists()
    return tmp


def test_tensorboard_has_every_round_and_the_clients_histograms(tracked):
    rounds = history(tracked / "runs" / "t")
    logged = events(tracked / "tb" / "t")  # the run's own folder under --tensorboard
    for name in ("test_accuracy", "test_loss", "seconds"):
        assert scalar(logged, name) == [(r["round"], pytest.approx(r[name], rel=1e-6)) for r in rounds]
    assert scalar(logged, "train_loss") == [(r["round"], pytest.approx(r["train_loss"], rel=1e-6)) for r in rounds[1:]]
    # One value per client each round; the record's train loss is their example-weighted mean.
    histograms = logged.Histograms("clients/train_loss")
    assert [h.step for h in histograms] == [1, 2]
    for h, r in zip(histograms, rounds[1:], strict=True):
        assert h.histogram_value.num == 3
        assert h.histogram_value.min <= r["train_loss"] <= h.histogram_value.max
    assert "clients/train_accuracy" in logged.Tags()["histograms"]


def test_mlflow_store_has_the_settings_metrics_and_artifacts(tracked):
    client = MlflowClient(f"sqlite:///{tracked / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("fedforge").experiment_id])
    assert run.info.run_name == "t" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.05" and run.data.params["strategy"] == "fedavg"
    rounds = history(tracked / "runs" / "t")
    for name in ("test_accuracy", "train_loss"):
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(logged) == [(r["round"], r[name]) for r in rounds if r[name] is not None]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["accuracy.png", "model.pt"]
    # The artifacts beside the store, not in the current folder.
    model = client.download_artifacts(run.info.run_id, "model.pt", str(tracked))
    assert Path(model).read_bytes() == (tracked / "runs" / "t" / "model.pt").read_bytes()
    assert run.info.artifact_uri.startswith((tracked / "runs" / "mlartifacts").as_uri())


def test_compare_tracks_each_run(tracked, tmp_path):
    store = f"sqlite:///{tracked / 'runs' / 'mlflow.db'}"  # the store the run made: no new one to create
    assert (
        fedforge(
            [
                "compare",
                *BASE,
                "--rounds",
                "1",
                "--strategies",
                "fedavg",
                "fedprox",
                "--out-dir",
                str(tmp_path),
                "--name",
                "c",
                "--tensorboard",
                str(tmp_path / "tb"),
                "--mlflow",
                store,
            ]
        )
        == 0
    )
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("c").experiment_id])
    assert sorted((r.info.run_name, r.data.params["strategy"]) for r in runs) == [
        ("fedavg", "fedavg"),
        ("fedprox", "fedprox"),
    ]
    for run in runs:
        rounds = history(tmp_path / "c" / run.info.run_name)
        logged = events(tmp_path / "tb" / "c" / run.info.run_name)
        assert scalar(logged, "test_accuracy") == [
            (r["round"], pytest.approx(r["test_accuracy"], rel=1e-6)) for r in rounds
        ]
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test_accuracy")) == [
            (r["round"], r["test_accuracy"]) for r in rounds
        ]


@pytest.mark.parametrize("command", ["run", "server"])
@pytest.mark.parametrize(
    "flag, modules, message",
    [
        ("--tensorboard=tb", ["torch.utils.tensorboard"], "TensorBoard tracking needs the tensorboard package"),
        (
            "--mlflow",
            ["mlflow", "mlflow.exceptions", "mlflow.tracking"],
            "MLflow tracking needs the mlflow-skinny package",
        ),
    ],
)
def test_a_missing_library_is_one_line_before_the_run(tmp_path, capsys, monkeypatch, command, flag, modules, message):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import` raises ImportError
    monkeypatch.chdir(tmp_path)
    argv = [command, *BASE, "--out-dir", "runs", "--name", "t", flag]
    if command == "server":
        enroll(tmp_path / "tokens.json", 0)
        argv += ["--insecure", "--tokens", "tokens.json", "--address", "127.0.0.1:0"]
    assert fedforge(argv) == 2
    out = capsys.readouterr()
    assert out.err == f"fedforge: error: {message}: pip install 'fedforge[tracking]'\n"
    assert "listening" not in out.out and not (tmp_path / "runs" / "t" / "history.json").exists()


def test_mlflow_file_store_is_refused_in_one_line(tmp_path, capsys):
    # MLflow 3 keeps its file store (a plain folder) in maintenance and refuses it by default.
    assert fedforge(["run", *BASE, "--out-dir", str(tmp_path), "--mlflow", str(tmp_path / "mlruns")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedforge: error: MLflow store {tmp_path / 'mlruns'}: ") and err.count("\n") == 1


def test_tracking_set_in_a_config_file_and_a_flag_over_it(tmp_path):
    (tmp_path / "run.toml").write_text(f'tensorboard = "{tmp_path / "tb"}"\nmlflow = "default"\n')
    argv = ["run", "--config", str(tmp_path / "run.toml"), *BASE, "--out-dir", str(tmp_path / "runs")]
    assert fedforge([*argv, "--name", "file", "--rounds", "1"]) == 0
    assert [step for step, _ in scalar(events(tmp_path / "tb" / "file"), "test_accuracy")] == [0, 1]
    store = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = store.search_runs([store.get_experiment_by_name("fedforge").experiment_id])
    assert run.info.run_name == "file"
    # A flag wins over the file; where or whether a run is tracked is not what its rounds compute,
    # so a run continues (--resume) with other tracking.
    assert (
        fedforge(
            [
                "run",
                "-q",
                "--resume",
                str(tmp_path / "runs" / "file"),
                "--rounds",
                "2",
                "--tensorboard",
                str(tmp_path / "tb2"),
            ]
        )
        == 0
    )
    assert [step for step, _ in scalar(events(tmp_path / "tb2" / "file"), "test_accuracy")] == [2]


class LoopbackHub:
    """The hub's side of NetworkEngine with the clients in this process: a task is answered at once by
    the deployment client's own code. Records the size of every message both ways."""

    max_message_bytes = 2**26

    def __init__(self, config):
        from fedforge.network.client import PartitionOf, _Trainer, as_app
        from fedforge.network.hub import Session
        from fedforge.network.welcome import ClientLimits, Welcome

        self.events = queue.Queue()
        self.sent, self.received = [], []
        welcome = Welcome(config, config.model, config.task)
        self.trainers = {
            c: _Trainer(welcome, as_app(PartitionOf("synthetic", c, 3)), c, ClientLimits()) for c in range(3)
        }
        self.sessions = {c: Session(c, "loopback", outbox=None) for c in range(3)}

    def wait_for_clients(self, count, timeout=None):
        return True

    def current(self, client_id):
        return self.sessions[client_id]

    def send(self, session, data, *, expect_answer=True):
        from fedforge.network.client import update_message
        from fedforge.network.hub import Event, EventKind
        from fedforge.network.wire import decode, encode

        self.sent.append(len(data))
        task = decode(data)
        update = self.trainers[session.client_id].train(session.client_id, task)
        answer = encode(update_message(task.header["task"], update))
        self.received.append(len(answer))
        self.events.put(Event(session, EventKind.MESSAGE, answer))
        return True


def test_network_rounds_record_and_track_their_bytes(tmp_path):
    from fedforge.config import Config
    from fedforge.engines.network import NetworkEngine
    from fedforge.experiment import run_experiment
    from fedforge.tracking import TensorBoardTracker

    config = Config(
        dataset="synthetic",
        num_clients=3,
        clients_per_round=3,
        model="logreg",
        batch_size=10,
        rounds=2,
        out_dir=str(tmp_path),
        name="net",
    )
    hub = LoopbackHub(config)
    engine = NetworkEngine(hub, round_timeout=300, min_fit_clients=3)
    run_experiment(config, progress=False, verbose=False, engine=engine, trackers=[TensorBoardTracker(tmp_path / "tb")])
    rounds = history(tmp_path / "net")
    assert "bytes_up" not in rounds[0]["metrics"]  # the initial model: nothing sent
    assert [(r["metrics"]["bytes_down"], r["metrics"]["bytes_up"]) for r in rounds[1:]] == [
        (sum(hub.sent[i : i + 3]), sum(hub.received[i : i + 3])) for i in (0, 3)
    ]
    assert min(hub.received) > 610 * 4  # each update holds the model's 610 float32 numbers
    logged = events(tmp_path / "tb" / "net")
    assert scalar(logged, "bytes_up") == [(r["round"], r["metrics"]["bytes_up"]) for r in rounds[1:]]


def test_personalized_evaluation_reaches_both_trackers(tmp_path):
    """Every personalized_* key of a record (its means and percentiles) is a scalar of its own,
    from the rounds that have one (round 0, the initial model, never does)."""
    from fedforge.config import Config
    from fedforge.history import RoundRecord, personalized_summary
    from fedforge.tracking import MLflowTracker, TensorBoardTracker

    config = Config(dataset="synthetic", name="own")
    personalized = personalized_summary([({"loss": 0.3, "accuracy": 0.9}, 20), ({"loss": 0.7, "accuracy": 0.6}, 5)])
    records = [
        RoundRecord(0, (), 0.9, 0.4),
        RoundRecord(1, (0, 1), 0.6, 0.7, metrics=personalized),
        RoundRecord(2, (0, 1), 0.5, 0.8, metrics={k: v + 0.01 for k, v in personalized.items()}),
    ]
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trackers = [TensorBoardTracker(tmp_path / "tb"), MLflowTracker(store)]
    for tracker in trackers:
        tracker.prepare()
        run = tracker.start(config, tmp_path)
        for record in records:
            run.round(record, {})
        run.finish(None)
    logged = events(tmp_path / "tb" / "own")
    client = MlflowClient(store)
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("fedforge").experiment_id])
    assert len(personalized) == 8  # loss and accuracy: mean, p10, p50, p90
    for name in personalized:
        expected = [(r.round, pytest.approx(r.metrics[name], rel=1e-6)) for r in records[1:]]
        assert scalar(logged, name) == expected
        assert sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, name)) == expected
