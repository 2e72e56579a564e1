"""What report shows of a round's personalized evaluation: the console line, the plot, `fedforge report`."""

import pytest

from fedforge import Config, History, RoundRecord, report
from fedforge.cli import main as fedforge

PERSONALIZED = {
    "personalized_loss": 0.41,
    "personalized_accuracy": 0.85123,
    "personalized_accuracy_p10": 0.7123,
    "personalized_accuracy_p50": 0.86,
    "personalized_accuracy_p90": 0.95,
}


def record(round_: int, metrics: dict[str, float]) -> RoundRecord:
    return RoundRecord(round_, (0, 1), 0.5, 0.8, train_loss=0.6 if round_ else None, metrics=metrics)


def test_the_line_shows_the_headline_metric_with_its_spread():
    line = report.round_line(record(3, {**PERSONALIZED, "epsilon": 1.25}), 10)
    assert "personalized accuracy 0.8512 (p10 0.712, p90 0.95)  epsilon 1.250" in line
    assert "personalized loss" not in line  # the headline metric only: the line stays short


def test_the_line_of_another_task_and_without_percentiles():
    regression = {"test_r2": 0.3, "personalized_r2": 0.4512, "personalized_mse": 2.0}
    assert "personalized r2 0.4512  " in report.round_line(record(1, regression), 5, metric="r2")
    assert report.personalized(record(1, regression), "mse") == "personalized mse 2.0000"
    # Round 0 and the rounds without a personalized evaluation: nothing about it.
    assert "personalized" not in report.round_line(record(0, {}), 5)
    assert report.personalized(record(2, PERSONALIZED), "r2") is None


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures plot_history makes, instead of written."""
    made: list = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: made.append(fig))
    return made


def test_the_plot_has_the_personalized_curve_and_band_beside_test(figures):
    history = History([record(0, {}), record(1, {"personalized_accuracy": 0.7}), record(2, PERSONALIZED)])
    report.plot_history(history, "unused.png")
    acc_ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in acc_ax.get_lines()}
    assert list(lines["personalized"].get_xdata()) == [1, 2]
    assert list(lines["personalized"].get_ydata()) == [0.7, 0.85123]
    assert list(lines["test"].get_xdata()) == [0, 1, 2]
    [band] = acc_ax.collections  # p10 to p90: only round 2 has them
    assert band.get_label() == "personalized, p10 to p90 of clients"
    assert band.get_paths()[0].vertices[:, 1].min() == pytest.approx(0.7123)
    assert band.get_paths()[0].vertices[:, 1].max() == pytest.approx(0.95)


def test_the_plot_without_personalized_evaluation_is_as_before(figures):
    report.plot_history(History([record(0, {}), record(1, {})]), "unused.png")
    acc_ax = figures[0].axes[0]
    assert [line.get_label() for line in acc_ax.get_lines()] == ["test"] and not acc_ax.collections
    assert acc_ax.get_title() == "test accuracy"


def test_the_plot_is_written(tmp_path):
    report.plot_history(History([record(0, {}), record(1, PERSONALIZED)]), tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_fedforge_report_shows_the_runs_primary_metric(tmp_path, capsys):
    run_dir = tmp_path / "run"
    report.write_history(run_dir, History([record(0, {}), record(1, {"test_r2": 0.2, "personalized_r2": 0.3})]))
    assert fedforge(["report", str(run_dir)]) == 0
    assert "personalized" not in capsys.readouterr().out  # no config.toml: accuracy's, which this run has not
    (run_dir / "config.toml").write_text(Config(task="regression", dataset="synthetic").to_toml())
    assert fedforge(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("personalized r2 0.3000  0.00 s")
