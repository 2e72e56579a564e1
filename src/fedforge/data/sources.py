"""The datasets fedforge loads by name: a registry from a name (`mnist`) or a prefix (`csv:PATH`)
to the function that loads it, and `load(spec)`, which looks a name up there.

Each kind registers itself here once (`LOADERS`, `PREFIXES`); `register` adds one of your own:

    data.register("my-scans", lambda spec, request: Dataset(...))
    data.load("my-scans")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import _seeding
from ..errors import ConfigError
from .bundled import BUNDLED, load_bundled
from .datasets import DATASETS, Dataset, load_dataset
from .huggingface import load_hf
from .shakespeare import load_shakespeare
from .synthetic import synthetic
from .tables import parse_source, source_label
from .tabular import load_file_dataset


@dataclass(frozen=True)
class Request:
    """What a loader may need besides the dataset's name.

    Args:
        data_dir: the folder searched first for a dataset's files (mnist, shakespeare).
        download: download a dataset that is not found.
        progress: show a download's progress bar.
        target: a file dataset's (csv:, parquet:, hf:) column to predict.
        task: the built-in task ("classification", "regression" or "language-model") whose
            targets that column becomes (a task's `targets`, through `tasks.TARGETS`).
        seed: the run's seed (synthetic draws its data from it).
        num_clients: synthetic's devices.
        synthetic_alpha: synthetic(alpha, beta)'s alpha (how much the devices' models differ).
        synthetic_beta: synthetic(alpha, beta)'s beta (how much the devices' inputs differ).
        text: a run that reads text (`--task causal-lm` with `--model hf:PATH`): the loader of
            jsonl:, csv:, hf: and shakespeare-text, (spec, request) -> Dataset, bound to the
            run's task, model (its tokenizer and context) and text options
            (`fedforge.llm.text.load_requested`, bound by `Config.data_request`).
    """

    data_dir: str | os.PathLike | None = None
    download: bool = True
    progress: bool = True
    target: str | None = None
    task: str = "classification"
    seed: int = 0
    num_clients: int = 10
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    text: Loader | None = None


Loader = Callable[[str, Request], Dataset]


def _synthetic(name: str, request: Request) -> Dataset:
    rng = _seeding.numpy_rng(request.seed, _seeding.DATASET)
    dataset, _, _ = synthetic(request.synthetic_alpha, request.synthetic_beta, num_devices=request.num_clients, rng=rng)
    return dataset


def _idx(name: str, request: Request) -> Dataset:
    return load_dataset(name, request.data_dir, download=request.download, progress=request.progress)


def _shakespeare(name: str, request: Request) -> Dataset:
    return load_shakespeare(request.data_dir, download=request.download, progress=request.progress)


def _bundled(name: str, request: Request) -> Dataset:
    return load_bundled(name)


def _text(spec: str, request: Request) -> Dataset:
    if request.text is None:
        raise ConfigError(
            f"dataset {spec} is text: read it with --task causal-lm or sequence-classification and --model hf:PATH"
        )
    return request.text(spec, request)


def _table(spec: str, request: Request) -> Dataset:
    if request.text is not None:
        return _text(spec, request)
    return load_file_dataset(spec, target=request.target, task=request.task)


def _hf(spec: str, request: Request) -> Dataset:
    if request.text is not None:
        return _text(spec, request)
    if not request.target:
        raise ConfigError(f"dataset {spec!r} needs a target: the column to predict (--target COLUMN)")
    return load_hf(Path(spec.partition(":")[2]), target=request.target, task=request.task, name=source_label(spec))


LOADERS: dict[str, Loader] = {
    **dict.fromkeys(DATASETS, _idx),
    "synthetic": _synthetic,
    **dict.fromkeys(BUNDLED, _bundled),
    "shakespeare": _shakespeare,
    "shakespeare-text": _text,
}
PREFIXES: dict[str, Loader] = {"csv": _table, "parquet": _table, "hf": _hf, "jsonl": _text, "shakespeare-text": _text}


def register(name: str, loader: Loader, *, prefix: bool = False) -> None:
    """Make `load(name)` call `loader(name, request)`; with `prefix`, `load("name:ANYTHING")` too."""
    if name in LOADERS or name in PREFIXES:
        raise ConfigError(f"dataset {name!r} is registered already")
    (PREFIXES if prefix else LOADERS)[name] = loader


def loader_for(spec: str) -> Loader:
    """The loader of dataset `spec`: by its name, or by the prefix before its first colon."""
    if spec in LOADERS:
        return LOADERS[spec]
    kind, sep, _ = spec.partition(":")
    if sep and kind in PREFIXES:
        return PREFIXES[kind]
    names = ", ".join([*LOADERS, *(f"{p}:PATH" for p in PREFIXES)])
    raise ConfigError(f"unknown dataset {spec!r} (choose from: {names})")


def load(spec: str, request: Request | None = None, **options) -> Dataset:
    """Dataset `spec` (a name of `LOADERS`, or PREFIX:PATH of `PREFIXES`) in memory, loaded as
    `request` (or its fields given as `options`) says.

    >>> load("digits").num_classes
    10
    >>> load("csv:data/heart.csv", target="disease")  # doctest: +SKIP
    """
    request = dataclasses.replace(request or Request(), **options)
    return loader_for(spec)(spec, request)


__all__ = ["LOADERS", "PREFIXES", "Loader", "Request", "load", "loader_for", "parse_source", "register", "source_label"]
