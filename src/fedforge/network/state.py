"""What a deployment client keeps between its rounds, on its own disk, so that it survives a restart.

A client whose algorithm keeps state (its personal entries, SCAFFOLD's control variate, Ditto's
copy: `algorithms.ClientState`) or whose task keeps its optimizer's state keeps two of them: the
*committed* states (those its last update that the server counted left, or its first) and the
*pending* ones (those its latest task left, tagged with that task's round), until the server says
whether that update counted. Each task says so ("counted": the last round in which the server
counted this client's update, as its round loop keeps it and its checkpoint holds it;
`settle`): the client commits the pending states when their round counted and drops them
otherwise (an update refused, late, or of a round that failed and was retried), then trains from
the committed ones, so that it keeps what the simulation keeps. The server's word on a finished
run (a "done" SHUTDOWN) settles the last task the same way. A word that disagrees with what the
client holds (the server counted a round older than the client's committed states: it resumed
from an older checkpoint; or one the client holds no state of: the client lost its state) is
refused with one line: the client keeps no history to go back to, and never trains from a state
that is not the simulation's.

With `fedforge client --state-dir` it writes both, after every task it trains and when the run
ends, atomically, to one file in its state folder (`client-ID.pt`), and reads them back when it
starts. The file is STATE_MAGIC, the SHA-256 of the rest, then torch.save's bytes of plain values:
the client's id, the run it trained in (the settings of the server's welcome), the algorithm it
trained with (`algorithms.describe`), the committed states and their round, and the pending states
and theirs (each a `ClientState.flat()` table and an optimizer table, as a checkpoint holds them).
A task sent again (after a reconnect) is settled as it was the first time: it drops the pending
states and starts from the committed ones again.

The file is read as hostile: at most a size bounded by the model's, loaded with
`torch.load(weights_only=True)` (tensors, numbers, strings and dicts only), and every table
checked as a checkpoint's are (`checkpoint.ClientLayout`: the names and shapes the model and the
algorithm make) once the first task names the algorithm. A file of another client, another run's
settings or another algorithm, or of an older fedforge's format, is refused too: one ConfigError
line (the client exits with status 2; moving the file away starts the client afresh).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from ..algorithms import ClientState, nbytes
from ..checkpoint import MAX_SLOTS, ClientLayout, _check_kept, _kept, _optimizer_table
from ..contract import ClientConfig, OptimizerState
from ..errors import ConfigError
from ..simulation import Kept
from .welcome import MAX_ROUNDS

STATE_MAGIC = b"fedforge client state 2\n"
OLD_MAGICS = (b"fedforge client state 1\n",)


def state_path(state_dir: str | Path, client_id: int) -> Path:
    """The file that client `client_id` keeps its state in, in `state_dir`."""
    return Path(state_dir) / f"client-{client_id}.pt"


@dataclass(frozen=True)
class ClientKept:
    """One client's states: its optimizer's (when its task keeps it) and its algorithm's."""

    optimizer: OptimizerState | None = None
    client: ClientState | None = None


@dataclass(frozen=True)
class SavedState:
    """A client's states: the run it trained in (its welcome's settings, as JSON), the algorithm it
    trained with (its description), the committed states and the round whose update left them
    (0: none counted yet), and the pending ones and the round of the task that left them (None,
    0: none pending)."""

    run: str
    algorithm: dict
    counted: int
    committed: ClientKept
    round: int = 0
    pending: ClientKept | None = None


class Disagrees(Exception):
    """The server's word on which update counted disagrees with what this client holds (the reason)."""


def settle(saved: SavedState, counted: int) -> SavedState:
    """`saved` once the server says that this client's update last counted in round `counted`:
    its pending states committed when theirs is that round, dropped when its committed states' is;
    Disagrees otherwise."""
    if saved.pending is not None and counted == saved.round:
        return dataclasses.replace(saved, counted=counted, committed=saved.pending, round=0, pending=None)
    if counted == saved.counted:
        return dataclasses.replace(saved, round=0, pending=None)
    if counted < saved.counted:
        raise Disagrees(
            f"the server counts this client's updates up to round {counted}, but this client has committed its "
            f"update of round {saved.counted} (was the server resumed from an older checkpoint?)"
        )
    raise Disagrees(
        f"the server counted this client's update of round {counted}, and this client holds no state of it (its "
        f"latest is of round {saved.counted}{f', pending of round {saved.round}' if saved.pending else ''}): "
        "it lost its state, or keeps it in another --state-dir"
    )


def _tables(kept: ClientKept) -> dict[str, Any]:
    return {
        "client_state": {k: v.cpu() for k, v in kept.client.flat().items()} if kept.client is not None else None,
        "optimizer_state": (
            {k: v.cpu() for k, v in _optimizer_table(kept.optimizer).items()} if kept.optimizer is not None else None
        ),
    }


def write_state(path: Path, client_id: int, saved: SavedState) -> None:
    """Write `saved` to `path`, atomically (the old file or the new one, never half of one)."""
    buffer = io.BytesIO()
    torch.save(
        {
            "client": client_id,
            "run": saved.run,
            "algorithm": saved.algorithm,
            "counted": saved.counted,
            "committed": _tables(saved.committed),
            "round": saved.round,
            "pending": _tables(saved.pending) if saved.pending is not None else None,
        },
        buffer,
    )
    payload = buffer.getbuffer()
    with atomic_write(path, "wb") as f:
        f.write(STATE_MAGIC + hashlib.sha256(payload).digest())
        f.write(payload)


def _most_bytes(model: nn.Module) -> int:
    """The largest state file a client of `model` writes: twice (its committed states and its
    pending ones) its personal entries, a personal copy, its algorithm's state
    (at most the model's size) and an optimizer's slots, and room for the rest."""
    size = nbytes(model.state_dict())
    return 2 * (3 + MAX_SLOTS + 1) * size + (1 << 20)


def _read_kept(tables: Any) -> ClientKept:
    if not isinstance(tables, dict) or set(tables) != {"client_state", "optimizer_state"}:
        raise TypeError("not a client's tables")
    client, optimizer = tables["client_state"], tables["optimizer_state"]
    kept = _kept({0: client} if client is not None else {}, {0: optimizer} if optimizer is not None else {})
    return ClientKept(kept.optimizer_states.get(0), kept.client_states.get(0))


def read_state(path: Path, client_id: int, model: nn.Module) -> SavedState | None:
    """The state client `client_id` saved in `path` (None: no file, a first start); ConfigError (one
    line) when the file is too large, damaged, not ours or another client's. Its tables are
    checked against the model and algorithm by `check_state` once a task names the algorithm."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read this client's state {path}: {e.strerror}") from None
    if size > (most := _most_bytes(model)):
        raise ConfigError(f"this client's state {path} holds {size} bytes, more than its model's state can ({most})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read this client's state {path}: {e.strerror}") from None
    start = len(STATE_MAGIC) + 32
    if data.startswith(OLD_MAGICS):
        raise ConfigError(
            f"this client's state {path} was written by an older fedforge, which did not keep what the server "
            "counted; move it away to start this client afresh"
        )
    if not data.startswith(STATE_MAGIC) or not hmac.compare_digest(
        hashlib.sha256(memoryview(data)[start:]).digest(), data[len(STATE_MAGIC) : start]
    ):
        raise ConfigError(
            f"this client's state {path} is damaged or not a fedforge client's state ({len(data)} bytes that "
            "fail their checksum); move it away to start this client afresh"
        )
    try:
        saved = torch.load(io.BytesIO(memoryview(data)[start:]), map_location="cpu", weights_only=True)
        keys = {"client", "run", "algorithm", "counted", "committed", "round", "pending"}
        if not isinstance(saved, dict) or set(saved) != keys:
            raise TypeError("not a client's state")
        if saved["client"] != client_id:
            raise ConfigError(f"it is client {str(saved['client'])[:20]}'s, not this client's ({client_id})")
        if not isinstance(saved["algorithm"], dict) or type(saved["run"]) is not str:
            raise TypeError("run, algorithm")
        counted, round_, pending = saved["counted"], saved["round"], saved["pending"]
        if not (type(counted) is int and type(round_) is int and 0 <= counted <= MAX_ROUNDS and round_ <= MAX_ROUNDS):
            raise TypeError("rounds")
        if (pending is None) != (round_ == 0) or (pending is not None and round_ <= counted):
            raise TypeError("a pending state's round")
        return SavedState(
            saved["run"],
            saved["algorithm"],
            counted,
            _read_kept(saved["committed"]),
            round_,
            _read_kept(pending) if pending is not None else None,
        )
    except ConfigError as e:
        raise ConfigError(f"this client's state {path}: {e}") from None
    except Exception as e:
        raise ConfigError(f"this client's state {path} cannot be read ({type(e).__name__})") from None


def check_state(
    saved: SavedState, path: Path, model: nn.Module, config: ClientConfig, run: str, algorithm: dict
) -> None:
    """ConfigError (one line) unless `saved` was kept in this run (`run`) by its algorithm
    (`algorithm`, its description) and each of its tables is named and shaped as `model` and
    `config` make them."""
    if saved.run != run:
        raise ConfigError(
            f"this client's state {path} was kept in a run of other settings than the server's now; move it "
            "away to start this client afresh"
        )
    if saved.algorithm != algorithm:
        raise ConfigError(
            f"this client's state {path} was kept by algorithm {str(saved.algorithm)[:200]}, and the server "
            f"now asks for {str(algorithm)[:200]}; move it away to start this client afresh"
        )
    layout = ClientLayout.of(model, config)
    for kept in (saved.committed, *([saved.pending] if saved.pending is not None else [])):
        try:
            _check_kept(
                Kept(
                    {0: kept.optimizer} if kept.optimizer is not None else {},
                    {0: kept.client} if kept.client is not None else {},
                ),
                layout,
                1,
            )
        except ConfigError as e:
            raise ConfigError(f"this client's state {path} does not fit this run: {e}") from None


__all__ = ["ClientKept", "Disagrees", "SavedState", "check_state", "read_state", "settle", "state_path", "write_state"]
