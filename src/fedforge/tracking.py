"""A run's records sent to experiment trackers: TensorBoard and MLflow (`pip install 'fedforge[tracking]'`).

A tracker says where to log (a folder, a store) and is a small frozen value, so that compare's
worker processes can be handed it; `start` opens one tracked run for a run of fedforge, which the
round loop's records and the clients' training metrics are sent to, round by round, and which is
finished once the run's outputs (model.pt, accuracy.png) are on disk. Both log the same scalars
(`scalars`): what history.json holds for the round, by the same names.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ._options import option
from .errors import ConfigError
from .history import NUMBERS, RoundRecord
from .reductions import PartialSum, Update

if TYPE_CHECKING:  # config imports this module for TrackingSettings
    from .config import Config


@dataclass(frozen=True)
class TrackingSettings:
    """Where a run's numbers are logged besides its folder (TOML: flat keys or the table [tracking])."""

    tensorboard: str | None = option(
        None,
        "log to TensorBoard in DIR/NAME (compare: DIR/NAME/LABEL, a folder per run of the comparison "
        "NAME): each round's numbers (those of history.json) as scalars, the clients' training metrics "
        "as histograms (tensorboard --logdir DIR; pip install 'fedforge[tracking]')",
        metavar="DIR",
    )
    mlflow: str | None = option(
        None,
        "log to MLflow, in the experiment fedforge, a run named NAME (compare: the experiment NAME, a "
        "run per label): the settings as parameters, each round's numbers as metrics (step: the round), "
        "model.pt and accuracy.png as artifacts; URI default: sqlite:///OUT_DIR/mlflow.db, artifacts in "
        "OUT_DIR/mlartifacts (pip install 'fedforge[tracking]'; its UI needs the full mlflow package: "
        "mlflow ui --backend-store-uri URI)",
        metavar="URI",
        const="default",
    )

    def __post_init__(self):
        """Nothing to check before the run: the trackers check their folder and store when they start."""


INSTALL = "pip install 'fedforge[tracking]'"

ARTIFACTS = ("model.pt", "accuracy.png")


class TrackedRun(Protocol):
    def round(self, record: RoundRecord, clients: Mapping[int, Mapping[str, float]]) -> None:
        """Log one round (round 0: the initial model); `clients`: each client's training metrics."""

    def finish(self, error: BaseException | None) -> None:
        """Close the run once its outputs are written; `error`: what stopped it, if anything did."""


class Tracker(Protocol):
    def prepare(self) -> None:
        """ConfigError now, before any round, when the library is missing or the store cannot be used."""

    def start(self, config: Config, run_dir: Path) -> TrackedRun:
        """A tracked run for the fedforge run `config` (resolved, named) that writes to `run_dir`."""


def scalars(record: RoundRecord) -> dict[str, float]:
    """Every number of `record` that is set and finite, by its name in history.json."""
    values = {name: getattr(record, name) for name in NUMBERS} | dict(record.metrics)
    return {name: float(v) for name, v in values.items() if v is not None and math.isfinite(v)}


def client_metrics(update: Update) -> dict[str, float] | None:
    """One client's training metrics (loss, accuracy, the task's others); None for a PartialSum,
    which stands for several clients and holds only their mean."""
    if isinstance(update, PartialSum):
        return None
    metrics = update.training_metrics()
    return {name: v for name, v in metrics.items() if v is not None and math.isfinite(v)}


@dataclass(frozen=True)
class TensorBoardTracker:
    """Each run's events in `log_dir/<run name>` (`tensorboard --logdir log_dir` shows them side by
    side): a scalar per round for every number of its record (`scalars`), a histogram per round of
    each training metric over the round's clients (`clients/train_loss`, ...), and the resolved
    settings as text (`config`)."""

    log_dir: str | Path

    def prepare(self) -> None:
        _summary_writer()

    def start(self, config: Config, run_dir: Path) -> _TensorBoardRun:
        assert config.name is not None, "a run is named before it starts"
        return _TensorBoardRun(_summary_writer()(str(Path(self.log_dir) / config.name)), config)


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"TensorBoard tracking needs the tensorboard package: {INSTALL}") from None
    return SummaryWriter


class _TensorBoardRun:
    def __init__(self, writer, config: Config):
        self.writer = writer
        self.writer.add_text("config", "```\n" + config.to_toml() + "```", 0)

    def round(self, record: RoundRecord, clients: Mapping[int, Mapping[str, float]]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record.round)
        for name in sorted({name for metrics in clients.values() for name in metrics}):
            values = [metrics[name] for metrics in clients.values() if name in metrics]
            self.writer.add_histogram(f"clients/train_{name}", np.asarray(values), record.round)
        self.writer.flush()  # a round is on disk for TensorBoard to show as soon as it is recorded

    def finish(self, error: BaseException | None) -> None:
        self.writer.close()


@dataclass(frozen=True)
class MLflowTracker:
    """Each run as an MLflow run named after it, in `experiment` of the store at `uri`: the resolved
    settings as parameters, every number of each round's record (`scalars`) as a metric with
    step = round, and model.pt and accuracy.png as artifacts at the end.

    `uri`: any tracking URI; a `sqlite:///PATH` store keeps new experiments' artifacts in an
    `mlartifacts` folder beside PATH (MLflow's default would be ./mlruns, under the current folder).
    """

    uri: str
    experiment: str = "fedforge"

    def prepare(self) -> None:
        self._connect()

    def start(self, config: Config, run_dir: Path) -> _MLflowRun:
        return _MLflowRun(*self._connect(), config, run_dir)

    def _connect(self) -> tuple[Any, str]:
        """A client of the store and the experiment's id; the experiment is made if missing (or, when
        another process made it meanwhile, found)."""
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(f"MLflow tracking needs the mlflow-skinny package: {INSTALL}") from None
        db = Path(self.uri[len("sqlite:///") :]) if self.uri.startswith("sqlite:///") else None
        try:
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=self.uri)
            if (experiment := client.get_experiment_by_name(self.experiment)) is not None:
                return client, experiment.experiment_id
            # A SQLite store's artifacts beside it; another store's where it says (a server's choice).
            artifacts = (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None
            try:
                return client, client.create_experiment(self.experiment, artifact_location=artifacts)
            except MlflowException as e:
                exists = e.error_code == "RESOURCE_ALREADY_EXISTS"
                if not exists or (experiment := client.get_experiment_by_name(self.experiment)) is None:
                    raise
                return client, experiment.experiment_id
        except ImportError as e:  # a SQLite store needs sqlalchemy and alembic
            raise ConfigError(f"MLflow store {self.uri} needs {e.name}, which is not installed: {INSTALL}") from None
        except MlflowException as e:
            raise ConfigError(f"MLflow store {self.uri}: {str(e.message).splitlines()[0]}") from None
        except OSError as e:
            raise ConfigError(f"MLflow store {self.uri}: {e.strerror or e}") from None


def default_mlflow_uri(out_dir: str | Path) -> str:
    """The store `--mlflow` uses without a URI: an SQLite file beside the run folders (MLflow 3
    keeps its file store, ./mlruns, in maintenance and refuses it by default)."""
    return f"sqlite:///{(Path(out_dir) / 'mlflow.db').resolve()}"


class _MLflowRun:
    def __init__(self, client, experiment_id: str, config: Config, run_dir: Path):
        from mlflow.entities import Param

        self.client = client
        self.run_dir = run_dir
        self.run_id = client.create_run(
            experiment_id, run_name=config.name, tags={"fedforge.run_dir": str(Path(run_dir).resolve())}
        ).info.run_id
        params = [Param(k, str(v)) for k, v in dataclasses.asdict(config).items() if v is not None]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            client.log_batch(self.run_id, params=params[i : i + 100])

    def round(self, record: RoundRecord, clients: Mapping[int, Mapping[str, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(name, value, now, record.round) for name, value in scalars(record).items()]
        )

    def finish(self, error: BaseException | None) -> None:
        for name in ARTIFACTS:
            if (Path(self.run_dir) / name).exists():
                self.client.log_artifact(self.run_id, str(Path(self.run_dir) / name))
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self.client.set_terminated(self.run_id, status)


__all__ = [
    "MLflowTracker",
    "TensorBoardTracker",
    "TrackedRun",
    "Tracker",
    "TrackingSettings",
    "client_metrics",
    "default_mlflow_uri",
    "scalars",
]
