"""fedforge: federated learning simulations that are correct, fast and reproducible.

The pieces: `data` (datasets in memory, partitions), `models`, `client` (one client's
training), `engines` (where clients run), `strategies` (how updates are aggregated),
`simulation` (the round loop), `report` (outputs), `cli`.
"""

from . import data, engines, models, strategies
from .client import ClientConfig, ClientUpdate, train_client
from .config import Config
from .data import Dataset, TensorData, load_dataset
from .engines import ClientTask, Engine, SequentialEngine
from .errors import ConfigError, DataError, DivergenceError, FedforgeError
from .evaluation import Evaluation, evaluate
from .experiment import run_experiment
from .history import History, RoundRecord
from .models import build_model
from .simulation import FederatedData, SimulationResult, select_clients, simulate
from .strategies import FedAvg, ServerState, Strategy, fedavg

__version__ = "0.1.0"

__all__ = [
    "ClientConfig", "ClientTask", "ClientUpdate", "Config", "ConfigError", "DataError", "Dataset",
    "DivergenceError", "Engine", "Evaluation", "FedAvg", "FederatedData", "FedforgeError", "History",
    "RoundRecord", "SequentialEngine", "ServerState", "SimulationResult", "Strategy", "TensorData",
    "build_model", "data", "engines", "evaluate", "fedavg", "load_dataset", "models", "run_experiment",
    "select_clients", "simulate", "strategies", "train_client",
]
