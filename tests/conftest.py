from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from helpers import FileServer

from fedforge.data import load_dataset

# One torch thread here and in the processes the tests start (a fedforge process's --threads aside):
# the tests' models are small, and on a shared machine more threads only contend for the cores.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Ctrl-C as a terminal delivers it, here and in the processes the tests start, even when the suite
# was started in the background (where a shell without job control ignores SIGINT, which the
# tests of Ctrl-C would then never see).
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def decoded_cache(tmp_path_factory):
    """Keep the decoded-array cache of this test session out of the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def fashion():
    """The real Fashion-MNIST (Debian's dataset-fashion-mnist; `make test` installs it)."""
    return load_dataset("fashion-mnist", download=False, progress=False)


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    yield server
    server.close()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
