"""Which data a run learns from and how it is split across clients."""

from __future__ import annotations

from dataclasses import dataclass

from .._options import check_choices, option
from ..errors import ConfigError
from .bundled import BUNDLED
from .datasets import DATASETS
from .federated import Split
from .partition import PARTITIONS
from .tables import parse_source


@dataclass(frozen=True)
class DataSettings:
    """The dataset and its partition (TOML: flat keys or the table [data])."""

    dataset: str = option(
        "mnist",
        "dataset (synthetic: FedProx's synthetic(alpha, beta), one client per device; "
        "digits, diabetes: scikit-learn's, offline; shakespeare: LEAF's next-character task, with "
        "--task language-model --model char-lstm), or csv:PATH, parquet:PATH (a table) or hf:PATH "
        "(a Hugging Face dataset: a save_to_disk folder or Parquet), each with --target; text for "
        "--task causal-lm or sequence-classification with --model hf:PATH: jsonl:PATH, csv:PATH, hf:PATH "
        "(--text-column and friends), shakespeare-text (the roles of shakespeare's plays as text, one "
        "client per role with --partition natural) or shakespeare-text:PATH (a file in the Complete "
        "Works' layout)",
        (*DATASETS, "synthetic", *BUNDLED, "shakespeare", "shakespeare-text"),
        open_choices=True,
    )
    synthetic_alpha: float = option(1.0, "synthetic: how much the devices' models differ")
    synthetic_beta: float = option(1.0, "synthetic: how much the devices' data differ")
    data_dir: str | None = option(None, "folder with the dataset files (searched first)")
    download: bool = option(True, "download the dataset when it is not found")
    target: str | None = option(None, "csv:, parquet:, hf: datasets: the column to predict (the others are inputs)")
    num_clients: int = option(10, "number of clients the training set is split across")
    partition: str = option("iid", "how the data is split across clients (synthetic: always by device)", PARTITIONS)
    alpha: float = option(0.5, "Dirichlet concentration for partition=dirichlet (smaller: more skew)")
    shards_per_client: int = option(2, "shards per client for partition=shards")
    sigma: float = option(1.0, "lognormal sigma of client sizes for partition=quantity")
    client_test_fraction: float = option(0.0, "fraction of each client's data held out for federated evaluation")

    def __post_init__(self):
        check_choices(self, DataSettings)
        _check_dataset(self.dataset)
        # A file dataset needs a target unless it is text (the task decides: Config checks it).
        if not parse_source(self.dataset) and self.target is not None:
            raise ConfigError(
                f"target {self.target!r} is for csv:, parquet: and hf: datasets only, not {self.dataset!r}"
            )
        for name in ("num_clients", "shards_per_client"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        if not 0 <= self.client_test_fraction < 1:
            raise ConfigError(f"client_test_fraction must be in [0, 1), got {self.client_test_fraction}")

    def data_split(self) -> Split:
        """How this run splits its dataset across clients."""
        return Split(
            partition=self.partition,
            num_clients=self.num_clients,
            alpha=self.alpha,
            shards_per_client=self.shards_per_client,
            sigma=self.sigma,
            client_test_fraction=self.client_test_fraction,
        )


def _check_dataset(name: str) -> None:
    """A ConfigError unless `name` is a registered dataset (`data.register`: the built-ins and
    one's own), or `PREFIX:PATH` of a registered prefix (csv:, parquet:, hf:, one's own)."""
    from . import sources  # read at each check: a dataset registered later counts

    if name in sources.LOADERS:
        return
    kind, sep, path = name.partition(":")
    if sep and kind in sources.PREFIXES:
        if not path:
            raise ConfigError(f"dataset {name!r} names no file: give {kind}:PATH")
        return
    raise ConfigError(
        f"unknown dataset {name!r} (choose from: {', '.join(sources.LOADERS)}, "
        f"or {', '.join(f'{p}:PATH' for p in sources.PREFIXES)})"
    )
