"""The IDX format of MNIST-style datasets, read and written with numpy.

Format: two zero bytes, a type code, the number of dimensions, one big-endian int32 per
dimension, then the values in C order. See http://yann.lecun.com/exdb/mnist/.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

_DTYPES: dict[int, np.dtype] = {
    code: np.dtype(name)
    for code, name in {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.items()
}
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array.

    Args:
        path: the file; a `.gz` suffix means gzip (whose CRC catches corruption).
        shape: the shape the file must have, or None to accept any.

    Raises:
        DataError: the file is truncated, corrupt, or not of the expected shape.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path} is corrupt or truncated ({e}); delete it to fetch it again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad header); delete it to fetch it again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; delete it to fetch it again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _DTYPES[raw[2]]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} bytes of data, its header {dims} says {expected};"
            " delete it to fetch it again"
        )
    if shape is not None and tuple(dims) != tuple(shape):
        raise DataError(f"{path} has shape {tuple(dims)}, expected {tuple(shape)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 or int8 array as IDX, gzipped when `path` ends in `.gz`."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype not in _CODES:
        raise ValueError(f"write_idx supports uint8 and int8, got {array.dtype}")
    header = bytes([0, 0, _CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
