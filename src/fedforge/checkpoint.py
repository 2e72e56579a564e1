"""A run's checkpoint: written after every round, read back and checked whole before a resume.

The file is CHECKPOINT_MAGIC, the SHA-256 of the rest, then torch.save's bytes of plain values
(tensors, numbers, strings, dicts): the server state (weights, round, the strategy's own state
as a table of its fields under "extras" and its class's qualified name under "extras_kind", the
run's facts, the privacy stage's accountant and clip bound), what the clients keep between their
rounds ("client_states": each client's `ClientState.flat()` table by client id; "optimizer_states":
each client's optimizer state as one table, "step" and "SLOT/NAME", when the task keeps it; "counted":
the last round in which each client's update counted, which a deployment's server tells its clients), the
history so far, and the settings that define the run's result (`result_settings`), its identity.
A checkpoint without the clients' tables (written before they were kept) resumes with the clients
starting afresh. The typed states
(`strategies.state`, `privacy.PrivacyRunState`) are written as the same plain tables that format 2
held before they were typed, so every format-2 checkpoint reads alike (one without "extras_kind"
finds its state's kind by the table's field names).

`check_checkpoint` holds every value of a checkpoint against the run that is to continue from
it, before anything runs (before the server listens): its settings, round, history, weights'
names, shapes and types, the strategy's state, the run's facts, what each client keeps (one of
the run's clients, each table named and shaped as the model and algorithm make it, so that the
tables' count and size are bounded by the run's), and with differential privacy
the accountant (its rounds, sampling, noise, and the epsilon that the checkpoint's own history
and the run folder's history.json record as spent). A mismatch is one ConfigError line.

What it protects: a checkpoint damaged, copied from another run, or edited inconsistently with
the run folder. What it cannot: the SHA-256 has no key, so whoever can write the run folder can
forge a checkpoint, config.toml and history.json that agree with each other, unless the run is
given a key kept outside the folder (`--checkpoint-key-file`): then the checkpoint is signed
(HMAC-SHA256) and a forgery needs the key. A signed checkpoint of the same run from an earlier
round, with history.json put back to match, is still taken (docs/privacy.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._io import atomic_write
from .algorithms import PERSONAL, SHARED, ClientState
from .config import Config
from .contract import ClientConfig, OptimizerState, State
from .errors import ConfigError
from .history import NUMBERS, History
from .simulation import Kept
from .strategies import RunInfo, ServerState, StrategyState

if TYPE_CHECKING:
    from .privacy.run import PrivacyRunState

log = logging.getLogger("fedforge")

CHECKPOINT_MAGIC = b"fedforge checkpoint 2\n"
# The same, signed: an HMAC-SHA256 keyed by a secret kept outside the run folder instead of the SHA-256.
KEYED_MAGIC = b"fedforge checkpoint 2 hmac\n"
# Written before checkpoints carried their run's settings: read, checked against everything but those.
OLD_MAGIC = b"fedforge checkpoint 1\n"
MAGICS = (CHECKPOINT_MAGIC, KEYED_MAGIC, OLD_MAGIC)

# Settings that say where, how or how long a run executes, not what its rounds compute.
EXECUTION_KEYS = frozenset(
    {
        "name",
        "out_dir",
        "rounds",
        "engine",
        "max_memory",
        "device",
        "precision",  # bf16 is CUDA's: a run may go on where there is none, in float32, as a device may change
        "eval_batch_size",
        "quiet",
        "checkpoint_key_file",
        "trust_remote_code",
        "save_adapters",
        "data_dir",
        "download",
        "ray_address",
        "ray_workers",
        "ray_cpus_per_worker",
        "ray_gpus_per_worker",
        "ray_engine",
        "tensorboard",
        "mlflow",
    }
)
# At most this many slots in a kept optimizer state of a torch.optim optimizer (Adam keeps 2, or 3 with amsgrad).
MAX_SLOTS = 8


def result_settings(config: Config) -> dict[str, Any]:
    """The settings that define what a run's rounds compute (all but EXECUTION_KEYS): its identity."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(Config) if f.name not in EXECUTION_KEYS}


def setting_differences(saved: dict[str, Any], config: Config) -> list[str]:
    """'name saved there, value here' for each result-defining setting that differs."""
    mine = result_settings(config)
    # 1 and 1.0 clients per round differ: a count, and a fraction (all clients).
    return [
        f"{name} {saved.get(name)!r} there, {value!r} here"
        for name, value in mine.items()
        if name not in saved
        or saved[name] != value
        or (name == "clients_per_round" and type(saved[name]) is not type(value))
    ]


@dataclass(frozen=True)
class Checkpoint:
    state: ServerState
    history: History
    settings: dict[str, Any] | None  # None: written by an older fedforge (OLD_MAGIC)
    kept: Kept | None = None  # what the clients keep; None: written before checkpoints held it


def read_key(path: str | Path) -> bytes:
    """The checkpoint key in the file at `path` (--checkpoint-key-file): its bytes, at least 16."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"checkpoint key file {path}: {e.strerror}") from None
    if len(key) < 16:
        raise ConfigError(
            f"checkpoint key file {path} holds {len(key)} bytes; a key needs at least 16 "
            f"(e.g. python -c 'import secrets; print(secrets.token_hex(32))' > {path})"
        )
    return key


def _digest(payload, key: bytes | None) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest() if key is not None else hashlib.sha256(payload).digest()


def save_checkpoint(
    run_dir: Path,
    state: ServerState,
    history: History,
    config: Config,
    *,
    key: bytes | None = None,
    kept: Kept | None = None,
) -> None:
    """Everything needed to continue after `state.round` (`kept`: what the clients keep, if anything),
    atomically: CHECKPOINT_MAGIC, the SHA-256 of the rest, then torch.save's bytes; with `key`,
    KEYED_MAGIC and an HMAC-SHA256."""
    kept = kept if kept is not None else Kept()
    buffer = io.BytesIO()
    torch.save(
        {
            "params": {k: v.cpu() for k, v in state.params.items()},
            "round": state.round,
            "extras": state.strategy_state.to_dict() if state.strategy_state is not None else {},
            # Its class, so that a state of one's own with the same field names is not mistaken for it.
            "extras_kind": state.strategy_state.kind() if state.strategy_state is not None else None,
            "run": dataclasses.asdict(state.run) if state.run else None,
            "privacy": state.privacy.to_dict() if state.privacy is not None else None,
            "client_states": {c: _cpu(kept_state.flat()) for c, kept_state in kept.client_states.items()},
            "optimizer_states": {c: _cpu(_optimizer_table(o)) for c, o in kept.optimizer_states.items()},
            "counted": dict(kept.counted),
            "history": history.to_json(),
            "settings": result_settings(config),
        },
        buffer,
    )
    payload = buffer.getbuffer()
    with atomic_write(run_dir / "checkpoint.pt", "wb") as f:
        f.write((KEYED_MAGIC if key is not None else CHECKPOINT_MAGIC) + _digest(payload, key))
        f.write(payload)


def load_checkpoint(run_dir: str | Path, device, *, key: bytes | None = None) -> Checkpoint:
    """The checkpoint in `run_dir`; ConfigError when the file is missing, damaged or not one of
    ours, and when it is signed (KEYED_MAGIC) unless by `key`, or unsigned although `key` is given."""
    path = Path(run_dir) / "checkpoint.pt"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"cannot resume: {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot resume: cannot read {path}: {e.strerror}") from None
    magic = next((m for m in MAGICS if data.startswith(m)), b"")
    start = len(magic) + 32
    if magic == KEYED_MAGIC and key is None:
        raise ConfigError(f"cannot resume: {path} is signed with a key: give its --checkpoint-key-file")
    if magic in (CHECKPOINT_MAGIC, OLD_MAGIC) and key is not None:
        raise ConfigError(
            f"cannot resume: {path} is not signed, and a checkpoint key was given: it was not written "
            f"with that key (replaced, or a run started without it)"
        )
    if (
        not magic
        or len(data) < start
        or not hmac.compare_digest(_digest(memoryview(data)[start:], key), data[len(magic) : start])
    ):
        if magic == KEYED_MAGIC:
            raise ConfigError(f"cannot resume: {path} fails its signature: written with another key, or edited")
        raise ConfigError(
            f"cannot resume: {path} is damaged ({len(data)} bytes that fail their checksum: truncated or overwritten)"
        )
    try:
        # Our own format: tensors, numbers, strings and dicts only (weights_only refuses anything else).
        saved = torch.load(io.BytesIO(memoryview(data)[start:]), map_location=device, weights_only=True)
        if (
            not isinstance(saved, dict)
            or not isinstance(saved["params"], dict)
            or not isinstance(saved["extras"], dict)
            or not isinstance(saved["history"], str)
        ):
            raise TypeError("not the checkpoint's layout")
        run = RunInfo(**saved["run"]) if saved.get("run") is not None else None
        state = ServerState(
            dict(saved["params"]),
            saved["round"],
            StrategyState.from_dict(saved["extras"], saved.get("extras_kind")),
            run,
            _privacy_state(saved.get("privacy")),
        )
        history = History.from_json(saved["history"])
        kept = _kept(saved["client_states"], saved["optimizer_states"]) if "client_states" in saved else None
        if kept is not None and "counted" in saved:  # written before it held them: none counted
            kept = dataclasses.replace(kept, counted=_counted(saved["counted"]))
        settings = saved["settings"] if magic != OLD_MAGIC else None
        if magic != OLD_MAGIC and not (
            isinstance(settings, dict) and all(isinstance(k, str) and _setting_value(v) for k, v in settings.items())
        ):
            raise TypeError("settings")
    except ConfigError as e:
        raise ConfigError(f"cannot resume: {path}: {e}") from None
    except Exception as e:
        raise ConfigError(f"cannot resume: {path} cannot be read ({type(e).__name__})") from None
    return Checkpoint(state, history, settings, kept)


def _cpu(table: State) -> State:
    return {k: v.cpu() for k, v in table.items()}


def _optimizer_table(state: OptimizerState) -> State:
    """An optimizer state as one table: "step", and each slot's tensors as "SLOT/NAME"."""
    return {"step": state.step, **{f"{slot}/{k}": v for slot, table in state.slots.items() for k, v in table.items()}}


def _optimizer_state(table: dict[str, torch.Tensor]) -> OptimizerState:
    slots: dict[str, State] = {}
    for key, value in table.items():
        if key != "step":
            slot, _, name = key.partition("/")
            if not slot or not name:
                raise ConfigError(f"optimizer state entry {key[:60]!r} is not step or SLOT/NAME")
            slots.setdefault(slot, {})[name] = value
    if "step" not in table:
        raise ConfigError("optimizer state has no step")
    return OptimizerState(table["step"], slots)


def _kept(client_states: Any, optimizer_states: Any) -> Kept:
    """What the clients keep, from a checkpoint's tables by client id (their layout checked by `_check_kept`)."""
    read = []
    for what, tables in (("client states", client_states), ("optimizer states", optimizer_states)):
        if not isinstance(tables, dict) or not all(
            type(c) is int and isinstance(t, dict) and all(isinstance(k, str) for k in t) for c, t in tables.items()
        ):
            raise ConfigError(f"its {what} are not tables of tensors by client id")
        read.append(tables)
    states, optimizers = {}, {}
    for c, table in read[0].items():
        if odd := [k for k in table if k.partition("/")[0] not in ClientState.PARTS or not k.partition("/")[2]]:
            raise ConfigError(f"its client {c}'s state holds {odd[0][:60]!r}, not personal/, algorithm/ or copy/ NAME")
        states[c] = ClientState.from_flat(table)
    for c, table in read[1].items():
        try:
            optimizers[c] = _optimizer_state(table)
        except ConfigError as e:
            raise ConfigError(f"its client {c}'s {e}") from None
    return Kept(optimizers, states)


def _counted(counted: Any) -> dict[int, int]:
    """The round each client's update last counted in, by client id (checked against the run by `_check_kept`)."""
    if not isinstance(counted, dict) or not all(type(c) is int and type(r) is int for c, r in counted.items()):
        raise ConfigError("its counted rounds are not rounds by client id")
    return counted


def _privacy_state(saved: Any) -> PrivacyRunState | None:
    if saved is None:
        return None
    from .privacy.run import PrivacyRunState  # dp-accounting is an optional extra: only with a privacy state

    return PrivacyRunState.from_dict(saved)


@dataclass(frozen=True)
class ClientLayout:
    """What each client of a run may keep, shaped as it is: its client state's tables (`state`: all
    the personal entries, its algorithm's state as `init_state` makes it, a personal copy of the
    entries it trains when its algorithm keeps one) and, when the task keeps its optimizer's state,
    the entries the optimizer's slots may cover (`optimizer`) and their names (`slots`; None: a
    torch.optim optimizer's, at most MAX_SLOTS)."""

    state: ClientState
    optimizer: State | None
    slots: frozenset[str] | None

    @classmethod
    def of(cls, model: nn.Module, client: ClientConfig) -> ClientLayout:
        """The layout of a run of `model` whose clients run `client` (its algorithm the run's:
        `strategies.client_algorithm`)."""
        algorithm = client.algorithm
        roles = algorithm.roles.assign(model)
        entries = {k: v.detach() for k, v in model.state_dict().items()}
        state = ClientState(
            {n: entries[n] for n in roles.personal},
            algorithm.init_state({n: entries[n] for n in roles.shared}),
            {n: entries[n] for n in roles.names(SHARED, PERSONAL)} if any(p.copy for p in algorithm.phases) else {},
        )
        rule = client.rule
        optimizer = entries if client.task.keep_optimizer_state else None
        return cls(state, optimizer, frozenset(rule.slots) if rule is not None else None)


def check_checkpoint(
    checkpoint: Checkpoint,
    run_dir: str | Path,
    config: Config,
    *,
    fresh: ServerState,
    clients_per_round: int,
    clients: ClientLayout,
) -> None:
    """Raise ConfigError (one line) unless `checkpoint` can continue the run of `config` in
    `run_dir`. `fresh` is the state that run starts from (strategy.init: the weights' names,
    shapes and types, the strategy state's layout, the run's facts); `clients` what its clients
    may keep."""
    path = Path(run_dir) / "checkpoint.pt"
    try:
        _check(checkpoint, Path(run_dir), config, fresh, clients_per_round, clients)
    except ConfigError as e:
        raise ConfigError(f"cannot resume: {path}: {e}") from None


def _check(
    checkpoint: Checkpoint, run_dir: Path, config: Config, fresh: ServerState, k: int, clients: ClientLayout
) -> None:
    state, records = checkpoint.state, checkpoint.history.records
    if checkpoint.settings is None:
        log.warning(
            "resuming from a checkpoint written by an older fedforge: it does not record its run's settings, "
            "so only config.toml's are compared"
        )
    elif differences := setting_differences(checkpoint.settings, config):
        raise ConfigError(f"it was written by a run with other settings ({'; '.join(differences)})")
    r = state.round
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ConfigError(f"its round {r!r} is not a round (an integer >= 0)")
    if r > config.rounds:
        raise ConfigError(f"it is at round {r}, past the run's {config.rounds} rounds (give --rounds {r} or more)")
    _check_history(records, r, fresh.run.num_clients if fresh.run else None)
    _check_state(state.params, fresh.params, "weights", exact=True)
    if state.run is not None and state.run != fresh.run:
        raise ConfigError(f"its run's facts {state.run} are not this run's {fresh.run}")
    _check_strategy_state(state.strategy_state, fresh, fresh.run.num_clients if fresh.run else 0)
    if checkpoint.kept is not None:
        _check_kept(checkpoint.kept, clients, fresh.run.num_clients if fresh.run else 0, r)
    elif r > 0 and (clients.optimizer is not None or clients.state.flat()):
        log.warning(
            "resuming from a checkpoint written before checkpoints held what the clients keep between their "
            "rounds: in simulation their optimizer and client states start afresh"
        )
    _check_privacy(state.privacy, r, records, config, fresh, k)
    _check_outputs(run_dir, checkpoint.history)


def _check_history(records, r: int, num_clients: int | None) -> None:
    rounds = [record.round for record in records]
    if rounds != list(range(r + 1)):
        shown = f"{rounds[:3]}...{rounds[-1:]}" if len(rounds) > 6 else rounds
        raise ConfigError(f"its history holds rounds {shown}, not 0 to its round {r}")
    for record in records:
        ids = (*record.clients, *record.dropped)
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < (num_clients or 2**63) for c in ids):
            raise ConfigError(f"its history's round {record.round} names clients that are not this run's")
        numbers = {name: getattr(record, name) for name in NUMBERS}
        if not isinstance(record.metrics, dict):
            raise ConfigError(f"its history's round {record.round} has metrics that are not a table")
        numbers.update(record.metrics)
        for name, value in numbers.items():
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ConfigError(f"its history's round {record.round} has {name} {value!r}, not a number")


def _check_tensor(value, like: torch.Tensor, where: str) -> None:
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        raise ConfigError(f"{where} is not a dense tensor")
    if value.shape != like.shape or value.dtype != like.dtype:
        raise ConfigError(
            f"{where} is {value.dtype} of shape {tuple(value.shape)}, this run's model has "
            f"{like.dtype} of shape {tuple(like.shape)}"
        )


def _check_state(
    saved, params: dict[str, torch.Tensor], where: str, *, exact: bool, names: frozenset[str] | None = None
) -> None:
    """`saved` holds tensors named and shaped as `params`' (all of them if `exact`, else those in `names`)."""
    if not isinstance(saved, dict) or not all(isinstance(name, str) for name in saved):
        raise ConfigError(f"its {where} are not a table of tensors")
    expected = set(params) if exact else set(names if names is not None else saved)
    if unknown := sorted(set(saved) - set(params)):
        raise ConfigError(
            f"its {where} hold {', '.join(unknown[:3])}, which this run's model does not have "
            f"(another model or dataset)"
        )
    if missing := sorted(expected - set(saved)):
        raise ConfigError(f"its {where} lack {', '.join(missing[:3])}")
    if extra := sorted(set(saved) - expected):
        raise ConfigError(f"its {where} hold {', '.join(extra[:3])}, which this run's strategy does not keep")
    for name, value in saved.items():
        _check_tensor(value, params[name], f"{name} in its {where}")


def _check_strategy_state(saved: StrategyState | None, fresh: ServerState, num_clients: int) -> None:
    """The strategy's state: of the kind its fresh state is (a strategy without state before round 1,
    like FedAvgM, may have one after), its tables of per-weight tensors or per-client tables of them
    named and shaped as the model's."""
    mine = fresh.strategy_state
    if mine is not None and type(saved) is not type(mine):
        found = type(saved).__name__ if saved is not None else "missing"
        raise ConfigError(f"its strategy state is {found}, this run's strategy keeps {type(mine).__name__}")
    extras = saved.to_dict() if saved is not None else {}
    like_extras = mine.to_dict() if mine is not None else {}
    for key, value in extras.items():
        like = like_extras.get(key)
        where = f"strategy state {key!r}"
        if isinstance(like, dict) and like:
            _check_state(value, fresh.params, where, exact=False, names=frozenset(like))
        elif isinstance(value, dict) and value and all(isinstance(c, int) and not isinstance(c, bool) for c in value):
            for c, state in value.items():  # per client (SCAFFOLD's controls)
                if not 0 <= c < num_clients:
                    raise ConfigError(f"its {where} names client {c}, not one of this run's {num_clients}")
                _check_state(state, fresh.params, f"{where}[{c}]", exact=False)
        elif isinstance(value, dict):
            _check_state(value, fresh.params, where, exact=False)
        elif value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ConfigError(f"its {where} is {type(value).__name__}, not what this run's strategy keeps")


def _check_kept(kept: Kept, like: ClientLayout, num_clients: int, r: int = 0) -> None:
    """What each client keeps: a client of the run's, its tables named and shaped as `like`'s (a
    personal copy only once it has one), so that they hold no more than the run's clients keep;
    the round each last counted in one of the `r` rounds run."""
    for c, counted in kept.counted.items():
        if not 0 <= c < num_clients:
            raise ConfigError(f"it counts an update of client {c}, not one of this run's {num_clients}")
        if not 1 <= counted <= r:
            raise ConfigError(f"it counts client {c}'s update in round {counted}, not one of its {r} rounds")
    for c, state in kept.client_states.items():
        if not 0 <= c < num_clients:
            raise ConfigError(f"it holds the state of client {c}, not one of this run's {num_clients}")
        for part in ClientState.PARTS:
            table, expected = getattr(state, part), getattr(like.state, part)
            if part != "copy" or table:
                _check_table(table, expected, f"its client {c}'s {part} state")
    if kept.optimizer_states and like.optimizer is None:
        raise ConfigError("it holds the clients' optimizer states, and this run's task keeps none")
    for c, optimizer in kept.optimizer_states.items():
        where = f"its client {c}'s optimizer state"
        if not 0 <= c < num_clients:
            raise ConfigError(f"it holds the optimizer state of client {c}, not one of this run's {num_clients}")
        step = optimizer.step
        if not (isinstance(step, torch.Tensor) and step.shape == () and step.dtype == torch.float64):
            raise ConfigError(f"{where} has a step that is not a float64 scalar")
        if not (math.isfinite(step.item()) and step.item() >= 0):
            raise ConfigError(f"{where} has step {step.item()}, not a count")
        if like.slots is not None and (unknown := sorted(set(optimizer.slots) - like.slots)):
            raise ConfigError(f"{where} has slot {unknown[0][:40]!r}, which this run's optimizer does not keep")
        if len(optimizer.slots) > MAX_SLOTS:
            raise ConfigError(f"{where} has {len(optimizer.slots)} slots, more than an optimizer keeps ({MAX_SLOTS})")
        assert like.optimizer is not None, "refused above"
        for slot, table in optimizer.slots.items():
            _check_table(table, like.optimizer, f"{where}'s slot {slot[:40]!r}", every=False)


def _check_table(table: State, like: State, where: str, *, every: bool = True) -> None:
    """`table` holds tensors named (all of them if `every`) and shaped as `like`'s, and nothing else."""
    if unknown := sorted(set(table) - set(like)):
        raise ConfigError(
            f"{where} holds {', '.join(n[:40] for n in unknown[:3])}, which this run's clients do not keep "
            f"(another model or algorithm)"
        )
    if every and (missing := sorted(set(like) - set(table))):
        raise ConfigError(f"{where} lacks {', '.join(missing[:3])}")
    for name, value in table.items():
        _check_tensor(value, like[name], f"{name} in {where}")


def _recorded(records, name: str) -> float | None:
    value = records[-1].metrics.get(name) if records else None
    return float(value) if isinstance(value, (int, float)) else None


def _check_privacy(saved: PrivacyRunState | None, r: int, records, config: Config, fresh: ServerState, k: int) -> None:
    """With differential privacy: the accountant continues the run's (its rounds, sampling and
    noise), and spends at least what the history records as spent."""
    privacy = config.privacy()
    if privacy is None:
        if saved is not None:
            raise ConfigError("it holds a privacy accountant, and this run has no differential privacy")
        return
    if saved is None:
        if r > 0:
            raise ConfigError(f"it holds no privacy accountant after {r} rounds of a run with differential privacy")
        return
    from .privacy.accountant import Accountant
    from .privacy.run import sampling_for

    accountant, clip = saved.accountant, saved.stage.clip
    if not math.isfinite(clip) or (not privacy.adaptive and clip != privacy.clip):
        raise ConfigError(f"its clip bound {clip} is not this run's ({privacy.clip})")
    if accountant.rounds != r:
        raise ConfigError(f"its privacy accountant counts {accountant.rounds} rounds spent, and it is at round {r}")
    assert fresh.run is not None, "a strategy's init records the run's facts"
    expected = Accountant(
        sampling_for(config.sampling, fresh.run.num_clients, k),
        accountant.noise_multiplier,
        privacy.accountant,
        local=privacy.mode == "local",
        rounds=r,
    )
    if expected.state() != accountant.state():
        raise ConfigError(f"its privacy accountant {accountant.state()} is not this run's {expected.state()}")
    z = privacy.noise_multiplier if privacy.noise_multiplier is not None else _recorded(records, "noise_multiplier")
    if z is not None and accountant.noise_multiplier != z:
        raise ConfigError(f"its privacy accountant has noise multiplier {accountant.noise_multiplier}, the run {z}")
    spent = accountant.epsilon(privacy.delta)
    recorded = _recorded(records, "epsilon")
    if recorded is not None and spent < recorded * (1 - 1e-9):
        raise ConfigError(
            f"its privacy accountant has spent epsilon {spent:.6g}, less than the {recorded:.6g} its "
            f"history records: resuming would lower the epsilon spent"
        )


def _setting_value(value: Any) -> bool:
    """Whether `value` is one a setting takes: a TOML scalar, None, or a tuple of strings (strategy_option)."""
    if type(value) is tuple:
        return all(type(v) is str for v in value)
    return value is None or type(value) in (bool, int, float, str)


def _check_outputs(run_dir: Path, history: History) -> None:
    """The run folder's history.json (when there is one) agrees with the checkpoint's history: same
    rounds as far as it goes, none past the checkpoint's (the checkpoint is written first)."""
    path = run_dir / "history.json"
    try:
        written = History.from_json(path.read_text())
    except FileNotFoundError:
        return
    except Exception as e:
        raise ConfigError(f"the run's {path.name} cannot be read ({type(e).__name__})") from None
    mine = history.records
    if len(written.records) > len(mine):
        last = written.records[-1]
        raise ConfigError(
            f"the run's history.json records {len(written.records) - 1} rounds, the checkpoint "
            f"{len(mine) - 1}: it is not the run's last checkpoint"
            + (
                f" (resuming would lower the epsilon spent, {last.metrics['epsilon']:.6g})"
                if isinstance(last.metrics.get("epsilon"), (int, float))
                else ""
            )
        )
    for ours, theirs in zip(mine, written.records, strict=False):  # history.json may be shorter
        if ours != theirs:
            raise ConfigError(
                f"its round {ours.round} differs from the run's history.json: it is another run's "
                f"checkpoint, or one of the two was edited"
            )


__all__ = [
    "CHECKPOINT_MAGIC",
    "EXECUTION_KEYS",
    "KEYED_MAGIC",
    "Checkpoint",
    "ClientLayout",
    "check_checkpoint",
    "load_checkpoint",
    "read_key",
    "result_settings",
    "save_checkpoint",
    "setting_differences",
]
