"""History and RoundRecord: personalized_summary, and what history.json/CSV keep of a record's metrics."""

import csv
import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedforge import History, RoundRecord, personalized_summary

# Three clients' personal models on their own held-out data: (metrics, examples).
CLIENTS = [
    ({"loss": 0.2, "accuracy": 0.9}, 30),
    ({"loss": 0.6, "accuracy": 0.5}, 10),
    ({"loss": 0.4, "accuracy": 0.7}, 60),
]


def personalized_round(round_: int) -> RoundRecord:
    return RoundRecord(
        round_,
        (0, 1, 2),
        0.5,
        0.8,
        metrics={"test_r2": 0.25, **personalized_summary(CLIENTS), "epsilon": 1.5},
    )


def test_the_summary_by_hand():
    summary = personalized_summary(CLIENTS)
    assert list(summary) == [
        "personalized_loss",
        "personalized_loss_p10",
        "personalized_loss_p50",
        "personalized_loss_p90",
        "personalized_accuracy",
        "personalized_accuracy_p10",
        "personalized_accuracy_p50",
        "personalized_accuracy_p90",
    ]
    # Example-weighted: (0.9 * 30 + 0.5 * 10 + 0.7 * 60) / 100.
    assert summary["personalized_accuracy"] == pytest.approx(0.74)
    assert summary["personalized_loss"] == pytest.approx((0.2 * 30 + 0.6 * 10 + 0.4 * 60) / 100)
    # Percentiles over the clients, each counted once (sorted 0.5, 0.7, 0.9; linear interpolation).
    assert summary["personalized_accuracy_p10"] == pytest.approx(0.54)
    assert summary["personalized_accuracy_p50"] == pytest.approx(0.7)
    assert summary["personalized_accuracy_p90"] == pytest.approx(0.86)
    assert all(isinstance(v, float) for v in summary.values())


def test_one_client_is_its_own_summary_and_none_is_empty():
    assert personalized_summary([({"mse": 2.0}, 7)]) == {
        "personalized_mse": 2.0,
        "personalized_mse_p10": 2.0,
        "personalized_mse_p50": 2.0,
        "personalized_mse_p90": 2.0,
    }
    assert personalized_summary([]) == {}


def test_a_metric_only_some_clients_report_is_summarized_over_those():
    summary = personalized_summary([({"loss": 1.0, "r2": 0.5}, 1), ({"loss": 3.0}, 3)])
    assert summary["personalized_loss"] == 2.5 and summary["personalized_r2"] == summary["personalized_r2_p90"] == 0.5


@pytest.mark.parametrize("examples", [0, -3])
def test_a_client_without_examples_is_refused(examples):
    with pytest.raises(ValueError, match=f"num_examples={examples}"):
        personalized_summary([({"loss": 1.0}, 5), ({"loss": 1.0}, examples)])


@given(
    st.lists(
        st.tuples(st.floats(0, 1, allow_nan=False), st.integers(1, 1000)),
        min_size=1,
        max_size=20,
    )
)
def test_the_summary_lies_within_the_clients(clients):
    summary = personalized_summary([({"accuracy": a}, n) for a, n in clients])
    values = [a for a, _ in clients]
    lo, hi = min(values), max(values)
    tolerance = 1e-12
    assert lo - tolerance <= summary["personalized_accuracy"] <= hi + tolerance
    p10, p50, p90 = (summary[f"personalized_accuracy_p{q}"] for q in (10, 50, 90))
    assert lo - tolerance <= p10 <= p50 <= p90 <= hi + tolerance
    assert p50 == pytest.approx(float(np.median(values)))


def test_history_json_and_csv_keep_the_personalized_keys():
    history = History([RoundRecord(0, (), 2.3, 0.1), personalized_round(1), personalized_round(2)])
    assert History.from_json(history.to_json()) == history
    rows = list(csv.DictReader(io.StringIO(history.to_csv())))
    assert rows[0]["personalized_accuracy"] == rows[0]["personalized_accuracy_p90"] == ""  # round 0 has none
    for name, value in history.final.metrics.items():
        assert float(rows[2][name]) == value
    assert history.column("personalized_accuracy") == [None, pytest.approx(0.74), pytest.approx(0.74)]
