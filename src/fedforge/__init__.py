"""fedforge: federated learning simulations that are correct, fast and reproducible.

The pieces: `data` (datasets in memory, partitions), `models`, `client` (one client's
training), `engines` (where clients run), `strategies` (how updates are aggregated),
`scenarios` (clients that differ, fail or lie), `devices` and `clock` (their devices' speeds and
the virtual time of their rounds), `simulation` (the round loop), `network`
(deployment: wire format, server, client), `report` (outputs), `cli`.
"""

from . import data, engines, models, strategies
from .app import ClientApp
from .client import ClientConfig, ClientPlan, ClientUpdate, train_client
from .compare import ComparedRun, RoundDone, compare_simulations, comparison_table, plot_comparison, write_comparison
from .config import Config
from .data import Dataset, FederatedData, TensorData, load_dataset
from .devices import Devices
from .engines import (
    AutoEngine,
    ClientTask,
    Engine,
    EngineChoice,
    SequentialEngine,
    VectorizedEngine,
    engine_choice,
    make_engine,
)
from .errors import ConfigError, DataError, DivergenceError, FedforgeError
from .evaluation import Evaluation, evaluate
from .experiment import run_experiment
from .history import History, RoundRecord, personalized_summary
from .models import build_model
from .scenarios import Scenario
from .simulation import SimulationResult, select_clients, simulate
from .strategies import STRATEGIES, FedAvg, RunInfo, ServerState, Strategy, fedavg, make_strategy
from .tasks import CLASSIFICATION, LANGUAGE_MODEL, REGRESSION, TASKS, Task, make_task

__version__ = "0.1.0"  # the one place it is written: pyproject.toml and `fedforge --version` read it

__all__ = [
    "CLASSIFICATION",
    "LANGUAGE_MODEL",
    "REGRESSION",
    "STRATEGIES",
    "TASKS",
    "AutoEngine",
    "ClientApp",
    "ClientConfig",
    "ClientPlan",
    "ClientTask",
    "ClientUpdate",
    "ComparedRun",
    "Config",
    "ConfigError",
    "DataError",
    "Dataset",
    "Devices",
    "DivergenceError",
    "Engine",
    "EngineChoice",
    "Evaluation",
    "FedAvg",
    "FederatedData",
    "FedforgeError",
    "History",
    "RoundDone",
    "RoundRecord",
    "RunInfo",
    "Scenario",
    "SequentialEngine",
    "ServerState",
    "SimulationResult",
    "Strategy",
    "Task",
    "TensorData",
    "VectorizedEngine",
    "build_model",
    "compare_simulations",
    "comparison_table",
    "data",
    "engine_choice",
    "engines",
    "evaluate",
    "fedavg",
    "load_dataset",
    "make_engine",
    "make_strategy",
    "make_task",
    "models",
    "personalized_summary",
    "plot_comparison",
    "run_experiment",
    "select_clients",
    "simulate",
    "strategies",
    "train_client",
    "write_comparison",
]
