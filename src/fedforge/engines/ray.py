"""The Ray engine: the selected clients train on long-lived Ray actors, on one machine or a cluster.

Each worker (a Ray actor) loads the run's data itself, once, with the function it was given (the
CLI's: fedforge's own lookup of `--dataset`, so every node needs the files where that lookup finds
them), and keeps, for the whole run, the pool of the clients it trains: a fixed share of them
(consecutive ids, about 1/workers of the examples, and a tenth more from each neighbour's share,
so that a selected client there that keeps no state goes to whichever of its two workers has less
work that round: `holdings`, `assign`), rebuilt exactly as the round loop builds its pool
(`data.client_pool`: partition, layout, label_flip poisoning). The run's clients live
split across the workers, so a worker's memory shrinks as workers are added. Per round only this
travels: the global weights, put in the object store once and read by every worker (not the
frozen entries, e.g. a pretrained base under LoRA: the workers hold them with the model, sent once
and again only when its tensors were written); each selected client's task (its id, batch seed
and plan), to a worker that holds it; and the answers.

What the clients keep between their rounds (`keeps_client_state`: their client states and kept
optimizer states) lives on the workers: a client that keeps state trains on its home worker only
(the one whose share holds it), which keeps it, pending until the driver says the round counted
(`commit`), then committed, in memory and spilled to a file in the node's temporary folder. No
task carries a state and no update brings one back; the driver knows only which clients keep one,
gathers them all to write a checkpoint (`gather`) and hands a resumed run's back (`restore`).
A client's personal model is evaluated on its worker (`clients_evaluate`).

Each worker trains its selected clients with its in-process engine (auto, vectorized, sequential,
bounded by max_memory as in process) and answers with one `PartialSum` for the clients the round
loop lets it sum (`ClientTask.summable`: the strategy is a `LinearStrategy`) and with the own
update of every other client. Tensors
travel as NumPy arrays (`_sent`), which Ray's object store passes without pickling. `run` only
sends the work (`works_ahead`): the round loop begins the next round before it evaluates the last,
so the workers train while the driver evaluates.

Faults are Ray's: a worker that dies (its process killed, its node lost) is restarted by Ray
(`max_restarts`), reloads its data, and the work it was doing is run again (`max_task_retries`).
A worker's work is a pure function of what it is sent and its clients' committed states, which a
restarted worker reads back from its files, so the retry trains the same clients to the same
updates and the run equals an uninterrupted one. A worker restarted where its files are gone (its
node lost) says so in one line: the run continues with --resume. Answers are handed on in a fixed
order whichever worker finishes first (each worker's partial sum, then every other update in task
order): a run does not depend on timing, and equals the in-process engines' run to rounding.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..contract import ClientConfig, ClientPlan, ClientState, ClientUpdate, OptimizerState, State
from ..data.datasets import TensorData, leaves
from ..data.federated import FederatedData, client_pool
from ..errors import ConfigError, FedforgeError
from ..network.state import ClientKept, SavedState, check_state, read_state, write_state
from ..reductions import PartialSum, Update, combine_updates
from ..scenarios import Scenario, label_flipped
from .base import ClientTask, Engine
from .ray_options import check_options

log = logging.getLogger("fedforge")

INSTALL_HINT = "pip install 'fedforge[ray]'"
DEFAULT_MAX_RESTARTS = 3
CONNECT_TIMEOUT_S = 10.0
PLACEMENT_NOTICE_S = 60.0  # loading the data takes a while too: only then say what is awaited


def import_ray():
    """The `ray` module, or a one-line ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class _Job:
    """One client's task as it travels to a worker: no data, only where the worker finds it, and
    no state: `kept` says that the client keeps some (the worker has it), `evaluate` that it
    evaluates its personal model (in batches of that many)."""

    client_id: int
    start: int
    size: int
    seed: int
    plan: ClientPlan
    summable: bool
    kept: bool
    evaluate: int | None


def _mapped(value, leaf: Callable):
    """`value` (a plan, an optimizer state, a client's states, an update, a dict of tensors, or None) with
    `leaf` applied to each of its tensors (or NumPy arrays: a value as it travels, see `_sent`)."""
    if value is None:
        return None
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return leaf(value)
    if isinstance(value, dict):
        return {k: _mapped(v, leaf) for k, v in value.items()}
    if isinstance(value, ClientPlan):
        return value if value.inputs is None else replace(value, inputs=_mapped(value.inputs, leaf))
    if isinstance(value, ClientState):
        return ClientState(*(_mapped(getattr(value, part), leaf) for part in ClientState.PARTS))
    if isinstance(value, ClientKept):
        return ClientKept(_mapped(value.optimizer, leaf), _mapped(value.client, leaf))
    if isinstance(value, OptimizerState):
        return OptimizerState(leaf(value.step), {s: _mapped(t, leaf) for s, t in value.slots.items()})
    if isinstance(value, ClientUpdate):
        return replace(
            value,
            delta=_mapped(value.delta, leaf),
            optimizer_state=_mapped(value.optimizer_state, leaf),
            extras=_mapped(value.extras, leaf),
            client_state=_mapped(value.client_state, leaf),
        )
    if isinstance(value, PartialSum):
        return replace(value, mean_delta=_mapped(value.mean_delta, leaf))
    raise TypeError(f"cannot move a {type(value).__name__}")


def _sent(value):
    """`value` as it travels through Ray: its tensors as NumPy arrays on the CPU, which Ray's object
    store passes without pickling them (a model-sized dict of tensors takes ~2 ms longer each way)."""

    def leaf(t: torch.Tensor):
        t = t.detach().cpu()
        return t if t.dtype == torch.bfloat16 else t.numpy()  # NumPy has no bfloat16

    return _mapped(value, leaf)


def _received(value, device):
    """What `_sent` sent, with tensors again, on `device` (copied: the store's arrays are read-only)."""
    return _mapped(value, lambda a: (torch.from_numpy(a.copy()) if isinstance(a, np.ndarray) else a).to(device))


def _is_own(t: torch.Tensor, own: torch.Tensor | None) -> bool:
    """Whether `t` is the model's own tensor `own` (the same memory, shape and type): a frozen entry
    the round loop passes as the model holds it."""
    return (
        own is not None
        and t.data_ptr() == own.data_ptr()
        and t.shape == own.shape
        and t.stride() == own.stride()
        and t.dtype == own.dtype
        and t.device == own.device
    )


def data_digest(pool: TensorData) -> str:
    """What a worker's pool must match the driver's on: every target, the inputs' shapes and dtypes,
    and a strided sample of the inputs (hashing all of them would take a second per 200 MB)."""
    h = hashlib.sha256()
    step = max(1, len(pool) // 64)
    for part, tensors in (("x", leaves(pool.x)), ("y", leaves(pool.y))):
        for t in tensors:
            t = t.detach().cpu()
            h.update(f"{part} {tuple(t.shape)} {t.dtype};".encode())
            sample = t if part == "y" else t[::step]
            h.update(sample.contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def shares(costs: Sequence[float], workers: int) -> list[range]:
    """`workers` consecutive ranges of the tasks with about equal total cost each (some may be
    empty): consecutive, so that the answers, handed on worker by worker, keep the task order."""
    total = float(sum(costs))
    bounds: list[int] = []
    done, start = 0.0, 0
    for i, cost in enumerate(costs):
        done += cost
        # Close a share once it holds its part of the total (tasks never split).
        while len(bounds) < workers - 1 and done >= total * (len(bounds) + 1) / workers:
            bounds.append(i + 1)
    bounds += [len(costs)] * (workers - 1 - len(bounds))
    ranges = []
    for stop in [*bounds, len(costs)]:
        ranges.append(range(start, stop))
        start = stop
    return ranges


# Each worker also holds this share of its neighbours' clients (about as many more examples):
# those selected can go to either worker, which evens out the rounds' work (W2, 200 rounds:
# the slower worker's steps 7.5% over the mean with fixed shares, 1.6% with this overlap).
OVERLAP = 0.1


def holdings(costs: Sequence[float], workers: int, overlap: float = OVERLAP) -> list[range]:
    """The clients each worker holds: its share (`shares`) and `overlap` of its share's clients
    (at least one) beyond each end, from its neighbours' shares."""
    n = len(costs)
    held = []
    for share in shares(costs, workers):
        margin = math.ceil(overlap * len(share))
        held.append(range(max(0, share.start - margin), min(n, share.stop + margin)) if len(share) else share)
    return held


def assign(candidates: Sequence[Sequence[int]], costs: Sequence[float], workers: int) -> list[int]:
    """A worker for each task, from its `candidates` (the workers that hold its client): a task
    with one goes there; the others, costliest first, to the candidate with the least work so far
    (ties: the first). Depends on the tasks only, so every run and retry assigns alike."""
    load = [0.0] * workers
    chosen = [-1] * len(costs)
    for j, options in enumerate(candidates):
        if not options:
            raise ValueError(f"task {j}: no worker holds its client")
        if len(options) == 1:
            chosen[j] = options[0]
            load[options[0]] += costs[j]
    for j in sorted((j for j, options in enumerate(candidates) if len(options) > 1), key=lambda j: (-costs[j], j)):
        chosen[j] = min(candidates[j], key=lambda i: (load[i], i))
        load[chosen[j]] += costs[j]
    return chosen


def _run_folder(token: str, index: int) -> Path:
    """Where worker `index` of the engine `token` spills its clients' states: its node's temporary folder."""
    return Path(tempfile.gettempdir()) / f"fedforge-ray-{token}" / f"worker-{index}"


class _Worker:
    """One Ray actor: the run's clients' data, loaded once, an in-process engine that trains them,
    and what its home clients keep between their rounds (`RayEngine.keeps_client_state`).

    A client's new state is pending until the driver says that its round counted (`commit`), then
    kept, in memory and spilled to this worker's folder on its node's disk (one file a client,
    written atomically and read back as hostile, as a deployment client keeps its own:
    `network.state`), so that Ray's restart of this worker reads it back where it needs it.

    Errors while loading are kept and raised by every call, so that the driver reports them in one
    line instead of Ray restarting a worker that can never start.
    """

    def __init__(
        self,
        data: Callable[[], FederatedData],
        scenario: Scenario,
        seed: int,
        engine: str,
        max_memory: int | None,
        device: str,
        threads: int,
        index: int,
        workers: int,
        token: str,
    ):
        from . import make_engine

        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.scenario, self.seed = scenario, seed
        self.engine = make_engine(engine, max_memory=max_memory, combine=True)
        self.error: str | None = None
        self.data = None
        self.pool: tuple[TensorData, list[int], str] | None = None
        self.held_out: dict[int, TensorData] | None = None
        self.model: tuple[int, nn.Module] | None = None
        self.clients, self.home, self.rows = range(0), range(0), (0, 0)
        self.index, self.token, self.folder = index, token, _run_folder(token, index)
        self.kept: dict[int, ClientKept] = {}  # committed; a restarted worker reads them back from its folder
        self.pending: dict[int, tuple[int, ClientKept]] = {}  # by client: (round, its new states)
        try:
            self.data = data()
            # The clients this worker may train: consecutive ids with about a 1/workers share of the
            # examples (its home clients: those that keep state train here only), and a margin shared
            # with each neighbour (`holdings`). It keeps only their rows (the run's pool lives split
            # across the workers).
            sizes = [len(p) for p in self.data.partition]
            self.clients = holdings(sizes, workers)[index]
            self.home = shares(sizes, workers)[index]
            self.rows = (sum(sizes[: self.clients.start]), sum(sizes[: self.clients.stop]))
        except Exception as e:
            self.error = f"{type(e).__name__}: {_first_line(e)}"

    def ready(self) -> dict[str, Any]:
        import ray

        return {
            "error": self.error,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "clients": [self.clients.start, self.clients.stop],
            "home": [self.home.start, self.home.stop],
            "folder": str(self.folder),
            "rows": list(self.rows),
        }

    def _pool(self, config: ClientConfig) -> tuple[TensorData, list[int], str]:
        """This worker's clients' pool, built on the first call (it needs the task's data layout) and
        kept, with their held-out examples (personalized evaluation)."""
        if self.pool is None:
            data = self.data
            assert data is not None, "train() raises the load's error before it asks for the pool"
            train = config.task.data(data.train).to(self.device)
            pool, starts = client_pool(
                train,
                data.partition,
                flipped=label_flipped(self.scenario, len(data.partition), self.seed),
                clients=self.clients,
            )
            if data.client_test is not None:  # as the round loop builds them (`simulation._setup`)
                self.held_out = {c: train.subset(np.asarray(data.client_test[c])) for c in self.clients}
            self.pool = pool, starts, data_digest(pool)
            self.data = None  # the pool is a copy of this worker's part: keep only that
        return self.pool

    def _module(self, model: list) -> nn.Module:
        token, ref = model
        if self.model is None or self.model[0] != token:
            import ray

            self.model = token, ray.get(ref).to(self.device)
        return self.model[1]

    def _path(self, client_id: int, round: int | None = None) -> Path:
        """Client `client_id`'s committed state file, or its pending one of round `round`."""
        if round is None:
            return self.folder / f"client-{client_id}.pt"
        return self.folder / "pending" / f"client-{client_id}-{round}.pt"

    def _state(self, client_id: int, module: nn.Module | None, config: ClientConfig | None) -> ClientKept:
        """What `client_id` keeps: in memory, or (this worker was restarted) read back from its file."""
        kept = self.kept.get(client_id)
        if kept is not None:
            return kept
        path = self._path(client_id)
        saved = read_state(path, client_id, module) if module is not None else None
        if saved is None or module is None or config is None:
            raise FedforgeError(
                f"Ray worker {self.index} lost client {client_id}'s state ({path} is gone: its node was lost "
                f"or its disk cleared); the completed rounds are saved: continue with --resume"
            )
        check_state(saved, path, module, config, self.token, {})  # this engine's, shaped as this run's
        kept = self.kept[client_id] = _received(saved.committed, self.device)
        return kept

    def _write(self, path: Path, client_id: int, round: int, kept: ClientKept) -> None:
        write_state(path, client_id, SavedState(self.token, {}, round, kept))  # its states, committed or pending

    def restore(self, states: Mapping[int, ClientKept]) -> None:
        """A run starts: its clients keep `states` (this worker's home clients' ones), and nothing else."""
        self.kept, self.pending = {}, {}
        shutil.rmtree(self.folder, ignore_errors=True)
        for client_id, kept in states.items():
            if client_id not in self.home:
                raise ValueError(f"client {client_id}'s state was sent to the worker of clients {self.home}")
            self.kept[client_id] = _received(kept, self.device)
            self._write(self._path(client_id), client_id, 0, self.kept[client_id])

    def commit(self, round: int, client_ids: Collection[int]) -> None:
        """Round `round` counted with these clients: their pending states of it are now what they keep."""
        for client_id in client_ids:
            pending = self.pending.get(client_id)
            if pending is not None and pending[0] == round:
                self.kept[client_id] = pending[1]
            else:
                self.kept.pop(client_id, None)  # restarted since: read back from its file when needed
            with contextlib.suppress(FileNotFoundError):  # lost with its node: found out where it is needed
                os.replace(self._path(client_id, round), self._path(client_id))
        self.pending = {}

    def gather(self, model: list | None, config: ClientConfig | None, client_ids: Sequence[int]) -> dict:
        """What these (home) clients keep, as it travels."""
        module = self._module(model) if model is not None else None
        return {c: _sent(self._state(c, module, config)) for c in client_ids}

    def forget(self) -> None:
        """Remove this worker's folder (the engine closes)."""
        shutil.rmtree(self.folder.parent, ignore_errors=True)

    def train(
        self,
        global_state: State,
        model: list,
        jobs: Sequence[_Job],
        config: ClientConfig,
        digest: str,
        round: int,
    ) -> list[Update]:
        """Train `jobs`' clients of round `round` from `global_state`: one PartialSum for the summable
        ones (first), then each other client's update, in job order, as they travel (`_sent`),
        without their new states (kept here, pending until `commit`)."""
        if self.error is not None:
            raise ConfigError(f"a Ray worker cannot load the run's data: {self.error}")
        if not jobs:
            return []
        pool, starts, mine = self._pool(config)
        if mine != digest:
            raise ConfigError(
                f"a Ray worker loaded other data than the driver (digest {mine}, driver's {digest}): "
                f"every node must find the same dataset (same files, or --data-dir on shared storage)"
            )
        module = self._module(model)
        # What the driver did not send is the model's own (a frozen base): the worker's copy of it.
        received = _received(global_state, self.device)
        state = {n: received.get(n, v) for n, v in module.state_dict().items()}
        tasks = []
        for job in jobs:
            if job.client_id not in (self.home if job.kept else self.clients):
                raise ValueError(f"client {job.client_id} was sent to the worker of clients {self.clients}")
            i = job.client_id - self.clients.start
            a, b = starts[i], starts[i + 1]
            if (a + self.rows[0], b - a) != (job.start, job.size):
                raise ConfigError(
                    f"a Ray worker's client {job.client_id} holds rows {a + self.rows[0]}:"
                    f"{b + self.rows[0]}, the driver's {job.start}:{job.start + job.size}: the worker "
                    f"loaded other data"
                )
            kept = self._state(job.client_id, module, config) if job.kept else ClientKept()
            plan = _received(job.plan, self.device)
            tasks.append(
                ClientTask(
                    job.client_id, pool.rows(a, b), job.seed, pool, a, plan, kept.optimizer, job.summable, kept.client
                )
            )
        by_id = {job.client_id: job for job in jobs}
        own: list[Update] = []

        # Whether the clients keep state: then each one's new state (even none) is pending here, so that
        # a client the driver knows to keep one always finds it.
        keeps = config.algorithm.keeps_state or config.task.keep_optimizer_state

        def kept_here(updates: Iterator[Update]) -> Iterator[Update]:
            # Each client's new state stays here, pending until its round counts; its personal model is evaluated here.
            for update in updates:
                if isinstance(update, ClientUpdate):
                    job = by_id[update.client_id]
                    if job.evaluate is not None:
                        update = replace(update, personalized=self._personalized(module, state, update, config, job))
                    if keeps or update.client_state is not None or update.optimizer_state is not None:
                        if update.client_id not in self.home:
                            raise ValueError(
                                f"client {update.client_id} keeps state and trained away from its home worker"
                            )
                        # Copied: an engine's states may be views of a whole chunk's tensors.
                        new = _mapped(ClientKept(update.optimizer_state, update.client_state), torch.clone)
                        self._write(self._path(update.client_id, round), update.client_id, round, new)
                        self.pending[update.client_id] = round, new
                        update = replace(update, client_state=None, optimizer_state=None)
                yield update

        def summed(updates: Iterator[Update]) -> Iterator[Update]:
            # Running sum: the worker holds one model-sized buffer for all its summable clients.
            for update in updates:  # a PartialSum: the engine summed summable clients itself
                if isinstance(update, PartialSum) or by_id[update.client_id].summable:
                    yield update
                else:
                    own.append(_sent(update))

        combined = combine_updates(summed(kept_here(self.engine.run(module, state, tasks, config))))
        return ([_sent(combined)] if combined is not None else []) + own

    def _personalized(
        self, module: nn.Module, whole: State, update: ClientUpdate, config: ClientConfig, job: _Job
    ) -> tuple[dict[str, float], int]:
        """The client's personal model's metrics on its held-out examples, as the round loop's `_personalize`."""
        from ..client import personal_model
        from ..evaluation import evaluate

        if self.held_out is None:
            raise ConfigError(
                "personalized evaluation needs held-out examples on each client, and a Ray worker has none"
            )
        data = self.held_out[update.client_id]
        batch_size = job.evaluate or len(data)
        evaluation = evaluate(module, personal_model(whole, update), data, batch_size=batch_size, task=config.task)
        return dict(evaluation.metrics), len(data)


def _reachable(address: str, timeout: float) -> None:
    """ConfigError unless a gRPC server, as Ray's head is, answers at `address` (host:port,
    ray://host:port, or a bare host on Ray's port 6379) within `timeout` seconds: ray.init itself
    waits for minutes on an address that does not answer as Ray (measured with Ray 2.60)."""
    if address == "auto":
        return
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    default = 10001 if address.startswith("ray://") else 6379
    try:
        port_number = int(port) if port else default
    except ValueError:
        raise ConfigError(f"ray_address must look like host:port or ray://host:port, got {address!r}") from None
    host = host.strip("[]") or "127.0.0.1"
    started = time.monotonic()
    try:
        socket.create_connection((host, port_number), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address!r} within {timeout:g} s "
            f"({e.strerror or type(e).__name__}): is `ray start --head` running there?"
        ) from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a plaintext handshake cannot tell; Ray's own connection will
    import grpc

    channel = grpc.insecure_channel(f"{host}:{port_number}")
    try:
        grpc.channel_ready_future(channel).result(timeout=max(0.1, timeout - (time.monotonic() - started)))
    except grpc.FutureTimeoutError:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address!r} within {timeout:g} s (something listens "
            f"there, but not as Ray does): is `ray start --head` running there?"
        ) from None
    finally:
        channel.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _close(ray, actors: list, started: bool, threads: list) -> None:
    if threads:  # the driver's torch threads as they were before the engine (see RayEngine)
        torch.set_num_threads(threads.pop())
    with contextlib.suppress(Exception):  # best effort: the workers' folders of the clients' states
        ray.wait([actor.forget.remote() for actor in actors], num_returns=len(actors), timeout=10)
    for actor in actors:
        with contextlib.suppress(Exception):  # best effort: an actor that is gone already
            ray.kill(actor)
    actors.clear()
    if started and ray.is_initialized():
        ray.shutdown()


class RayEngine(Engine):
    """Trains each round's clients on `workers` long-lived Ray actors that load the data themselves.

    Args:
        data: called once in every worker (and again when Ray restarts one): the run's
            FederatedData, the same as the driver's (e.g. `functools.partial(load_data, config)`);
            it must be picklable, and what it reads must be found on every node.
        seed, scenario: the run's (simulate's): the workers rebuild the pool with them.
        workers: how many actors; cpus_per_worker, gpus_per_worker: what Ray reserves for each
            (fractions allowed; a worker trains on CUDA when it has a GPU share, else on the CPU).
        engine: the in-process engine each worker trains with; max_memory: its budget.
        address: the Ray cluster to connect to ("host:port", "ray://host:port", "auto"), checked
            for an answer within `connect_timeout` seconds; a process already connected to Ray
            (`ray.init`) keeps its connection. None: that one, else a new local Ray.
        max_restarts: how often Ray restarts a worker that dies, and retries its work.
        connect_timeout: seconds to wait for `address` to answer.

    Use it as a context manager, or call `close()`: the actors hold their CPUs until then.
    """

    name = "ray"
    works_ahead = True  # run() only sends the work: the round loop begins the next round before evaluating
    keeps_client_state = True  # on each client's home worker
    clients_evaluate = True  # a client's personal model is evaluated on its worker, which holds its state

    def __init__(
        self,
        data: Callable[[], FederatedData],
        *,
        seed: int,
        scenario: Scenario = Scenario(),
        workers: int = 2,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        engine: str = "auto",
        max_memory: int | None = None,
        address: str | None = None,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ):
        check_options(workers, cpus_per_worker, gpus_per_worker, engine)
        if max_restarts < 0:
            raise ConfigError(f"max_restarts must be >= 0, got {max_restarts}")
        ray = import_ray()
        self.workers, self.max_restarts = workers, max_restarts
        self._started = False
        if address:
            _reachable(address, connect_timeout)
        if not ray.is_initialized():
            # The user's own modules (--model pkg.mod:factory, --task) import in the workers as here.
            path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
            try:
                ray.init(
                    address=address,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    runtime_env={"env_vars": {"PYTHONPATH": path}},
                )
            except Exception as e:
                where = f"the Ray cluster at {address!r}" if address else "a local Ray"
                # A cluster started by `ray start` takes tokens by default; its clients must say so themselves.
                hint = (
                    "; if the cluster takes tokens (Ray's default), set RAY_AUTH_MODE=token here, with its "
                    "token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
                    if address and "RAY_AUTH_MODE" not in os.environ
                    else ""
                )
                raise ConfigError(f"cannot start or connect to {where}: {_first_line(e)}{hint}") from None
            self._started = True
        self._ray = ray
        self._actors: list = []
        self._threads: list[int] = []
        self._finalizer = weakref.finalize(self, _close, ray, self._actors, self._started, self._threads)
        # What the cluster can never hold is refused now; what others hold for the moment is waited for.
        total = ray.cluster_resources()
        for resource, each in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
            if each and workers * each > total.get(resource, 0) + 1e-9:
                self.close()
                raise ConfigError(
                    f"{workers} Ray workers of {each:g} {resource} each need {workers * each:g} "
                    f"{resource}, and the cluster has {total.get(resource, 0):g}: use fewer "
                    f"--ray-workers or less per worker"
                )
        device = "cuda" if gpus_per_worker > 0 else "cpu"
        actor = ray.remote(_Worker).options(
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker,
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
            max_concurrency=1,
        )
        threads = max(1, int(cpus_per_worker))
        token = uuid.uuid4().hex[:12]  # the workers' folders of their clients' states
        self._actors.extend(
            actor.remote(data, scenario, seed, engine, max_memory, device, threads, i, workers, token)
            for i in range(workers)
        )
        try:
            ready = [a.ready.remote() for a in self._actors]
            if len(ray.wait(ready, num_returns=len(ready), timeout=PLACEMENT_NOTICE_S)[0]) < len(ready):
                log.warning(
                    "waiting for Ray to place %d workers of %g CPU and %g GPU (free now: %s)",
                    workers,
                    cpus_per_worker,
                    gpus_per_worker,
                    ray.available_resources(),
                )
            self.placement = ray.get(ready)
        except Exception as e:
            self.close()
            raise ConfigError(f"a Ray worker cannot start: {_first_line(e)}") from None
        errors = [p["error"] for p in self.placement if p["error"]]
        if errors:
            self.close()
            raise ConfigError(f"a Ray worker cannot load the run's data: {errors[0]}")
        self._digests: dict[tuple[int, int], tuple[TensorData, str]] = {}
        # The workers that can train each client: worker i holds clients [lo, hi) and their rows (Ray
        # restarts a worker with the same ones, so this holds for the whole run).
        self._held = [range(*p["clients"]) for p in self.placement]
        self._home = [range(*p["home"]) for p in self.placement]  # where a client that keeps state trains
        self._share_cpus(ray, cpus_per_worker)
        self._model: tuple[nn.Module, list, dict[str, int]] | None = None
        self._model_token = 0
        # What the driver knows of the clients' states: which clients keep one (on their home worker).
        self._stateful: set[int] = set()
        self._last: tuple[list, ClientConfig, bool] | None = (
            None  # the last run's model, config, and whether it keeps state
        )
        self._commits: list = []  # commit calls not yet seen through

    def _share_cpus(self, ray, cpus_per_worker: float) -> None:
        """Leave the workers on this machine their CPUs: this process (the driver: it evaluates and
        aggregates while they train the next round) computes with the CPUs they leave, at least one:
        more threads than free CPUs wait for each other at every parallel operation."""
        here = ray.get_runtime_context().get_node_id()
        taken = sum(cpus_per_worker for p in self.placement if p["node"] == here)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, int(cpus - taken))
        if threads < torch.get_num_threads():
            self._threads.append(torch.get_num_threads())  # restored by close()
            torch.set_num_threads(threads)

    @property
    def actors(self) -> list:
        """The workers' actor handles (for tests and tools: `ray.kill(engine.actors[0], no_restart=False)`)."""
        return list(self._actors)

    def close(self) -> None:
        """Kill the workers (and stop the local Ray this engine started); this process's torch threads
        are again what they were before the engine (it computes with the CPUs the workers leave)."""
        self._finalizer()

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _digest(self, source: TensorData, worker: int) -> str:
        """The digest of `worker`'s part of the round loop's pool, as the worker computes it on its own."""
        # Once per pool and worker (the round loop builds one pool per run): it takes milliseconds.
        key = (id(source), worker)
        kept = self._digests.get(key)
        if kept is None or kept[0] is not source:
            a, b = self.placement[worker]["rows"]
            kept = self._digests[key] = (source, data_digest(source.rows(a, b)))
        return kept[1]

    def _module_ref(self, model: nn.Module) -> list:
        # In a list, so that Ray hands the reference over unresolved: a worker fetches the model once,
        # and again only when its tensors were written since (their version moved: `_is_own` relies
        # on the workers' copy being the model as it is).
        versions = {n: t._version for n, t in model.state_dict().items()}
        if self._model is None or self._model[0] is not model or self._model[2] != versions:
            self._model_token += 1
            self._model = model, [self._model_token, self._ray.put(copy.deepcopy(model).cpu())], versions
        return self._model[1]

    def run(
        self, model: nn.Module, global_state: State, tasks: Sequence[ClientTask], config: ClientConfig
    ) -> Iterator[Update]:
        """Send the tasks to the workers now; the iterator hands on their answers as they come."""
        if not tasks:
            return iter(())
        if not self._actors:
            raise FedforgeError("the Ray engine is closed")
        source = tasks[0].source
        if source is None or any(task.source is not source for task in tasks):
            raise ValueError(
                "the Ray engine trains clients from the data its workers load: every task needs the "
                "round loop's pool as its source"
            )
        if any(t.client_state is not None or t.optimizer_state is not None for t in tasks):
            raise ValueError(
                "the Ray engine keeps the clients' states on its workers (keeps_client_state): a task carries none"
            )
        ray = self._ray
        jobs = [
            _Job(
                t.client_id,
                t.start,
                len(t.data),
                t.seed,
                _sent(t.plan),
                t.summable,
                t.client_id in self._stateful,
                t.evaluate,
            )
            for t in tasks
        ]
        # Once, read by every worker; without the model's own tensors (frozen entries, e.g. a
        # pretrained base under LoRA), which the workers hold with the model they were sent once.
        module = self._module_ref(model)
        own = model.state_dict()
        state = ray.put(_sent({n: t for n, t in global_state.items() if not _is_own(t, own.get(n))}))
        keeps = config.algorithm.keeps_state or config.task.keep_optimizer_state
        self._last = module, config, keeps
        # Each task to a worker that holds its client, the shared ones where they even out the work; a
        # client that keeps state to its home worker, which keeps it.
        candidates = [
            [i for i, held in enumerate(self._home if keeps else self._held) if task.client_id in held]
            for task in tasks
        ]
        costs = [task.plan.num_steps(len(task.data), config) + 1 for task in tasks]  # + 1: a client's own cost
        by_worker: dict[int, list[int]] = {}  # worker -> its tasks' positions, in task order
        for j, worker in enumerate(assign(candidates, costs, self.workers)):
            by_worker.setdefault(worker, []).append(j)
        pending = [
            (
                i,
                positions,
                self._actors[i].train.remote(
                    state, module, [jobs[j] for j in positions], config, self._digest(source, i), config.round
                ),
            )
            for i, positions in sorted(by_worker.items())
        ]
        return self._answers(pending, jobs, next(iter(global_state.values())).device)

    def _answers(self, pending: list, jobs: Sequence[_Job], device: torch.device) -> Iterator[Update]:
        # Each worker's sum of its summable clients, then every other update in task order (as the
        # in-process engines hand them on), whichever worker finishes first.
        self._committed()
        own: dict[int, Update] = {}
        for worker, positions, ref in pending:
            answers = self._answer(worker, ref)
            unsummed = [j for j in positions if not jobs[j].summable]
            summed = len(answers) - len(unsummed)  # 1 when the worker had summable clients, else 0
            for update in answers[:summed]:
                yield _received(update, device)
            own.update(zip(unsummed, answers[summed:], strict=True))
        for j in sorted(own):
            yield _received(own[j], device)

    def restore(self, optimizer_states: Mapping[int, OptimizerState], client_states: Mapping[int, ClientState]) -> None:
        """Each client's states to its home worker, which keeps them (and forgets any others)."""
        if not self._actors:
            raise FedforgeError("the Ray engine is closed")
        self._stateful = set(optimizer_states) | set(client_states)
        self._commits = []
        by_worker: list[dict[int, ClientKept]] = [{} for _ in self._actors]
        for c in sorted(self._stateful):
            by_worker[self._home_of(c)][c] = _sent(ClientKept(optimizer_states.get(c), client_states.get(c)))
        refs = [actor.restore.remote(states) for actor, states in zip(self._actors, by_worker, strict=True)]
        for i, ref in enumerate(refs):
            self._answer(i, ref)

    def commit(self, round: int, client_ids: Collection[int]) -> None:
        """Tell the workers which of their clients' new states (of the last `run`) now count; sent at
        once, run by each worker before the next round it is sent (a worker runs its calls in order)."""
        if self._last is None or not self._last[2]:
            return
        self._stateful.update(client_ids)
        by_worker: dict[int, list[int]] = {}
        for c in client_ids:
            by_worker.setdefault(self._home_of(c), []).append(c)
        self._commits += [(i, self._actors[i].commit.remote(round, ids)) for i, ids in sorted(by_worker.items())]

    def gather(self) -> tuple[dict[int, OptimizerState], dict[int, ClientState]]:
        """Every client's states from the workers (the driver holds them all until they are written)."""
        self._committed()
        if not self._stateful:
            return {}, {}
        model, config = self._last[:2] if self._last is not None else (None, None)
        by_worker: dict[int, list[int]] = {}
        for c in sorted(self._stateful):
            by_worker.setdefault(self._home_of(c), []).append(c)
        refs = [(i, self._actors[i].gather.remote(model, config, ids)) for i, ids in sorted(by_worker.items())]
        optimizers, states = {}, {}
        device = torch.device("cpu")
        for i, ref in refs:
            for c, kept in self._answer(i, ref).items():
                kept = _received(kept, device)
                if kept.optimizer is not None:
                    optimizers[c] = kept.optimizer
                if kept.client is not None:
                    states[c] = kept.client
        return optimizers, states

    def _home_of(self, client_id: int) -> int:
        for i, home in enumerate(self._home):
            if client_id in home:
                return i
        raise ValueError(f"client {client_id} has no home worker")

    def _committed(self) -> None:
        """Raise what a commit call raised (it has run before any later call of its worker)."""
        commits, self._commits = self._commits, []
        for i, ref in commits:
            self._answer(i, ref)

    def _answer(self, worker: int, ref) -> Any:
        """A worker's answers; Ray's own errors turned into one line (a client's, e.g. divergence, as it is)."""
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, FedforgeError):
                raise e.cause from None
            raise FedforgeError(f"Ray worker {worker} failed: {_first_line(e.cause or e)}") from None
        except ray.exceptions.RayError as e:
            raise FedforgeError(
                f"Ray worker {worker} died more often than its {self.max_restarts} restarts allow "
                f"({type(e).__name__}); the completed rounds are saved: continue with --resume"
            ) from None


__all__ = ["RayEngine", "assign", "check_options", "data_digest", "holdings", "import_ray", "shares"]
