"""What a deployment client keeps between its rounds, on its own disk, so that it survives a restart.

A client whose algorithm keeps state (its personal entries, SCAFFOLD's control variate, Ditto's
copy: `algorithms.ClientState`) or whose task keeps its optimizer's state writes it after every
task it trains, atomically, to one file in its state folder (`fedforge client --state-dir`,
`client-ID.pt`), and reads it back when it starts. The file is STATE_MAGIC, the SHA-256 of the
rest, then torch.save's bytes of plain values: the client's id, the run it trained in (the
settings of the server's welcome), the algorithm it trained with (`algorithms.describe`), the id
of the task it last trained and the states it started that task from (a task sent again after a
reconnect starts where it did the first time), and the states it keeps now (each a
`ClientState.flat()` table and an optimizer table, as a checkpoint holds them).

The file is read as hostile: at most a size bounded by the model's, loaded with
`torch.load(weights_only=True)` (tensors, numbers, strings and dicts only), and every table
checked as a checkpoint's are (`checkpoint.ClientLayout`: the names and shapes the model and the
algorithm make) once the first task names the algorithm. A file of another client, another run's
settings or another algorithm is refused too: one ConfigError line (the client exits with status
2; moving the file away starts the client afresh).
"""

from __future__ import annotations

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

STATE_MAGIC = b"fedforge client state 1\n"


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
    """A client's state file: the run it trained in (its welcome's settings, as JSON), the algorithm
    it trained with (its description), the task it last trained and the states it started it from,
    and the states it keeps now."""

    run: str
    algorithm: dict
    task: int
    start: ClientKept
    now: ClientKept


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
            "task": saved.task,
            "start": _tables(saved.start),
            "now": _tables(saved.now),
        },
        buffer,
    )
    payload = buffer.getbuffer()
    with atomic_write(path, "wb") as f:
        f.write(STATE_MAGIC + hashlib.sha256(payload).digest())
        f.write(payload)


def _most_bytes(model: nn.Module) -> int:
    """The largest state file a client of `model` writes: twice (the states it started its last task
    from, and the ones it keeps now) its personal entries, a personal copy, its algorithm's state
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
    if not data.startswith(STATE_MAGIC) or not hmac.compare_digest(
        hashlib.sha256(memoryview(data)[start:]).digest(), data[len(STATE_MAGIC) : start]
    ):
        raise ConfigError(
            f"this client's state {path} is damaged or not a fedforge client's state ({len(data)} bytes that "
            "fail their checksum); move it away to start this client afresh"
        )
    try:
        saved = torch.load(io.BytesIO(memoryview(data)[start:]), map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or set(saved) != {"client", "run", "algorithm", "task", "start", "now"}:
            raise TypeError("not a client's state")
        if saved["client"] != client_id:
            raise ConfigError(f"it is client {str(saved['client'])[:20]}'s, not this client's ({client_id})")
        if type(saved["task"]) is not int or not isinstance(saved["algorithm"], dict) or type(saved["run"]) is not str:
            raise TypeError("task, run, algorithm")
        return SavedState(
            saved["run"], saved["algorithm"], saved["task"], _read_kept(saved["start"]), _read_kept(saved["now"])
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
    for kept in (saved.start, saved.now):
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


__all__ = ["ClientKept", "SavedState", "check_state", "read_state", "state_path", "write_state"]
