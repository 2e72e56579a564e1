"""Datasets held once in memory as tensors, found on disk or downloaded and verified."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write
from ..errors import ConfigError, DataError
from .download import download
from .idx import read_idx


def gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[index]` for an integer index of any shape, copied row by row.

    Equal to advanced indexing, which copies element by element; for a batch of image rows
    this is 5x faster when the rows are in cache, about 10% faster in a vectorized round where
    they are not.
    """
    return tensor.index_select(0, index.reshape(-1)).view(*index.shape, *tensor.shape[1:])


@dataclass(frozen=True)
class TensorData:
    """Examples `x` and integer labels `y`, already on their device."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} examples but y has {len(self.y)}")

    def __len__(self) -> int:
        return self.y.shape[0]

    def subset(self, indices) -> TensorData:
        """The examples at `indices`, gathered into new contiguous tensors."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.y.device)
        return TensorData(gather(self.x, index), gather(self.y, index))

    def to(self, device: str | torch.device) -> TensorData:
        return TensorData(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Dataset:
    """A train/test pair and what a model needs to know about it."""

    name: str
    train: TensorData
    test: TensorData
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def to(self, device: str | torch.device) -> Dataset:
        return Dataset(self.name, self.train.to(device), self.test.to(device), self.num_classes)


@dataclass(frozen=True)
class IdxSpec:
    """An MNIST-style dataset: four gzipped IDX files with published MD5 checksums."""

    name: str
    title: str
    files: dict[str, tuple[str, str]]  # part -> (file name, md5 of the .gz)
    mirrors: tuple[str, ...]
    image_shape: tuple[int, int] = (28, 28)
    train_size: int = 60_000
    test_size: int = 10_000
    num_classes: int = 10
    # The tutorial's transform: ToTensor() then Normalize(0.5, 0.5).
    mean: float = 0.5
    std: float = 0.5
    debian_package: str | None = None

    def shape(self, part: str) -> tuple[int, ...]:
        n = self.train_size if part.startswith("train") else self.test_size
        return (n, *self.image_shape) if part.endswith("images") else (n,)


MNIST = IdxSpec(
    name="mnist",
    title="MNIST",
    files={
        "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
)

FASHION_MNIST = IdxSpec(
    name="fashion-mnist",
    title="Fashion-MNIST",
    files={
        "train_images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "train_labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        "test_images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        "test_labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    },
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    debian_package="dataset-fashion-mnist",
)

DATASETS: dict[str, IdxSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}


def _spec(name: str) -> IdxSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r} (choose from: {', '.join(DATASETS)})") from None


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where dataset `name` is looked for, in order.

    An explicit `data_dir`, then `$FEDFORGE_DATA`, each either holding the files or a
    `<name>/` folder with them; then `~/.cache/fedforge/<name>/`, then
    `/usr/share/datasets/<name>/` (where Debian's dataset packages put them).
    """
    dirs: list[Path] = []
    for root in (data_dir, os.environ.get("FEDFORGE_DATA")):
        if root:
            dirs += [Path(root) / name, Path(root)]
    dirs += [Path.home() / ".cache" / "fedforge" / name, Path("/usr/share/datasets") / name]
    return dirs


def _complete(spec: IdxSpec, directory: Path) -> bool:
    return all((directory / filename).is_file() for filename, _ in spec.files.values())


def _download_dir(spec: IdxSpec, data_dir) -> Path:
    root = data_dir or os.environ.get("FEDFORGE_DATA")
    return Path(root) / spec.name if root else Path.home() / ".cache" / "fedforge" / spec.name


def locate(
    spec: IdxSpec,
    data_dir: str | os.PathLike | None = None,
    *,
    download_missing: bool = True,
    progress: bool = True,
) -> Path:
    """The folder holding all of `spec`'s files, downloading them if none does."""
    searched = search_dirs(spec.name, data_dir)
    for directory in searched:
        if _complete(spec, directory):
            return directory
    how = f"download the four files from {spec.mirrors[0]}"
    if spec.debian_package:
        how = f"'apt-get install {spec.debian_package}', or " + how
    places = ", ".join(map(str, dict.fromkeys(searched)))
    if not download_missing:
        raise DataError(f"{spec.title} not found in {places}; {how} into one of them")
    target = _download_dir(spec, data_dir)
    try:
        for filename, md5 in spec.files.values():
            if not (target / filename).is_file():
                download(filename, md5, spec.mirrors, target, progress=progress)
    except DataError as e:
        raise DataError(f"{spec.title} not found in {places} and the download failed ({e}); {how}") from e
    return target


def _images(array: np.ndarray, spec: IdxSpec) -> torch.Tensor:
    x = torch.from_numpy(array).unsqueeze(1).float()
    return x.div_(255.0).sub_(spec.mean).div_(spec.std)


def _labels(array: np.ndarray, spec: IdxSpec, path: Path) -> torch.Tensor:
    if array.size and int(array.max()) >= spec.num_classes:
        raise DataError(f"{path} holds label {int(array.max())}, expected < {spec.num_classes}")
    return torch.from_numpy(array.astype(np.int64))


def _cache_path(path: Path) -> Path:
    """Where the decoded array of IDX file `path` is cached, keyed by its path, size and mtime."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("FEDFORGE_CACHE") or Path.home() / ".cache" / "fedforge")
    return root / "decoded" / f"{path.name}.{key}.npy"


def read_idx_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """`read_idx`, with the decoded array kept as .npy so that later loads skip gunzip.

    A cache that cannot be read or written is ignored: the IDX file is the truth.
    """
    cache = _cache_path(path)
    try:
        array = np.load(cache, allow_pickle=False)
        if array.shape == tuple(shape) and array.dtype == np.uint8:
            return array
    except (OSError, ValueError):
        pass
    array = read_idx(path, shape)
    try:
        with atomic_write(cache, "wb") as f:
            np.save(f, array, allow_pickle=False)
    except OSError:
        pass
    return array


def load_idx_dataset(spec: IdxSpec, directory: str | os.PathLike) -> Dataset:
    """Read and check the four IDX files of `spec` from `directory`."""
    directory = Path(directory)
    arrays = {}
    for part, (filename, _) in spec.files.items():
        arrays[part] = read_idx_cached(directory / filename, spec.shape(part))
    path = directory / spec.files["train_labels"][0]
    return Dataset(
        name=spec.name,
        train=TensorData(_images(arrays["train_images"], spec), _labels(arrays["train_labels"], spec, path)),
        test=TensorData(_images(arrays["test_images"], spec), _labels(arrays["test_labels"], spec, path)),
        num_classes=spec.num_classes,
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool = True,
) -> Dataset:
    """Load dataset `name` ("mnist" or "fashion-mnist") into memory, normalized as the tutorial.

    Images become float32 tensors of shape (N, 1, 28, 28) scaled to [-1, 1]; labels int64.

    Raises:
        ConfigError: unknown name.
        DataError: not found and not downloadable, or a file is corrupt.
    """
    spec = _spec(name)
    return load_idx_dataset(spec, locate(spec, data_dir, download_missing=download, progress=progress))


def dataset_names() -> Sequence[str]:
    return tuple(DATASETS)
