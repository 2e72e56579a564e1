"""Device profiles: each client's compute speed, bandwidths and availability, for the virtual clock.

A client's profile is its speed (relative steps per second: 1 is the base device, 2 twice as
fast), its uplink and downlink bandwidth (bytes per second) and its availability (always, or
windows of virtual seconds in which it is online). Profiles are drawn once per run from the
run's seed (`DEVICES` streams, one per quantity) or read from a CSV trace:

    client,speed,up,down,availability
    0,1.5,1000000,8000000,
    1,0.2,250000,2000000,0-3600 7200-10800

One row per client (ids 0..num_clients-1, each once, in any order); speed, up and down finite
numbers > 0; availability empty (always online) or windows `start-end` in virtual seconds
separated by spaces, ascending and not overlapping (after its last window a client is offline
for good). At most `MAX_TRACE_ROWS` rows, `MAX_WINDOWS` windows a client, `MAX_TRACE_BYTES`
bytes: a trace is read as hostile, and any fault is one line naming the file and its line.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from . import _seeding
from ._options import option
from .errors import ConfigError

MAX_TRACE_BYTES = 64 * 2**20
MAX_TRACE_ROWS = 1_000_000
MAX_WINDOWS = 10_000
TRACE_COLUMNS = ("client", "speed", "up", "down", "availability")
LATE_CLIENTS = ("drop", "partial")

# Sub-streams of _seeding.DEVICES: never renumber.
_SPEED, _UP, _DOWN, _PHASE = 0, 1, 2, 3


@dataclass(frozen=True)
class Distribution:
    """A positive quantity across clients: `fixed` (every client `median`) or `lognormal` (median
    `median`, log-space standard deviation `sigma`: a heavy right tail for sigma of 1 and more)."""

    kind: str
    median: float
    sigma: float = 0.0

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.median, dtype=np.float64)
        return self.median * np.exp(self.sigma * rng.standard_normal(n))


def parse_distribution(text: str, name: str, *, median: float) -> Distribution:
    """ "fixed:2e6", "fixed" (the default `median`), "lognormal:sigma=1.0" or
    "lognormal:median=1e6,sigma=0.5"; a one-line ConfigError naming the setting otherwise."""
    kind, _, rest = text.strip().partition(":")
    usage = f"{name} must look like fixed:VALUE or lognormal:sigma=S[,median=M], got {text!r}"
    if kind == "fixed":
        value = _positive(rest, name) if rest else median
        return Distribution("fixed", value)
    if kind != "lognormal":
        raise ConfigError(usage)
    params: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, eq, text_value = item.partition("=")
        if not eq or key.strip() not in ("sigma", "median") or key.strip() in params:
            raise ConfigError(usage)
        params[key.strip()] = _number(text_value, f"{name}'s {key.strip()}")
    if "sigma" not in params or not 0 <= params["sigma"] <= 10:
        raise ConfigError(f"{name}: lognormal needs sigma in [0, 10], got {text!r}")
    if params.get("median", median) <= 0:
        raise ConfigError(f"{name}: lognormal's median must be > 0, got {text!r}")
    return Distribution("lognormal", params.get("median", median), params["sigma"])


@dataclass(frozen=True)
class Periodic:
    """Each client online for `online` (a fraction) of every `period` virtual seconds, from a phase
    drawn uniformly in [0, period) for each client."""

    period: float
    online: float


def parse_availability(text: str) -> Periodic | None:
    """ "always" -> None; "periodic:period=3600,online=0.5" -> Periodic."""
    if text.strip() == "always":
        return None
    match = re.fullmatch(r"periodic:period=([^,]+),online=([^,]+)", text.strip())
    if not match:
        raise ConfigError(f"device_availability must be always or periodic:period=S,online=F, got {text!r}")
    period = _positive(match.group(1), "device_availability's period")
    online = _number(match.group(2), "device_availability's online")
    if not 0 < online <= 1:
        raise ConfigError(f"device_availability's online is a fraction in (0, 1], got {online}")
    return Periodic(period, online)


@dataclass(frozen=True)
class DeviceProfiles:
    """Every client's device: `speed` (relative steps per second), `up` and `down` (bytes per
    second), and `windows` (each client's online windows, ascending (start, end) pairs, None for
    always online), which repeat every `period` virtual seconds when it is set."""

    speed: np.ndarray
    up: np.ndarray
    down: np.ndarray
    windows: tuple[tuple[tuple[float, float], ...] | None, ...]
    period: float | None = None

    @property
    def num_clients(self) -> int:
        return len(self.speed)

    @property
    def always(self) -> bool:
        """Whether every client is always online."""
        return all(w is None for w in self.windows)

    def online_until(self, client: int, t: float) -> float | None:
        """When the window client `client` is in at virtual time `t` ends (inf: always online);
        None when it is offline at `t`."""
        windows = self.windows[client]
        if windows is None:
            return math.inf
        base, local = 0.0, t
        if self.period is not None:
            base = math.floor(t / self.period) * self.period
            local = t - base
        i = bisect.bisect_right(windows, local, key=lambda w: w[0]) - 1
        if i < 0 or local >= windows[i][1]:
            return None
        end = windows[i][1]
        # A window that reaches the end of a period goes on in the next one's first, from 0.
        if self.period is not None and end >= self.period and windows[0][0] == 0:
            end = self.period + windows[0][1]
        return base + end

    def next_online(self, client: int, t: float) -> float:
        """The first virtual time at or after `t` at which the client is online (inf: never again)."""
        if self.online_until(client, t) is not None:
            return t
        windows = self.windows[client]
        assert windows is not None, "an always-online client is online"
        base, local = 0.0, t
        if self.period is not None:
            base = math.floor(t / self.period) * self.period
            local = t - base
        i = bisect.bisect_right(windows, local, key=lambda w: w[0])
        if i < len(windows):
            return base + windows[i][0]
        return base + self.period + windows[0][0] if self.period is not None and windows else math.inf


def draw_profiles(
    num_clients: int,
    seed: int,
    *,
    speed: Distribution,
    up: Distribution,
    down: Distribution,
    availability: Periodic | None = None,
) -> DeviceProfiles:
    """The clients' devices drawn from the run's seed, each quantity from a stream of its own
    (so that changing the bandwidths leaves the speeds as they were)."""

    def drawn(distribution: Distribution, stream: int) -> np.ndarray:
        return distribution.draw(num_clients, _seeding.numpy_rng(seed, _seeding.DEVICES, stream))

    windows: list[tuple[tuple[float, float], ...] | None] = [None] * num_clients
    period = None
    if availability is not None and availability.online < 1:
        period, length = availability.period, availability.online * availability.period
        phases = _seeding.numpy_rng(seed, _seeding.DEVICES, _PHASE).uniform(0, period, num_clients)
        for c, start in enumerate(phases.tolist()):
            end = start + length
            windows[c] = ((start, end),) if end <= period else ((0.0, end - period), (start, period))
    return DeviceProfiles(drawn(speed, _SPEED), drawn(up, _UP), drawn(down, _DOWN), tuple(windows), period)


def read_trace(path: str | os.PathLike, num_clients: int) -> DeviceProfiles:
    """Every client's device from the CSV trace at `path` (the format is the module's docstring's),
    checked: one line naming the file and line for the first fault."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TRACE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"device trace {path}: {e.strerror or e}") from None
    if len(raw) > MAX_TRACE_BYTES:
        raise ConfigError(f"device trace {path}: larger than {MAX_TRACE_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")  # a spreadsheet's "CSV UTF-8" starts with a byte order mark
    except UnicodeDecodeError:
        raise ConfigError(f"device trace {path}: not UTF-8 text") from None
    rows = csv.reader(io.StringIO(text), strict=True)
    try:
        header = next(rows, None)
    except csv.Error as e:
        raise ConfigError(f"device trace {path}:1: {e}") from None
    if header is None or tuple(h.strip() for h in header) != TRACE_COLUMNS:
        raise ConfigError(f"device trace {path}:1: the header must be {','.join(TRACE_COLUMNS)}")
    values = np.zeros((3, num_clients))
    windows: list[tuple[tuple[float, float], ...] | None] = [None] * num_clients
    seen = np.zeros(num_clients, dtype=bool)
    try:
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if line - 1 > MAX_TRACE_ROWS:
                raise ConfigError(f"device trace {path}: more than {MAX_TRACE_ROWS} rows")
            where = f"device trace {path}:{line}"
            if len(row) != len(TRACE_COLUMNS):
                raise ConfigError(f"{where}: {len(row)} fields, expected {len(TRACE_COLUMNS)}")
            client = _client_id(row[0], num_clients, where)
            if seen[client]:
                raise ConfigError(f"{where}: client {client} is given twice")
            seen[client] = True
            for i, name in enumerate(("speed", "up", "down")):
                values[i, client] = _positive(row[1 + i], f"{where}: {name}")
            windows[client] = _windows(row[4], where)
    except csv.Error as e:
        raise ConfigError(f"device trace {path}: {e}") from None
    if not seen.all():
        raise ConfigError(f"device trace {path}: no row for client {int(np.flatnonzero(~seen)[0])} (of {num_clients})")
    return DeviceProfiles(values[0], values[1], values[2], tuple(windows))


def _client_id(text: str, num_clients: int, where: str) -> int:
    if not re.fullmatch(r"\s*\d{1,12}\s*", text):
        raise ConfigError(f"{where}: client must be an id like 3, got {text[:40]!r}")
    client = int(text)
    if client >= num_clients:
        raise ConfigError(f"{where}: unknown client {client} (the run has clients 0..{num_clients - 1})")
    return client


def _windows(text: str, where: str) -> tuple[tuple[float, float], ...] | None:
    """ "0-3600 7200-10800" -> ((0, 3600), (7200, 10800)); "" -> None (always online)."""
    items = text.split()
    if not items:
        return None
    if len(items) > MAX_WINDOWS:
        raise ConfigError(f"{where}: more than {MAX_WINDOWS} availability windows")
    windows = []
    end = -math.inf
    for item in items:
        a, dash, b = item.partition("-")
        if not dash:
            raise ConfigError(f"{where}: an availability window must look like 0-3600, got {item[:40]!r}")
        start, stop = _number(a, f"{where}: window start"), _number(b, f"{where}: window end")
        if start < 0 or stop <= start or start < end:
            raise ConfigError(f"{where}: windows must be ascending, not overlapping and not empty, got {item[:40]!r}")
        windows.append((start, stop))
        end = stop
    return tuple(windows)


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {text.strip()[:40]!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {text.strip()[:40]!r}")
    return value


def _positive(text: str, name: str) -> float:
    value = _number(text, name)
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    return value


@dataclass(frozen=True)
class DeviceSettings:
    """The clients' devices and the virtual clock's rounds (TOML: flat keys or the table [devices]).
    No profiles (neither device_speeds nor device_trace): no clock, and the run is as without them."""

    device_speeds: str | None = option(
        None,
        "each client's compute speed (relative steps per second), drawn with the seed: fixed:1, or "
        "lognormal:sigma=1.0 (median 1); turns the virtual clock on",
        metavar="DIST",
    )
    device_uplink: str = option("fixed:1e6", "each client's uplink in bytes/s: fixed:B or lognormal:median=B,sigma=S")
    device_downlink: str = option(
        "fixed:4e6", "each client's downlink in bytes/s: fixed:B or lognormal:median=B,sigma=S"
    )
    device_availability: str = option(
        "always",
        "when clients are online: always, or periodic:period=S,online=F (online F of every S virtual "
        "seconds, from a random phase)",
    )
    device_trace: str | None = option(
        None,
        "each client's speed, bandwidths and availability from a CSV file (docs/time.md); turns the virtual clock on",
        metavar="PATH",
    )
    step_seconds: float = option(
        0.05, "virtual seconds of one local step on a device of speed 1 (fixed, so that virtual times are reproducible)"
    )
    round_deadline: float | None = option(
        None, "virtual seconds a round waits for its clients; later ones are late (late_clients)", metavar="S"
    )
    late_clients: str = option(
        "drop",
        "what a client that would miss the deadline does: drop (sends nothing) or partial (the steps it "
        "finished by the deadline)",
        LATE_CLIENTS,
    )
    over_select: float = option(
        0.0,
        "select ceil(k x (1 + X)) clients a round and keep the first k to finish (Bonawitz et al. 2019)",
        metavar="X",
    )

    def __post_init__(self):
        self.check_devices()

    def check_devices(self) -> None:
        """One-line ConfigErrors for values the clock cannot use (the trace is read with the data)."""
        if self.device_speeds is not None and self.device_trace is not None:
            raise ConfigError("give device_speeds or device_trace, not both")
        if self.device_speeds is not None:
            parse_distribution(self.device_speeds, "device_speeds", median=1.0)
        parse_distribution(self.device_uplink, "device_uplink", median=1e6)
        parse_distribution(self.device_downlink, "device_downlink", median=4e6)
        parse_availability(self.device_availability)
        if self.late_clients not in LATE_CLIENTS:
            raise ConfigError(f"unknown late_clients {self.late_clients!r} (choose from: {', '.join(LATE_CLIENTS)})")
        if not (math.isfinite(self.step_seconds) and self.step_seconds > 0):
            raise ConfigError(f"step_seconds must be a finite number > 0, got {self.step_seconds}")
        if self.round_deadline is not None and not (math.isfinite(self.round_deadline) and self.round_deadline > 0):
            raise ConfigError(f"round_deadline must be a finite number > 0, got {self.round_deadline}")
        if not 0 <= self.over_select <= 10:
            raise ConfigError(f"over_select must be in [0, 10], got {self.over_select}")
        if not self.profiled and (self.round_deadline is not None or self.over_select > 0):
            what = "round_deadline" if self.round_deadline is not None else "over_select"
            raise ConfigError(f"{what} needs device profiles: give device_speeds or device_trace")

    @property
    def profiled(self) -> bool:
        """Whether the run has device profiles, hence a virtual clock."""
        return self.device_speeds is not None or self.device_trace is not None

    def devices(self) -> Devices | None:
        """How the clock runs, for `simulate(devices=)`; None without profiles."""
        if not self.profiled:
            return None
        return Devices(
            speeds=self.device_speeds,
            uplink=self.device_uplink,
            downlink=self.device_downlink,
            availability=self.device_availability,
            trace=self.device_trace,
            step_seconds=self.step_seconds,
            deadline=self.round_deadline,
            late=self.late_clients,
            over_select=self.over_select,
        )


@dataclass(frozen=True)
class Devices:
    """The clients' devices and how a synchronous round treats time, for `simulate(devices=)`:
    profiles drawn (`speeds`, `uplink`, `downlink`, `availability`) or read (`trace`), the virtual
    seconds of a step at speed 1 (`step_seconds`), a round `deadline` in virtual seconds and what
    `late` clients do (drop, partial), and `over_select` (select ceil(k(1+x)), keep the first k)."""

    speeds: str | None = "fixed:1"
    uplink: str = "fixed:1e6"
    downlink: str = "fixed:4e6"
    availability: str = "always"
    trace: str | os.PathLike | None = None
    step_seconds: float = 0.05
    deadline: float | None = None
    late: str = "drop"
    over_select: float = 0.0

    def __post_init__(self):
        DeviceSettings(
            device_speeds=None if self.trace is not None else self.speeds or "fixed:1",
            device_uplink=self.uplink,
            device_downlink=self.downlink,
            device_availability=self.availability,
            device_trace=None if self.trace is None else str(self.trace),
            step_seconds=self.step_seconds,
            round_deadline=self.deadline,
            late_clients=self.late,
            over_select=self.over_select,
        )  # checks them

    def profiles(self, num_clients: int, seed: int) -> DeviceProfiles:
        """Every client's device: read from the trace, or drawn from the seed."""
        if self.trace is not None:
            return read_trace(self.trace, num_clients)
        return draw_profiles(
            num_clients,
            seed,
            speed=parse_distribution(self.speeds or "fixed:1", "device_speeds", median=1.0),
            up=parse_distribution(self.uplink, "device_uplink", median=1e6),
            down=parse_distribution(self.downlink, "device_downlink", median=4e6),
            availability=parse_availability(self.availability),
        )


__all__ = [
    "LATE_CLIENTS",
    "TRACE_COLUMNS",
    "DeviceProfiles",
    "DeviceSettings",
    "Devices",
    "Distribution",
    "Periodic",
    "draw_profiles",
    "parse_availability",
    "parse_distribution",
    "read_trace",
]
