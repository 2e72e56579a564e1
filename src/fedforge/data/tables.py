"""What tables (tabular.py) and Hugging Face datasets (huggingface.py) share: their names
(`csv:PATH`, `parquet:PATH`, `hf:PATH`), the limits on what fedforge reads, the fixed
train/test split, target columns prepared for a task, and Parquet.

Limits, so that a wrong file fails fast instead of exhausting memory: at most MAX_COLUMNS
columns and MAX_CELLS cells (rows x columns), and MAX_BYTES of data (a CSV file's size, a
Parquet table's uncompressed size, a Hugging Face dataset's Arrow data).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError

FILE_KINDS = ("csv", "parquet", "hf")
MAX_COLUMNS = 10_000
MAX_CELLS = 50_000_000  # 400 MB as float64 while parsing, 200 MB as the float32 tensors
MAX_BYTES = 2**31  # a CSV file; a Parquet table, uncompressed; a Hugging Face dataset's Arrow data
MAX_CLASSES = 1_000
TEST_FRACTION = 0.2


def parse_source(name: str) -> tuple[str, str] | None:
    """("csv", PATH) for dataset "csv:PATH" (likewise parquet: and hf:); None for a plain name like "mnist"."""
    kind, sep, path = name.partition(":")
    return (kind, path) if sep and kind in FILE_KINDS else None


def source_label(name: str) -> str:
    """A short name of dataset `name` fit for a folder: "csv-heart" for "csv:data/heart.csv", and
    likewise for any PREFIX:PATH (jsonl:, shakespeare-text:, one's own)."""
    kind, sep, path = name.partition(":")
    if not sep:
        return name
    stem = Path(path.rstrip("/\\")).stem or kind
    return re.sub(r"[^\w.-]", "_", kind) + "-" + re.sub(r"[^\w.-]", "_", stem)


def split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the training and the test split: a fixed permutation (seed 0), cut 80/20."""
    order = np.random.default_rng(0).permutation(n)
    cut = round(n * (1 - TEST_FRACTION))
    return order[:cut], order[cut:]


def targets(values: np.ndarray, *, task: str, column: str, where: str) -> tuple[np.ndarray, int]:
    """Target `values` (numbers, or strings) as class ids and their count for classification, or
    float32 values and one output for regression."""
    numbers = _as_numbers(values)
    if numbers is not None and not np.isfinite(numbers).all():
        row = int(np.argmax(~np.isfinite(numbers)))
        raise DataError(
            f"{where}: target column {column!r} has a missing or infinite value ({numbers[row]}) in data row {row + 1}"
        )
    if task == "regression":
        if numbers is None:
            raise DataError(
                f"{where}: target column {column!r} is not numbers (e.g. {_first_text(values)!r}); "
                f"regression needs numbers (or use --task classification)"
            )
        return numbers.astype(np.float32), 1
    if task != "classification":
        raise ConfigError(f"task {task!r} cannot use a table's target column {column!r}")
    if numbers is not None:
        fractional = numbers != np.round(numbers)
        if fractional.any():
            raise DataError(
                f"{where}: target column {column!r} has value {float(numbers[fractional.argmax()])}, not a "
                f"class label (an integer or a string); use --task regression for a continuous target"
            )
        values = numbers
    classes, ids = np.unique(values, return_inverse=True)
    if len(classes) > MAX_CLASSES:
        raise DataError(
            f"{where}: target column {column!r} has {len(classes)} distinct values, more than "
            f"{MAX_CLASSES} classes; use --task regression for a continuous target"
        )
    if len(classes) < 2:
        value = classes[0].item() if isinstance(classes[0], np.generic) else classes[0]  # text labels: str
        raise DataError(f"{where}: target column {column!r} has a single value ({value!r}): nothing to classify")
    return ids.astype(np.int64).reshape(-1), len(classes)


def _as_numbers(values: np.ndarray) -> np.ndarray | None:
    if values.dtype.kind in "biuf":
        return values.astype(np.float64)
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _first_text(values: np.ndarray) -> str:
    for v in values:
        try:
            float(v)
        except (TypeError, ValueError):
            return str(v)
    return str(values[0])


def import_pyarrow(extra: str = "parquet"):
    """pyarrow.parquet, or a ConfigError saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"reading Parquet needs pyarrow: pip install 'fedforge[{extra}]'") from None
    return pq


def parquet_files(path: Path) -> list[Path]:
    """`path` if it is a file, else the .parquet files under the folder `path`, sorted."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"{path} is a folder without .parquet files")
    return files


def read_parquet(files: list[Path], where: Path | str, *, extra: str = "parquet", count_cells: bool = True):
    """Parquet `files` (see `parquet_files`) one after another as one Arrow table, `where` naming
    them in errors; their columns (and cells, with `count_cells`) are counted from their metadata
    before anything is read."""
    pq = import_pyarrow(extra)
    import pyarrow as pa

    rows, columns, size = 0, 0, 0
    for file in files:
        try:
            meta = pq.read_metadata(file)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{file} is not a Parquet file ({str(e).splitlines()[0]})") from None
        rows, columns = rows + meta.num_rows, max(columns, meta.num_columns)
        size += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if size > MAX_BYTES:
        raise DataError(f"{where} holds {size} bytes of data (uncompressed), more than fedforge reads ({MAX_BYTES})")
    if columns > MAX_COLUMNS:
        raise DataError(f"{where} has {columns} columns, more than fedforge reads ({MAX_COLUMNS})")
    if count_cells and rows * columns > MAX_CELLS:
        raise DataError(f"{where} has {rows} rows x {columns} columns, more than fedforge reads ({MAX_CELLS} cells)")
    try:
        tables = [pq.read_table(file) for file in files]
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{where} cannot be read as one Parquet table ({str(e).splitlines()[0]})") from None


__all__ = [
    "FILE_KINDS",
    "MAX_BYTES",
    "MAX_CELLS",
    "MAX_CLASSES",
    "MAX_COLUMNS",
    "TEST_FRACTION",
    "import_pyarrow",
    "parquet_files",
    "parse_source",
    "read_parquet",
    "source_label",
    "split_indices",
    "targets",
]
