"""The download path against a real HTTP server on 127.0.0.1."""

import dataclasses
import hashlib
import socket

import numpy as np
import pytest
from helpers import Served

from fedforge.data import MNIST, load_dataset, read_idx, write_idx
from fedforge.data.datasets import load_idx_dataset, locate
from fedforge.data.download import download
from fedforge.errors import DataError


def idx_gz_bytes(tmp_path, array, name):
    write_idx(tmp_path / name, array)
    return (tmp_path / name).read_bytes()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def payload(tmp_path):
    return idx_gz_bytes(tmp_path, np.arange(600, dtype=np.uint8).reshape(6, 10, 10) % 251, "src.gz")


def test_good_file_is_downloaded_and_verified(tmp_path, file_server, payload):
    file_server.files["/m/f.gz"] = Served(payload)
    path = download("f.gz", md5(payload), [file_server.url + "/m/"], tmp_path / "out", progress=False)
    assert path.read_bytes() == payload
    assert read_idx(path).shape == (6, 10, 10)


def test_wrong_checksum_leaves_no_file(tmp_path, file_server, payload):
    file_server.files["/m/f.gz"] = Served(payload)
    with pytest.raises(DataError, match="checksum mismatch"):
        download("f.gz", "0" * 32, [file_server.url + "/m/"], tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_truncated_transfer_leaves_no_file(tmp_path, file_server, payload):
    file_server.files["/m/f.gz"] = Served(payload[:100], claimed_length=len(payload))
    with pytest.raises(DataError, match="truncated"):
        download("f.gz", md5(payload), [file_server.url + "/m/"], tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_next_mirror_is_tried_after_a_bad_one(tmp_path, file_server, payload):
    file_server.files["/bad/f.gz"] = Served(payload[:-1] + b"x")
    file_server.files["/good/f.gz"] = Served(payload)
    mirrors = [file_server.url + "/missing/", file_server.url + "/bad/", file_server.url + "/good/"]
    path = download("f.gz", md5(payload), mirrors, tmp_path, progress=False)
    assert path.read_bytes() == payload
    assert file_server.requests == ["/missing/f.gz", "/bad/f.gz", "/good/f.gz"]


def tiny_mnist(tmp_path, file_server):
    """MNIST's spec with tiny files served from 127.0.0.1: the real locate/download/load path."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 20, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 5, dtype=np.uint8),
    }
    files = {}
    for part, (filename, _) in MNIST.files.items():
        data = idx_gz_bytes(tmp_path, arrays[part], filename)
        (tmp_path / filename).unlink()
        file_server.files["/mnist/" + filename] = Served(data)
        files[part] = (filename, md5(data))
    spec = dataclasses.replace(MNIST, files=files, mirrors=(file_server.url + "/mnist/",), train_size=20, test_size=5)
    return spec, arrays


def test_missing_dataset_is_downloaded_into_data_dir_and_loaded(tmp_path, file_server, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FEDFORGE_DATA", raising=False)
    spec, arrays = tiny_mnist(tmp_path, file_server)
    directory = locate(spec, tmp_path / "data", progress=False)
    assert directory == tmp_path / "data" / "mnist"
    data = load_idx_dataset(spec, directory)
    assert data.train.x.shape == (20, 1, 28, 28)
    expected = (arrays["train_images"][3].astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(data.train.x[3, 0].numpy(), expected, rtol=1e-6)
    assert data.test.y.tolist() == arrays["test_labels"].tolist()
    # A second call finds the files and fetches nothing.
    count = len(file_server.requests)
    assert locate(spec, tmp_path / "data", progress=False) == directory
    assert len(file_server.requests) == count


def test_default_download_goes_to_the_user_cache(tmp_path, file_server, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FEDFORGE_DATA", raising=False)
    spec, _ = tiny_mnist(tmp_path, file_server)
    assert locate(spec, progress=False) == tmp_path / "home" / ".cache" / "fedforge" / "mnist"


def test_offline_error_names_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FEDFORGE_DATA", raising=False)
    with socket.socket() as s:  # a port nobody listens on: connection refused, like being offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = dataclasses.replace(MNIST, mirrors=(f"http://127.0.0.1:{port}/",))
    with pytest.raises(DataError) as error:
        locate(spec, tmp_path / "data", progress=False)
    message = str(error.value)
    assert "\n" not in message
    for place in (
        tmp_path / "data" / "mnist",
        tmp_path / "home" / ".cache" / "fedforge" / "mnist",
        "/usr/share/datasets/mnist",
    ):
        assert str(place) in message
    assert "download failed" in message and "refused" in message.lower()


def test_no_download_when_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FEDFORGE_DATA", raising=False)
    with pytest.raises(DataError, match="MNIST not found in"):
        load_dataset("mnist", tmp_path, download=False)
