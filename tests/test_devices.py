"""Device profiles: their settings and the CSV trace, read as hostile."""

import numpy as np
import pytest

from fedforge import devices as devices_module
from fedforge.cli import main
from fedforge.config import Config
from fedforge.devices import read_trace
from fedforge.errors import ConfigError

HEADER = "client,speed,up,down,availability\n"


def trace(tmp_path, text, name="trace.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_trace_gives_each_client_its_device(tmp_path):
    path = trace(tmp_path, HEADER + "1,0.5,100,200,0-10 20-30.5\n0,2,1e6,4e6,\n")
    p = read_trace(path, 2)
    assert p.speed.tolist() == [2.0, 0.5] and p.up.tolist() == [1e6, 100.0] and p.down.tolist() == [4e6, 200.0]
    assert p.windows == (None, ((0.0, 10.0), (20.0, 30.5)))
    assert p.online_until(1, 25.0) == 30.5 and p.online_until(1, 15.0) is None and p.online_until(0, 1e9) > 1e9
    marked = tmp_path / "excel.csv"  # a spreadsheet's "CSV UTF-8": a byte order mark before the header
    marked.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_trace(marked, 2).windows == p.windows


@pytest.mark.parametrize(
    "rows, message",
    [
        ("0,1,1,1,\n1,1,1,1,\n2,1,1,1,\n", ":4: unknown client 2 (the run has clients 0..1)"),
        ("0,-1,1,1,\n1,1,1,1,\n", ":2: speed must be > 0, got -1.0"),
        ("0,0,1,1,\n1,1,1,1,\n", ":2: speed must be > 0, got 0.0"),
        ("0,nan,1,1,\n1,1,1,1,\n", ":2: speed must be finite, got 'nan'"),
        ("0,1,inf,1,\n1,1,1,1,\n", ":2: up must be finite, got 'inf'"),
        ("0,1,1,fast,\n1,1,1,1,\n", ":2: down must be a number, got 'fast'"),
        ("0,1,1,1,\n0,1,1,1,\n", ":3: client 0 is given twice"),
        ("0,1,1,1,\n", ": no row for client 1 (of 2)"),
        ("-1,1,1,1,\n", ":2: client must be an id like 3, got '-1'"),
        ("0,1,1,1\n", ":2: 4 fields, expected 5"),
        ("0,1,1,1,5-3\n1,1,1,1,\n", ":2: windows must be ascending, not overlapping and not empty, got '5-3'"),
        ("0,1,1,1,0-5 4-8\n1,1,1,1,\n", ":2: windows must be ascending, not overlapping and not empty, got '4-8'"),
        ("0,1,1,1,0..5\n1,1,1,1,\n", ":2: an availability window must look like 0-3600, got '0..5'"),
        ("0,1,1,1,0-nan\n1,1,1,1,\n", ":2: window end must be finite, got 'nan'"),
        ('0,1,1,1,"0-5\n', ": unexpected end of data"),
    ],
)
def test_a_bad_trace_is_one_line_naming_its_line(tmp_path, rows, message):
    path = trace(tmp_path, HEADER + rows)
    with pytest.raises(ConfigError) as error:
        read_trace(path, 2)
    assert str(error.value).startswith(f"device trace {path}")
    assert message in str(error.value) and "\n" not in str(error.value)


def refused(path, num_clients):
    """The one line read_trace refuses the file at `path` with."""
    with pytest.raises(ConfigError) as error:
        read_trace(path, num_clients)
    return str(error.value)


def test_a_trace_is_bounded(tmp_path, monkeypatch):
    assert "header must be" in refused(trace(tmp_path, "id,speed\n"), 1)
    assert "not UTF-8" in refused(_binary(tmp_path), 1)
    assert "No such file" in refused(tmp_path / "missing.csv", 1)
    monkeypatch.setattr(devices_module, "MAX_TRACE_ROWS", 2)
    rows = "".join(f"{c},1,1,1,\n" for c in range(3))
    assert "more than 2 rows" in refused(trace(tmp_path, HEADER + rows), 3)
    monkeypatch.setattr(devices_module, "MAX_WINDOWS", 2)
    assert "more than 2 availability windows" in refused(trace(tmp_path, HEADER + "0,1,1,1,0-1 2-3 4-5\n"), 1)
    monkeypatch.setattr(devices_module, "MAX_TRACE_BYTES", 10)
    assert "larger than 10 bytes" in refused(trace(tmp_path, HEADER), 1)


def _binary(tmp_path):
    path = tmp_path / "binary.csv"
    path.write_bytes(b"\xff\xfe" + HEADER.encode())
    return path


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"device_speeds": "gamma:2"}, "device_speeds must look like fixed:VALUE or lognormal:sigma=S[,median=M]"),
        ({"device_speeds": "lognormal:sigma=-1"}, "device_speeds: lognormal needs sigma in [0, 10]"),
        ({"device_speeds": "fixed:0"}, "device_speeds must be > 0, got 0.0"),
        ({"device_speeds": "fixed", "device_uplink": "fixed:inf"}, "device_uplink must be finite"),
        ({"device_speeds": "fixed", "device_availability": "sometimes"}, "device_availability must be always or"),
        (
            {"device_speeds": "fixed", "device_availability": "periodic:period=10,online=1.5"},
            "device_availability's online is a fraction in (0, 1], got 1.5",
        ),
        ({"device_speeds": "fixed", "round_deadline": 0.0}, "round_deadline must be a finite number > 0, got 0.0"),
        ({"device_speeds": "fixed", "step_seconds": float("nan")}, "step_seconds must be a finite number > 0"),
        (
            {"device_speeds": "fixed", "late_clients": "wait"},
            "unknown late_clients 'wait' (choose from: drop, partial)",
        ),
        ({"over_select": 0.3}, "over_select needs device profiles: give device_speeds or device_trace"),
        ({"round_deadline": 10.0}, "round_deadline needs device profiles"),
        ({"device_speeds": "fixed", "device_trace": "t.csv"}, "give device_speeds or device_trace, not both"),
        (
            {"device_speeds": "fixed", "over_select": 0.3, "sampling": "poisson"},
            "over_select needs sampling fixed and no differential privacy",
        ),
    ],
)
def test_bad_device_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        Config(**overrides)
    assert message in str(error.value)


def test_the_command_line_says_one_line_and_exits_2(tmp_path, capsys):
    path = trace(tmp_path, HEADER + "0,1,1,1,\n1,-3,1,1,\n")
    code = main(
        [
            *("run", "--dataset", "synthetic", "--num-clients", "2", "--clients-per-round", "2", "--model", "logreg"),
            *("--rounds", "1", "--device-trace", str(path), "--out-dir", str(tmp_path), "-q"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0
    assert f"device trace {path}:3: speed must be > 0, got -3.0" in err


def test_the_settings_come_from_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[devices]\ndevice_speeds = "lognormal:sigma=1.5"\nround_deadline = 30\nover_select = 0.3\n')
    config = Config.load(path)
    devices = config.devices()
    assert devices is not None and (devices.speeds, devices.deadline, devices.over_select) == (
        "lognormal:sigma=1.5",
        30.0,
        0.3,
    )
    assert Config().devices() is None
    np.testing.assert_array_equal(devices.profiles(5, 0).speed, devices.profiles(5, 0).speed)
