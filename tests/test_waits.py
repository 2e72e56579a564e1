"""The tests' waits (tests/helpers.py): they end on the event, and a lost event fails saying what was
awaited, with the tail of the process's log."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TIMEOUT_SCALE, bound, wait_exit, wait_for, wait_for_line

HERE = Path(__file__).parent


def start(tmp_path, code: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "proc.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def test_a_line_is_awaited_until_it_is_written(tmp_path):
    proc, log = start(tmp_path, "import time\nprint('starting')\ntime.sleep(0.5)\nprint('listening on port 4321')")
    try:
        assert wait_for_line(log, r"listening on port (\d+)", proc=proc).group(1) == "4321"
        assert wait_exit(proc, log=log) == 0
    finally:
        proc.kill()


def test_a_process_that_exits_without_the_line_fails_at_once_with_its_log(tmp_path):
    proc, log = start(tmp_path, "print('fedforge: error: no such thing')\nraise SystemExit(2)")
    started = time.monotonic()
    with pytest.raises(
        AssertionError,
        match=r"(?s)exited \(2\) before it logged 'listening'.*"
        r"fedforge: error: no such thing",
    ):
        wait_for_line(log, "listening", proc=proc)
    assert time.monotonic() - started < bound(120)  # not the whole PROCESS_S bound: the exit is the event


def test_a_process_past_its_bound_fails_with_the_tail_of_its_log(tmp_path):
    proc, log = start(tmp_path, "import time\nprint('round 1 of 3')\ntime.sleep(3600)")
    try:
        wait_for_line(log, "round 1", proc=proc)
        with pytest.raises(
            AssertionError,
            match=r"(?s)waited [\d.]+ s for proc\.log to exit; it still runs.*"
            r"round 1 of 3",
        ):
            wait_exit(proc, 0.2, log)
    finally:
        proc.kill()
        proc.wait()


def test_a_predicate_is_polled_until_true_and_its_value_returned():
    calls = []
    assert (
        wait_for(lambda: calls.append(1) or (len(calls) if len(calls) >= 3 else 0), 60, "three calls", interval=0.01)
        == 3
    )
    with pytest.raises(AssertionError, match=r"^waited [\d.]+ s for something that never happens$"):
        wait_for(lambda: False, 0.1, "something that never happens", interval=0.01)


def fresh_helpers(monkeypatch, scale: str):
    """tests/helpers.py imported anew with FEDFORGE_TEST_TIMEOUT_SCALE=`scale`."""
    monkeypatch.setenv("FEDFORGE_TEST_TIMEOUT_SCALE", scale)
    spec = importlib.util.spec_from_file_location("helpers_with_scale", HERE / "helpers.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # where its dataclass looks itself up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("value", ["0", "-1", "nan", "slow"])
def test_a_scale_that_is_not_a_positive_number_is_refused(monkeypatch, value):
    with pytest.raises(pytest.UsageError, match=f"^FEDFORGE_TEST_TIMEOUT_SCALE must be a number > 0, got '{value}'$"):
        fresh_helpers(monkeypatch, value)


def test_the_scale_multiplies_every_bound(monkeypatch):
    assert fresh_helpers(monkeypatch, "2.5").bound(300) == 750
    assert bound(300) == 300 * TIMEOUT_SCALE
