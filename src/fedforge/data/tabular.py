"""Tables from files as fedforge datasets: `csv:PATH` and `parquet:PATH` (`hf:PATH`: huggingface.py).

A table has one row per example and a header naming its columns; `target` names the column to
predict and every other column is a feature. Features must be numbers (encode a categorical
column first: one-hot, or category ids) with no missing values; they are standardized with the
mean and standard deviation of the training split only (a constant column is only centred) and
become one float32 matrix, the model's flat input.

The target, by task:

- `classification`: class labels, integers or strings, at most MAX_CLASSES distinct values.
  They become int64 class ids 0..k-1 in sorted order (numbers by value, strings
  alphabetically: labels 3, 5, 9 become 0, 1, 2) and `num_classes` is k.
- `regression`: numbers, float32 as they are (not standardized); one output (`num_classes` 1).

Train/test: a fixed 80/20 split of the rows (seed 0, like the bundled datasets): the same test
set in every run.

CSV: comma-separated, UTF-8, the first row is the header; read with the standard `csv` module.
An empty field, or NA, N/A, NaN, null, None or ?, is a missing value. Parquet (a file, or a
folder of .parquet files with the same columns) needs pyarrow: `pip install 'fedforge[parquet]'`.

Limits, so that a wrong file fails fast instead of exhausting memory: at most MAX_COLUMNS
columns and MAX_CELLS cells (rows x columns), and MAX_BYTES of data (a CSV file's size, a
Parquet table's uncompressed size).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from . import tables
from .datasets import Dataset, TensorData
from .tables import import_pyarrow, parquet_files, parse_source, read_parquet, source_label, split_indices, targets

_CHUNK_ROWS = 10_000
_MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})


def load_file_dataset(name: str, *, target: str | None, task: str) -> Dataset:
    """Dataset `name` ("csv:PATH" or "parquet:PATH"), `target` its column to predict, prepared for
    `task` (a built-in task's name: it decides class ids or float targets).

    Raises:
        ConfigError: not such a name, no target, or a task these files cannot serve; a missing extra.
        DataError: the file is missing, not of its kind, too large, or holds what cannot be used.
    """
    source = parse_source(name)
    if source is None or source[0] not in ("csv", "parquet"):
        raise ConfigError(f"dataset {name!r} is not csv:PATH or parquet:PATH")
    if not target:
        raise ConfigError(f"dataset {name!r} needs a target: the column to predict (--target COLUMN)")
    kind, path = source[0], Path(source[1])
    if task == "language-model":
        raise ConfigError(
            f"dataset {name!r}: task {task!r} needs token sequences; a table serves classification "
            f"or regression (use hf:PATH for tokenized data)"
        )
    if task not in ("classification", "regression"):
        raise ConfigError(
            f"dataset {name!r} prepares its target for the built-in tasks (classification, regression), not {task!r}"
        )
    if kind == "parquet":
        import_pyarrow()
    _check_path(path, "CSV file" if kind == "csv" else "Parquet file or folder", folder_ok=kind == "parquet")
    if kind == "csv":
        _, x, y = read_csv(path, target)
    else:
        _, x, y = _parquet_columns(read_parquet(parquet_files(path), path), target, str(path))
    return tabular_dataset(source_label(name), x, y, task=task, target=target, where=str(path))


def tabular_dataset(name: str, x: np.ndarray, y: np.ndarray, *, task: str, target: str, where: str) -> Dataset:
    """Split feature matrix `x` and target values `y` 80/20, standardize `x` with the training
    split's statistics, and turn `y` into class ids or float targets for `task`."""
    if len(x) < 3:
        raise DataError(f"{where} has {len(x)} row(s): too few for an 80/20 train/test split")
    labels, num_classes = targets(y, task=task, column=target, where=where)
    train, test = split_indices(len(x))
    mean, std = x[train].mean(0), x[train].std(0)
    # A constant column is only centred: never divided by zero, nor by its mean's rounding error.
    std[std <= 1e-12 * np.abs(mean)] = 1.0

    def part(rows):
        features = ((x[rows] - mean) / std).astype(np.float32)
        return TensorData(torch.from_numpy(features), torch.from_numpy(labels[rows]))

    return Dataset(name, part(train), part(test), num_classes=num_classes)


def _check_path(path: Path, what: str, *, folder_ok: bool = False) -> None:
    if not path.exists():
        raise DataError(f"{path} does not exist (expected a {what})")
    if path.is_dir() and not folder_ok:
        raise DataError(f"{path} is a folder, not a {what}")


def _check_header(header: list[str], target: str, where: str) -> int:
    """The target's position in `header`, after checking the columns' count and names."""
    if len(header) > tables.MAX_COLUMNS:
        raise DataError(f"{where} has {len(header)} columns, more than fedforge reads ({tables.MAX_COLUMNS})")
    seen = set()
    for column in header:
        if column in seen:
            raise DataError(f"{where}: column {column!r} appears twice in the header")
        seen.add(column)
    if target not in seen:
        raise DataError(f"{where} has no column {target!r} (its columns: {', '.join(header)})")
    if len(header) == 1:
        raise DataError(f"{where} has only the target column {target!r}: no features to learn from")
    return header.index(target)


def read_csv(path: Path, target: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The feature names, the features (float64, rows x features) and the target column (strings)
    of the CSV file at `path`."""
    if path.stat().st_size > tables.MAX_BYTES:
        raise DataError(f"{path} is {path.stat().st_size} bytes, more than fedforge reads ({tables.MAX_BYTES})")
    blocks: list[np.ndarray] = []
    labels: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataError(f"{path} is empty (expected a header row naming the columns)")
            header = [h.strip() for h in header]
            t = _check_header(header, target, str(path))
            names = header[:t] + header[t + 1 :]
            rows: list[list[str]] = []
            lines: list[int] = []
            count = 0
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) != len(header):
                    raise DataError(
                        f"{path}, line {reader.line_num}: {len(row)} fields, but the header has {len(header)}"
                    )
                count += 1
                if count * len(header) > tables.MAX_CELLS:
                    raise DataError(
                        f"{path} has more than {tables.MAX_CELLS} cells (rows x columns), more than fedforge reads"
                    )
                rows.append(row)
                lines.append(reader.line_num)
                if len(rows) == _CHUNK_ROWS:
                    blocks.append(_parse_rows(rows, lines, t, names, target, labels, path))
                    rows, lines = [], []
            if rows:
                blocks.append(_parse_rows(rows, lines, t, names, target, labels, path))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a CSV file (not UTF-8 text)") from None
    except csv.Error as e:
        raise DataError(f"{path} is not a readable CSV file: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if not blocks:
        raise DataError(f"{path} has a header but no rows")
    return names, np.concatenate(blocks), np.asarray(labels)


def _parse_rows(rows, lines, t, names, target, labels, path) -> np.ndarray:
    """One chunk of CSV rows as float64 features (its target fields appended to `labels`)."""
    for row, line in zip(rows, lines, strict=True):
        if row[t].strip().lower() in _MISSING:
            raise DataError(f"{path}, line {line}: the target column {target!r} has a missing value ({row[t]!r})")
        labels.append(row[t].strip())
    features = [row[:t] + row[t + 1 :] for row in rows]
    try:
        x = np.array(features, dtype=np.float64)
    except ValueError:
        raise _bad_fields(features, lines, names, path) from None
    bad = ~np.isfinite(x)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise DataError(
            f"{path}, line {lines[i]}: column {names[j]!r} has a missing or infinite value "
            f"({features[i][j]!r}); fill or drop such rows first"
        )
    return x


def _bad_fields(features, lines, names, path) -> DataError:
    """The error that says which columns of a chunk of CSV rows are not numbers, or where one is missing."""
    text, missing = {}, None
    for j, name in enumerate(names):
        for i, row in enumerate(features):
            try:
                float(row[j])
            except ValueError:
                if row[j].strip().lower() not in _MISSING:
                    text[name] = (lines[i], row[j])
                    break
                missing = missing or (name, lines[i], row[j])
    if text:
        line, value = next(iter(text.values()))
        return DataError(
            f"{path}: column(s) {', '.join(map(repr, text))} are not numbers (e.g. {value!r} on line "
            f"{line}); encode them as numbers first (one-hot or category ids)"
        )
    if missing:
        name, line, value = missing
        return DataError(
            f"{path}, line {line}: column {name!r} has a missing value ({value!r}); fill or drop such rows first"
        )
    return DataError(f"{path}: some fields are not numbers")


def _parquet_columns(table, target: str, where: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The feature names, the features (float64) and the target values of an Arrow table."""
    import pyarrow as pa

    header = list(table.column_names)
    if not header:
        raise DataError(f"{where} is empty (no columns)")
    _check_header(header, target, where)
    if table.num_rows == 0:
        raise DataError(f"{where} has columns but no rows")
    names = [c for c in header if c != target]
    text = {
        c: str(table.column(c).type)
        for c in names
        if not (
            pa.types.is_integer(table.column(c).type)
            or pa.types.is_floating(table.column(c).type)
            or pa.types.is_boolean(table.column(c).type)
        )
    }
    if text:
        raise DataError(
            f"{where}: column(s) {', '.join(map(repr, text))} are not numbers "
            f"({', '.join(dict.fromkeys(text.values()))}); encode them as numbers first "
            f"(one-hot or category ids)"
        )
    for c in header:
        if table.column(c).null_count:
            row = int(np.argmax(table.column(c).is_null().to_numpy()))
            raise DataError(
                f"{where}: column {c!r} has {table.column(c).null_count} missing value(s) (the first in "
                f"row {row + 1}); fill or drop such rows first"
            )
    x = np.column_stack([table.column(c).to_numpy().astype(np.float64) for c in names])
    bad = ~np.isfinite(x)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise DataError(
            f"{where}: column {names[j]!r} has a missing or infinite value ({x[i, j]}) in row {i + 1}; "
            f"fill or drop such rows first"
        )
    column = table.column(target)
    if not (
        pa.types.is_integer(column.type)
        or pa.types.is_floating(column.type)
        or pa.types.is_boolean(column.type)
        or pa.types.is_string(column.type)
        or pa.types.is_large_string(column.type)
    ):
        raise DataError(f"{where}: target column {target!r} has type {column.type}; expected numbers or strings")
    y = column.to_numpy()
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise DataError(
            f"{where}: target column {target!r} has a missing or infinite value in row "
            f"{int(np.argmax(~np.isfinite(y))) + 1}"
        )
    return names, x, y


__all__ = ["load_file_dataset", "read_csv", "tabular_dataset"]
