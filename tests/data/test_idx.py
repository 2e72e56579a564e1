import gzip

import numpy as np
import pytest

from fedforge.data import read_idx, write_idx
from fedforge.errors import DataError


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path, suffix):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / f"images{suffix}", images)
    np.testing.assert_array_equal(read_idx(tmp_path / f"images{suffix}", (2, 3, 4)), images)


def test_header_is_the_published_format(tmp_path):
    write_idx(tmp_path / "labels", np.array([7, 1], dtype=np.uint8))
    # magic 0x00000801 (ubyte, 1 dim), then the length 2, then the values
    assert (tmp_path / "labels").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 1])


def test_truncated_gzip_is_refused(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((100, 28, 28), dtype=np.uint8))
    raw = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "x.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_idx(tmp_path / "x.gz")


def test_corrupt_gzip_is_refused(tmp_path):
    write_idx(tmp_path / "x.gz", np.arange(1000, dtype=np.uint8).reshape(10, 100) % 7)
    raw = bytearray((tmp_path / "x.gz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "x.gz").write_bytes(bytes(raw))
    with pytest.raises(DataError):
        read_idx(tmp_path / "x.gz")


def test_data_shorter_than_header_says_is_refused(tmp_path):
    write_idx(tmp_path / "x", np.zeros((10, 4), dtype=np.uint8))
    raw = (tmp_path / "x").read_bytes()
    with gzip.open(tmp_path / "x.gz", "wb") as f:  # a valid gzip of a truncated IDX
        f.write(raw[:-3])
    with pytest.raises(DataError, match="header"):
        read_idx(tmp_path / "x.gz")


def test_bad_magic_is_refused(tmp_path):
    (tmp_path / "x").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "x")


def test_unexpected_shape_is_refused(tmp_path):
    write_idx(tmp_path / "x", np.zeros((10, 4), dtype=np.uint8))
    with pytest.raises(DataError, match="expected"):
        read_idx(tmp_path / "x", (10, 5))
