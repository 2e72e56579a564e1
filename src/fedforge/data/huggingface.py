"""Hugging Face `datasets` from disk as fedforge datasets: `hf:PATH`.

PATH is a folder written by `save_to_disk`: a DatasetDict with a `train` and a `test` split (or
`validation` when there is no `test`), or a single Dataset, split 80/20 like the tables of
tables.py; or a Parquet file, or a folder of them (files named train* and test* are those
splits; otherwise all the files are one table, split 80/20).

Columns become tensors as they are, not standardized (prepare them with `Dataset.map` first):
floating numbers become float32, integers and booleans int64 (token ids stay ids), and a column
of fixed-length lists (a tokenizer's padded `input_ids` and `attention_mask`, nested lists of an
image) a tensor of rows x length (x ...). `target` names the column to predict; every other
column is an input: one input column is the model's input alone, several are a dict of tensors
by column name, passed as `model(**x)`. Text, lists of varying length and other types are
refused: tokenize and pad them first, or drop them (`remove_columns`). So are missing values.

The target, by task: classification, a `ClassLabel` column keeps its ids and its number of
classes, other integer or string labels become class ids 0..k-1 as for tables; regression,
numbers as float32 (a fixed-length list: several outputs); language-model, token ids (rows x
length), `num_classes` one more than the largest id.

Limits: at most MAX_COLUMNS columns and MAX_BYTES of Arrow data. Needs `datasets`:
`pip install 'fedforge[hf]'`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from . import tables
from .datasets import Dataset, TensorData
from .tables import parquet_files, read_parquet, split_indices, targets


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError("hf: datasets need Hugging Face datasets: pip install 'fedforge[hf]'") from None
    return datasets


def load_hf(path: Path, *, target: str, task: str, name: str | None = None) -> Dataset:
    """The Hugging Face dataset at `path` (see the module's docstring), `target` its column to
    predict, prepared for `task` (a built-in task's name)."""
    if task not in ("classification", "regression", "language-model"):
        raise ConfigError(
            f"a Hugging Face dataset's target is prepared for the built-in tasks (classification, "
            f"regression, language-model), not {task!r}"
        )
    hf = _import_datasets()
    splits, features = _read(Path(path), hf)
    where = str(path)
    columns = list(next(iter(splits.values())).column_names)
    if len(columns) > tables.MAX_COLUMNS:
        raise DataError(f"{where} has {len(columns)} columns, more than fedforge reads ({tables.MAX_COLUMNS})")
    size = sum(table.nbytes for table in splits.values())
    if size > tables.MAX_BYTES:
        raise DataError(f"{where} holds {size} bytes of data, more than fedforge reads ({tables.MAX_BYTES})")
    for split, table in splits.items():
        if set(table.column_names) != set(columns):
            raise DataError(
                f"{where}: split {split!r} has columns {', '.join(table.column_names)}, but "
                f"{next(iter(splits))!r} has {', '.join(columns)}"
            )
        if table.num_rows == 0:
            raise DataError(f"{where}: split {split!r} has no rows")
    if target not in columns:
        raise DataError(f"{where} has no column {target!r} (its columns: {', '.join(columns)})")
    inputs = [c for c in columns if c != target]
    if not inputs:
        raise DataError(f"{where} has only the target column {target!r}: no inputs to learn from")

    xs = {split: {c: _tensor(array(table.column(c), c, where)) for c in inputs} for split, table in splits.items()}
    ys, num_classes = _targets(
        [table.column(target) for table in splits.values()],
        features.get(target),
        task=task,
        column=target,
        where=where,
        hf=hf,
    )
    parts = [
        TensorData(x if len(inputs) > 1 else x[inputs[0]], torch.from_numpy(y))
        for x, y in zip(xs.values(), ys, strict=True)
    ]
    if len(parts) == 2:
        train, test = parts
    else:
        if len(parts[0]) < 3:
            raise DataError(f"{where} has {len(parts[0])} row(s): too few for an 80/20 train/test split")
        train_rows, test_rows = split_indices(len(parts[0]))
        train, test = parts[0].subset(train_rows), parts[0].subset(test_rows)
    return Dataset(name or f"hf-{Path(path).stem}", train, test, num_classes=num_classes)


def is_hf_dataset(data) -> bool:
    """Whether `data` is a Hugging Face `datasets.Dataset` (datasets is not imported for it: whoever
    holds one has imported it already)."""
    hf = sys.modules.get("datasets")
    return hf is not None and isinstance(data, hf.Dataset)


def hf_tensors(
    dataset, *, target: int | str | Sequence[int | str] = -1, inputs: int | str | Sequence[int | str] | None = None
) -> TensorData:
    """A `datasets.Dataset` in memory, its columns read once as tensors and split into inputs and
    target as `TensorData.from_batch` splits a dict of them.

    `target` and `inputs` name columns, or give their positions (a task's `target` and
    `inputs`). The default target, -1, is the column "label" when there is one, else the last
    column; the default inputs are all the other columns (one alone, several as a dict). The
    columns are read in the dataset's format, torch when none is set (so that an `Image`
    column becomes a uint8 tensor, channels first; a `with_transform` of yours runs as it is); 8-bit images are
    scaled to float32 in [0, 1], as torchvision's ToTensor does, other numbers kept as they come.
    """
    batch = dataset[:] if dataset.format["type"] is not None else dataset.with_format("torch")[:]
    columns = list(batch)

    def named(key):
        if isinstance(key, int) and not isinstance(key, bool):
            if not -len(columns) <= key < len(columns):
                raise DataError(f"the datasets.Dataset has no column {key} (it has: {', '.join(columns)})")
            return columns[key]
        return key

    if target == -1 and "label" in columns:
        target = "label"
    target = [named(k) for k in target] if isinstance(target, (list, tuple)) else named(target)
    if inputs is not None:
        inputs = [named(k) for k in inputs] if isinstance(inputs, (list, tuple)) else named(inputs)
    tensors = {}
    for name, values in batch.items():
        if isinstance(values, np.ndarray):
            values = torch.from_numpy(values)
        if not isinstance(values, torch.Tensor):
            raise DataError(
                f"column {name!r} of the datasets.Dataset is not one tensor (it holds {type(values).__name__}: "
                f"text, or items of different shapes); tokenize, pad or resize it first, or drop it (remove_columns)"
            )
        tensors[name] = values.float() / 255 if values.dtype == torch.uint8 and values.dim() > 1 else values
    return TensorData.from_batch(tensors, target=target, inputs=inputs)


def read_splits(path: Path) -> tuple[dict, Any]:
    """{split: Arrow table} ("train" and "test", or "all" for one table to split) of the Hugging
    Face dataset at `path` (see the module's docstring), and the columns' `datasets.Features`."""
    return _read(Path(path), _import_datasets())


def _read(path: Path, hf) -> tuple[dict, Any]:
    """{split: Arrow table} ("train" and "test", or "all" for one table to split) and the columns'
    `datasets.Features`."""
    if not path.exists():
        raise DataError(f"{path} does not exist (expected a folder written by save_to_disk, or Parquet)")
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            loaded = hf.load_from_disk(str(path))
        except Exception as e:
            raise DataError(
                f"{path} cannot be loaded by datasets.load_from_disk ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        if isinstance(loaded, hf.DatasetDict):
            test = next((s for s in ("test", "validation") if s in loaded), None)
            if "train" not in loaded or test is None:
                raise DataError(
                    f"{path} has the splits {', '.join(loaded)}; fedforge needs 'train' and 'test' (or 'validation')"
                )
            parts = {"train": loaded["train"], "test": loaded[test]}
        else:
            parts = {"all": loaded}
        features = next(iter(parts.values())).features
        return {split: d.with_format("arrow")[:] for split, d in parts.items()}, features
    if path.is_dir() and not any(path.rglob("*.parquet")):
        raise DataError(
            f"{path} is not a Hugging Face dataset (no dataset_dict.json or state.json of save_to_disk, "
            f"and no .parquet files)"
        )
    files = parquet_files(path)
    train_files = [f for f in files if f.name.startswith("train")]
    test_files = [f for f in files if f.name.startswith("test")]
    chosen = {"train": train_files, "test": test_files} if train_files and test_files else {"all": files}
    tables = {split: read_parquet(group, path, extra="hf", count_cells=False) for split, group in chosen.items()}
    return tables, hf.Features.from_arrow_schema(next(iter(tables.values())).schema)


def array(column, name: str, where: str) -> np.ndarray:
    """An Arrow column of numbers, or of fixed-length (nested) lists of numbers, as one numpy array
    of rows (x length ...); one line naming the column for anything else."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = [len(values)]
    while (
        pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type)
    ):
        if values.null_count:
            raise DataError(
                f"{where}: column {name!r} has {values.null_count} missing value(s); fill or drop them first"
            )
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        if len(lengths) and lengths.min() != lengths.max():
            raise DataError(
                f"{where}: column {name!r} holds lists of different lengths ({lengths.min()} to "
                f"{lengths.max()}); pad them to one length first (e.g. a tokenizer's "
                f"padding='max_length')"
            )
        shape.append(int(lengths[0]) if len(lengths) else 0)
        values = values.flatten()
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        raise DataError(
            f"{where}: column {name!r} holds text; tokenize and pad it first (fixed-length lists of "
            f"token ids), or drop it (remove_columns)"
        )
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_boolean(values.type)):
        raise DataError(
            f"{where}: column {name!r} has type {values.type}, not numbers or fixed-length lists of "
            f"them; convert it first, or drop it (remove_columns)"
        )
    if values.null_count:
        raise DataError(f"{where}: column {name!r} has {values.null_count} missing value(s); fill or drop them first")
    result = values.to_numpy(zero_copy_only=False).reshape(shape)
    if result.dtype.kind == "f" and not np.isfinite(result).all():
        raise DataError(f"{where}: column {name!r} has a NaN or infinite value; fill or drop such rows first")
    return result


def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(values.astype(np.float32 if values.dtype.kind == "f" else np.int64))


def _targets(columns: list, feature, *, task: str, column: str, where: str, hf) -> tuple[list[np.ndarray], int]:
    """Each split's target column as what `task` trains on, and the model's output size."""
    import pyarrow as pa

    if task == "classification":
        if isinstance(feature, hf.ClassLabel):
            ids = [array(c, column, where).astype(np.int64) for c in columns]
            for split_ids in ids:
                if split_ids.ndim != 1 or (
                    len(split_ids) and (split_ids.min() < 0 or split_ids.max() >= feature.num_classes)
                ):
                    raise DataError(
                        f"{where}: target column {column!r} has ids outside its ClassLabel's "
                        f"0..{feature.num_classes - 1} (-1: a missing label)"
                    )
            return ids, feature.num_classes
        text = [pa.types.is_string(c.type) or pa.types.is_large_string(c.type) for c in columns]
        values = [
            np.asarray(c.to_pylist(), dtype=object) if t else array(c, column, where)
            for c, t in zip(columns, text, strict=True)
        ]
        if any(v.ndim != 1 for v in values) or any(v is None for v in np.concatenate(values)):
            raise DataError(f"{where}: target column {column!r} must hold one class label per row, with none missing")
        labels, num_classes = targets(np.concatenate(values), task=task, column=column, where=where)
        return np.split(labels, np.cumsum([len(v) for v in values])[:-1]), num_classes
    if task == "regression":
        if any(pa.types.is_string(c.type) or pa.types.is_large_string(c.type) for c in columns):
            raise DataError(
                f"{where}: target column {column!r} holds text; regression needs numbers (or use --task classification)"
            )
        values = [array(c, column, where).astype(np.float32) for c in columns]
        return values, math.prod(values[0].shape[1:])
    if task == "language-model":
        ids = [array(c, column, where) for c in columns]
        if any(v.dtype.kind not in "iu" or v.ndim < 2 for v in ids):
            raise DataError(
                f"{where}: target column {column!r} must hold fixed-length lists of token ids for task language-model"
            )
        return [v.astype(np.int64) for v in ids], int(max(v.max() for v in ids)) + 1
    raise AssertionError(task)  # load_hf checked it


__all__ = ["array", "hf_tensors", "is_hf_dataset", "load_hf", "read_splits"]
