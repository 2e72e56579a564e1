import os
import signal

import pytest

from fedforge._io import atomic_write


def test_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    with atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]


def test_ctrl_c_during_a_write_is_delivered_after_it(tmp_path):
    target = tmp_path / "f.txt"
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as f:
        os.kill(os.getpid(), signal.SIGINT)  # arrives mid-write
        f.write("complete")
    assert target.read_text() == "complete"
    assert os.listdir(tmp_path) == ["f.txt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
