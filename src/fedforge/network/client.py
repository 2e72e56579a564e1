"""The client side of a deployment: connect, authenticate, train when asked, evaluate the global
model on its held-out examples when asked (federated evaluation), reconnect.

A client keeps its data; only model updates travel. It trains as the sequential engine does
(`train_client`), so a networked round computes what the simulation computes.

Every message from the server is checked before it is used, as the server checks its clients':
its size (at most `max_message_bytes`), its wire format, every header field and tensor of a
task (the round's client config among them: its round and the run's rounds, lr, local epochs,
momentum and weight decay, which the client trains that round with), and what a task asks
against this client's own ClientLimits (epochs, steps, batch size, seconds of training). A
message that fails is one logged line and the client leaves the run as it does when the server's
run failed (status 3, or with `retry_on_server_failure` it reconnects later). The client
imports no code that the server names unless its operator allowed it (welcome.References).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import queue
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from ..algorithms import PLAIN, ClientAlgorithm, describe, from_description
from ..app import ClientApp
from ..client import (
    ClientConfig,
    ClientPlan,
    ClientUpdate,
    OutOfTime,
    State,
    all_finite,
    load_state,
    personal_model,
    train_client,
)
from ..config import Config
from ..data import federate, load
from ..data.datasets import TensorData, leaves
from ..errors import ConfigError, DivergenceError
from ..evaluation import evaluate
from ..llm.settings import LlmSettings
from ..models import build_model, check_fits
from ..privacy.mechanism import PrivacyConfig, secure_generator
from ..privacy.stage import privatize_update
from ..secagg.protocol import ClientRound, Floor, ProtocolError, Setup
from ..secagg.quantize import QuantizationError, Quantizer
from .hub import CLIENT_ID_KEY, METHOD, SECRET_KEY, channel_options
from .inputs import InputSummary
from .state import ClientKept, Disagrees, SavedState, check_state, read_state, settle, state_path, write_state
from .welcome import MAX_LR, MAX_ROUNDS, SETTINGS, ClientLimits, References, Unacceptable, Welcome, check_welcome
from .wire import MAX_INT, Kind, Message, WireError, decode, encode, is_number

log = logging.getLogger("fedforge.client")


@dataclass(frozen=True)
class PartitionOf:
    """`DATASET:INDEX/N`: client INDEX of the run's N-way partition of DATASET (demos, tests)."""

    dataset: str
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> PartitionOf:
        match = re.fullmatch(r"([\w-]+):(\d+)/(\d+)", text)
        if not match or not int(match.group(2)) < int(match.group(3)):
            raise ConfigError(f"--partition-of must look like fashion-mnist:3/10 (index < count), got {text!r}")
        return cls(match.group(1), int(match.group(2)), int(match.group(3)))

    def load(self, config: Config) -> TensorData:
        if (config.dataset, config.num_clients) != (self.dataset, self.count):
            raise ConfigError(
                f"this client holds part {self.index} of {self.dataset}/{self.count}, but the server "
                f"runs {config.dataset} over {config.num_clients} clients"
            )
        data = _federated(config)
        return data.train.subset(data.partition[self.index])

    def validation(self, config: Config) -> TensorData | None:
        """This client's held-out rows of the run's client_test_fraction (None: none held out)."""
        data = _federated(config)
        if data.client_test is None or not len(data.client_test[self.index]):
            return None
        return data.train.subset(np.asarray(data.client_test[self.index]))


@functools.lru_cache(maxsize=2)
def _federated(config: Config):
    """The run's partition, computed once per process however many clients it hosts."""
    dataset = load(config.dataset, config.data_request(progress=False))
    return federate(dataset, config.data_split(), seed=config.seed)


@dataclass(frozen=True)
class LocalData:
    """A client's own data in a folder: `train.npz` (arrays x and y) or the IDX pair
    `train-images-idx3-ubyte[.gz]` and `train-labels-idx1-ubyte[.gz]`. uint8 images are scaled
    as the built-in datasets are ((x / 255 - 0.5) / 0.5); float arrays are taken as they are."""

    folder: str

    def load(self, config: Config) -> TensorData:
        import numpy as np

        from ..data.idx import read_idx

        folder = Path(self.folder)
        if (folder / "train.npz").exists():
            with np.load(folder / "train.npz", allow_pickle=False) as arrays:
                if "x" not in arrays or "y" not in arrays:
                    raise ConfigError(f"{folder / 'train.npz'} must hold arrays named x and y")
                x, y = arrays["x"], arrays["y"]
        else:
            found = [
                [p for p in (folder / name, folder / f"{name}.gz") if p.exists()]
                for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
            ]
            if not all(found):
                raise ConfigError(f"{folder} holds neither train.npz nor train-images/train-labels IDX files")
            x, y = read_idx(found[0][0]), read_idx(found[1][0])
        if len(x) != len(y) or len(y) == 0:
            raise ConfigError(f"{folder}: {len(x)} examples but {len(y)} labels")
        features = torch.from_numpy(np.ascontiguousarray(x))
        if features.dtype == torch.uint8:
            features = features.float().div_(255).sub_(0.5).div_(0.5)
            if features.dim() == 3:  # images without a channel dimension
                features = features.unsqueeze(1)
        return TensorData(features.float(), torch.from_numpy(np.asarray(y, dtype=np.int64)))


class Refused(Exception):
    """The server refused this client; retrying would not help."""


class ServerFailed(Exception):
    """The server's run failed (the reason is the message)."""


EXIT_DONE, EXIT_REFUSED, EXIT_GAVE_UP, EXIT_SERVER_FAILED = 0, 1, 2, 3


def _text(value: Any, limit: int = 300) -> str:
    """A server's words, fit for one log line: printable, at most `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    clipped = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clipped + "..." if len(text) > limit else clipped


def _integer(h: dict, key: str, low: int, high: int, *, limit: str = "") -> int:
    value = h.get(key)
    if type(value) is not int or not low <= value <= high:
        where = f" (this client's {limit})" if limit and type(value) is int and value > high else ""
        raise Unacceptable(f"{key} {_text(repr(value), 40)} is not an integer in [{low}, {high}]{where}")
    return value


def _optional_integer(h: dict, key: str, low: int, high: int, *, limit: str = "") -> int | None:
    return None if h.get(key) is None else _integer(h, key, low, high, limit=limit)


def _number(h: dict, key: str, low: float, high: float, *, default: float | None = None) -> float:
    value = h.get(key, default)
    if not (is_number(value) and low <= value <= high):
        raise Unacceptable(f"{key} {_text(repr(value), 40)} is not a number in [{low:g}, {high:g}]")
    return float(value)


def _optional_number(h: dict, key: str, low: float, high: float) -> float | None:
    return None if h.get(key) is None else _number(h, key, low, high)


def as_app(source: PartitionOf | LocalData | ClientApp) -> ClientApp:
    """Every way a client gets its data, as a ClientApp (the built-in sources bring only data)."""
    if isinstance(source, ClientApp):
        return source
    if isinstance(source, PartitionOf):
        return ClientApp(
            data=lambda client_id, config: source.load(config),
            validation=lambda client_id, config: source.validation(config),
        )
    return ClientApp(data=lambda client_id, config: source.load(config))


class _Trainer:
    """The run's model, task and this client's data, set up once from the server's settings
    and the client's app."""

    def __init__(
        self, welcome: Welcome, app: ClientApp, client_id: int, limits: ClientLimits, state_file: Path | None = None
    ):
        config = self.config = welcome.config
        limits.check_config(config)
        self.limits = limits
        client = config.client_config()
        self.client = client if app.task is None else dataclasses.replace(client, task=app.task)
        self.data = self.client.task.data(app.data(client_id, config))
        held_out = app.validation(client_id, config) if app.validation is not None else None
        # What it evaluates its personal model on after training (personalized evaluation), and how.
        self.held_out = self.client.task.data(held_out) if held_out is not None else None
        self.evaluate = app.evaluate
        input_shape, num_classes = tuple(leaves(self.data.x)[0].shape[1:]), _num_classes(config)
        if app.model is None:
            self.model = build_model(
                config.model,
                input_shape,
                num_classes,
                seed=config.seed,
                task=self.client.task,
                llm=config.group(LlmSettings),
            )
        else:
            self.model = app.model(input_shape, num_classes)
        check_fits(self.model, self.data.x, config.model if app.model is None else _qualified(app.model))
        self.scratch = copy.deepcopy(self.model)  # trained in place, as the sequential engine's copy
        # Its own model's values (initial or pretrained): what fills the entries that never travel,
        # the frozen ones every round and the personal ones on its first.
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # What it keeps between its rounds (its optimizer's state, when its task keeps it; its
        # algorithm's client state): the states its last counted update left and those of its latest
        # task, settled by each task's word on which of its updates the server counted (state.py).
        self.run = json.dumps({k: getattr(config, k) for k in SETTINGS}, sort_keys=True, default=str)
        self.kept = SavedState(self.run, {}, 0, ClientKept())
        # Where it keeps them between its runs (None: in memory only); whether what it read there is
        # still to be checked against the algorithm the first task names.
        self.state_file, self._unchecked = state_file, False
        if state_file is not None and (saved := read_state(state_file, client_id, self.model)) is not None:
            self.kept, self._unchecked = saved, True

    def _check_model(self, global_state, shared: list[str]) -> None:
        mine = {k: tuple(self.initial[k].shape) for k in shared}
        theirs = {k: tuple(v.shape) for k, v in global_state.items()}
        if mine != theirs:
            different = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
            raise ConfigError(
                f"this client's model does not match the server's ({len(mine)} vs {len(theirs)} shared "
                f"tensors; e.g. {different})"
            )

    def _algorithm(self, h: dict) -> tuple[ClientAlgorithm, list[str]]:
        """The client algorithm a task or an evaluation names, and the entries of this client's
        model it shares; Unacceptable for one this client cannot run."""
        try:
            algorithm = from_description(h.get("algorithm", describe(PLAIN)))
            roles = algorithm.roles.assign(self.model)  # each pattern must match an entry of this client's model
        except ConfigError as e:
            raise Unacceptable(_text(str(e))) from None
        if not roles.shared:
            raise Unacceptable(f"algorithm {algorithm.name}'s roles leave no entry of this client's model shared")
        return algorithm, roles.shared

    def check(self, task: Message) -> tuple[int, int, ClientPlan, ClientConfig, State, int]:
        """The task's id, seed, plan, the round's client config (with the task's algorithm), the
        model it starts from (the task's shared entries, this client's own frozen and personal
        ones) and the last round before it in which the server counted this client's update, once
        every header field and tensor of `task` is checked (and what it asks is within this
        client's limits); Unacceptable otherwise."""
        h, limits = task.header, self.limits
        task_id = _integer(h, "task", 0, MAX_INT)
        seed = _integer(h, "seed", 0, MAX_INT)
        config = self._round_config(task_id, h)
        counted = _integer(h, "counted", 0, max(config.round - 1, 0))
        epochs = _optional_integer(h, "epochs", 1, limits.max_epochs, limit="--max-epochs")
        max_steps = _optional_integer(h, "max_steps", 1, MAX_INT)
        initial_loss = h.get("measure_initial_loss", False)
        if type(initial_loss) is not bool:
            raise Unacceptable(f"measure_initial_loss {_text(repr(initial_loss), 40)} is not true or false")
        algorithm, shared = self._algorithm(h)
        state = {k: self.initial[k] for k in shared}  # the entries that travel
        expected_inputs = algorithm.inputs_like(state)
        names = {f"global/{k}" for k in state} | {f"inputs/{k}" for k in expected_inputs}
        unknown = sorted(set(task.tensors) - names)
        if unknown:
            raise Unacceptable(
                f"tensors {_text(unknown[:3])} are not of this client's model's shared entries or its algorithm"
            )
        global_state = {k[len("global/") :]: v for k, v in task.tensors.items() if k.startswith("global/")}
        self._check_model(global_state, shared)
        inputs = {k[len("inputs/") :]: v for k, v in task.tensors.items() if k.startswith("inputs/")}
        if inputs.keys() != expected_inputs.keys():
            raise Unacceptable(f"its inputs are not the {len(expected_inputs)} algorithm {algorithm.name} takes")
        for kind, tensors, like in (("global", global_state, state), ("inputs", inputs, expected_inputs)):
            for k, v in tensors.items():
                if v.dtype != like[k].dtype or v.shape != like[k].shape:
                    raise Unacceptable(
                        f"{kind}/{k} is {tuple(v.shape)} {v.dtype}, the model's {tuple(like[k].shape)} {like[k].dtype}"
                    )
            if not all_finite(tensors.values()):
                raise Unacceptable(f"its {kind} tensors hold NaN or infinite values")
        plan = ClientPlan(
            epochs=epochs,
            max_steps=max_steps,
            inputs=inputs or None,
            measure_initial_loss=initial_loss,
            clip=_optional_number(h, "clip", 1e-30, 1e30),
            noise_multiplier=_number(h, "noise_multiplier", 0, 1e6, default=0.0),
        )
        limits.check_privacy(task_id, plan.clip, plan.noise_multiplier, "secagg" in h)
        for phase in algorithm.phases:
            if phase.epochs is not None and phase.epochs > limits.max_epochs:
                raise Unacceptable(
                    f"task {task_id}: algorithm {algorithm.name} asks for {phase.epochs} epochs in a phase, above "
                    f"this client's --max-epochs {limits.max_epochs}"
                )
        config = dataclasses.replace(config, algorithm=algorithm)
        # Every phase's steps: FedRep's head epochs and Ditto's personal copy are work too.
        steps = sum(plan.phase_steps(len(self.data), config))
        if steps > limits.max_steps:
            raise Unacceptable(
                f"task {task_id} asks for {steps} steps, above this client's --max-steps {limits.max_steps}"
            )
        whole = {k: global_state.get(k, v) for k, v in self.initial.items()}
        return task_id, seed, plan, config, whole, counted

    def _personalized(self, config: ClientConfig) -> bool:
        """Whether this run evaluates each client's personal model (the server's personalized_eval:
        on; or auto, and the algorithm personalizes)."""
        setting = self.config.personalized_eval
        return setting == "on" or (setting == "auto" and config.algorithm.personalizes)

    def _personalize(self, whole: State, update: ClientUpdate, config: ClientConfig) -> tuple[dict[str, float], int]:
        """Its personal model's metrics on its held-out examples, and their count: its model at the
        end of its training (the model it started from plus its update, its personal entries), or
        its personal copy (Ditto's), as the simulation's round loop evaluates it (`_personalize`)."""
        return self._evaluated(personal_model(whole, update))

    def evaluation(self, client_id: int, request: Message) -> Message:
        """The EVALUATION answering `request` (an EVALUATE): the global model it sends (its shared
        entries, this client's own frozen and personal ones, as the round loop's `_whole`) on this
        client's held-out examples, once every field and tensor of `request` is checked
        (Unacceptable otherwise); no metrics and 0 examples when it holds none out."""
        h = request.header
        task_id = _integer(h, "task", 0, MAX_INT)
        _, shared = self._algorithm(h)
        unknown = sorted(set(request.tensors) - {f"global/{k}" for k in shared})
        if unknown:
            raise Unacceptable(f"tensors {_text(unknown[:3])} are not of this client's model's shared entries")
        global_state = {k[len("global/") :]: v for k, v in request.tensors.items()}
        self._check_model(global_state, shared)
        for k, v in global_state.items():
            if v.dtype != self.initial[k].dtype:
                raise Unacceptable(f"global/{k} is {v.dtype}, the model's {self.initial[k].dtype}")
        if not all_finite(global_state.values()):
            raise Unacceptable("its global tensors hold NaN or infinite values")
        metrics: dict[str, float] = {}
        count = 0
        if self.held_out is not None and len(self.held_out):
            metrics, count = self._evaluated({k: global_state.get(k, v) for k, v in self.initial.items()})
        return Message(
            Kind.EVALUATION, {"task": task_id, "client": client_id, "metrics": metrics, "num_examples": count}
        )

    def _evaluated(self, state: State) -> tuple[dict[str, float], int]:
        """The model with `state` on this client's held-out examples: the task's metrics (or its
        app's `evaluate`), and the examples' count."""
        assert self.held_out is not None, "called with held-out examples"
        if self.evaluate is None:
            evaluation = evaluate(
                self.scratch, state, self.held_out, batch_size=self.config.eval_batch_size, task=self.client.task
            )
            return dict(evaluation.metrics), len(self.held_out)
        load_state(self.scratch, state)
        metrics = self.evaluate(self.scratch, self.held_out)
        if not isinstance(metrics, Mapping) or not all(
            isinstance(k, str) and is_number(v) and math.isfinite(v) for k, v in metrics.items()
        ):
            raise ConfigError("ClientApp.evaluate must return {name: finite number}")
        return {k: float(v) for k, v in metrics.items()}, len(self.held_out)

    def _round_config(self, task_id: int, h: dict) -> ClientConfig:
        """The round's client config: the welcome's, with the round's fields the task carries (a
        field it leaves out keeps the welcome's value; round and rounds 0: unknown, as in
        ClientConfig)."""
        rounds = _integer(h, "rounds", 0, MAX_ROUNDS) if "rounds" in h else 0
        round_ = _integer(h, "round", min(rounds, 1), rounds) if "round" in h or rounds else 0
        welcomed = self.client
        epochs = welcomed.local_epochs
        if "local_epochs" in h:
            epochs = _integer(h, "local_epochs", 1, self.limits.max_epochs, limit="--max-epochs")
        try:
            return dataclasses.replace(
                welcomed,
                round=round_,
                rounds=rounds,
                lr=_number(h, "lr", 1e-30, MAX_LR, default=welcomed.lr),
                local_epochs=epochs,
                momentum=_number(h, "momentum", 0, 1, default=welcomed.momentum),
                weight_decay=_number(h, "weight_decay", 0, 1e6, default=welcomed.weight_decay),
            )
        except ConfigError as e:  # momentum 1, or SGD's momentum for another optimizer
            raise Unacceptable(f"task {task_id}: {e}") from None

    def train(self, client_id: int, task: Message, *, privatize: bool = True) -> ClientUpdate:
        """This client's update for `task`; with `privatize`, clipped (and noised) as differential
        privacy asks (secure aggregation clips the update itself, as it quantizes it). Raises
        Unacceptable for a task this client refuses, OutOfTime past its --max-round-seconds."""
        task_id, seed, plan, config, global_state, counted = self.check(task)
        if self._unchecked:
            assert self.state_file is not None, "state is read from a file"
            check_state(self.kept, self.state_file, self.model, config, self.run, describe(config.algorithm))
            log.info("client %d: continues from its state in %s", client_id, self.state_file)
            self._unchecked = False
        keeps = config.algorithm.keeps_state or config.task.keep_optimizer_state
        if keeps:
            if config.round < 1:
                raise Unacceptable(f"task {task_id} names no round, and this client keeps state between its rounds")
            try:
                settled = settle(self.kept, counted)  # its last task's states committed or dropped
            except Disagrees as e:
                raise Unacceptable(f"task {task_id}: {e}") from None
            if self.kept.pending is not None and settled.pending is None and settled.counted != self.kept.round:
                log.info(
                    "client %d: the server has not counted its update of round %d: it starts task %d from its "
                    "state of round %d",
                    client_id,
                    self.kept.round,
                    task_id,
                    settled.counted,
                )
            self.kept = settled
        start = self.kept.committed
        try:
            update = train_client(
                self.scratch,
                global_state,
                self.data,
                config,
                client_id=client_id,
                generator=torch.Generator().manual_seed(seed),
                plan=plan,
                optimizer_state=start.optimizer,
                deadline=time.monotonic() + self.limits.max_round_seconds,
                client_state=start.client,
            )
        except ConfigError as e:  # what the task asks this client's task cannot do (its own loop and FedProx)
            raise Unacceptable(f"task {task_id}: {e}") from None
        if self.held_out is not None and len(self.held_out) and self._personalized(config):
            update = dataclasses.replace(update, personalized=self._personalize(global_state, update, config))
        if keeps:
            # Pending until the server says whether this update counted; written before it is sent,
            # so that a client that stops before it sends settles this task again when it is resent.
            self.kept = dataclasses.replace(
                self.kept,
                algorithm=describe(config.algorithm),
                round=config.round,
                pending=ClientKept(update.optimizer_state, update.client_state),
            )
            if self.state_file is not None:
                write_state(self.state_file, client_id, self.kept)
        if plan.clip is not None and privatize:  # differential privacy: this client's part, before anything leaves it
            mode = "local" if plan.noise_multiplier else "client"
            mechanism = PrivacyConfig(plan.noise_multiplier, 1.0, mode=mode, clip=plan.clip)
            update = privatize_update(update, mechanism, plan.clip, secure_generator())
        return update

    def finish(self, client_id: int, header: dict) -> None:
        """Settle its last task by the server's word on a finished run (a "done" SHUTDOWN's "counted"),
        so that the states it keeps are those of its last counted update; a word that is missing or
        disagrees leaves them as they are (logged)."""
        if self.kept.pending is None:
            return
        counted = header.get("counted")
        try:
            if type(counted) is not int or not 0 <= counted <= MAX_ROUNDS:
                raise Disagrees(f"counted {_text(repr(counted), 40)} is not a round")
            self.kept = settle(self.kept, counted)
        except Disagrees as e:
            log.warning("client %d: its last task's state stays pending: %s", client_id, e)
            return
        if self.state_file is not None:
            write_state(self.state_file, client_id, self.kept)


def _qualified(factory) -> str:
    """A client app's model factory by its module and name, as errors show it."""
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', type(factory).__name__)}"


def _num_classes(config: Config) -> int:
    """The model's outputs: the dataset's classes, or one for a regression."""
    from ..data.datasets import DATASETS

    if config.task == "regression":
        return 1
    return DATASETS[config.dataset].num_classes if config.dataset in DATASETS else 10


class _SecureRound:
    """This client's part in one round of secure aggregation: the protocol (secagg/protocol.py)
    and the quantized update it masks. Its answers name the task and this client."""

    def __init__(self, client_id: int, task: Message, floor: Floor):
        self.task_id = task.header["task"]
        self.setup = Setup.from_header(task.header.get("secagg"), client_id)
        floor.check(self.setup)
        self.protocol = ClientRound(client_id, self.setup, min_neighbours=floor.neighbours)
        self.input: np.ndarray | None = None
        self.weight = 0  # the weight it declares beside its masked input

    def answer(self, kind: Kind, header: dict, tensors: dict | None = None) -> bytes:
        return encode(Message(kind, {"task": self.task_id, "client": self.protocol.id, **header}, tensors or {}))

    def quantize(self, update: ClientUpdate, order: list[str]) -> None:
        """The update as the round's fixed point: its float entries in the global model's order,
        clipped to the round's bound, weighted by its example count (capped at the round's bound;
        1 under differential privacy)."""
        flat = torch.cat(
            [update.delta[k].detach().reshape(-1).cpu().double() for k in order if update.delta[k].is_floating_point()]
        )
        norm, clip = float(torch.linalg.vector_norm(flat)), self.setup.clip
        if norm > clip:
            flat = flat * (clip / norm)
            flat.clamp_(-clip, clip)
        weight = min(update.num_examples, self.setup.max_weight)
        if weight < update.num_examples and self.setup.max_weight > 1:
            log.warning(
                "client %d: %d examples weigh as %d, the round's bound", self.protocol.id, update.num_examples, weight
            )
        quantizer = Quantizer(self.setup.clients, clip, self.setup.max_weight)
        self.input, self.weight = quantizer.encode(flat.numpy(), weight, norm <= clip, update.train_loss), weight

    def respond(self, message: Message) -> bytes:
        h = message.header
        if message.kind == Kind.SA_NEIGHBOUR_KEYS:
            return self.answer(Kind.SA_SHARES, self.protocol.shares(h))
        if message.kind == Kind.SA_INPUT:
            if self.input is None:
                raise ProtocolError("no update to mask")
            masked, complaints = self.protocol.masked_input(h, self.input)
            return self.answer(
                Kind.SA_MASKED,
                {**complaints, "weight": self.weight},
                {"masked": torch.from_numpy(masked.view(np.int32))},
            )
        if message.kind == Kind.SA_UNMASK:
            return self.answer(Kind.SA_UNMASKED, self.protocol.unmask(h))
        raise ProtocolError(f"unexpected {message.kind.name}")


_SECAGG_REQUESTS = (Kind.SA_NEIGHBOUR_KEYS, Kind.SA_INPUT, Kind.SA_UNMASK)


def update_message(task_id: int, update: ClientUpdate, *, inputs_differ: bool = False) -> Message:
    """The UPDATE answering task `task_id`; `inputs_differ` (one flag, never the statistics): this
    client's inputs differ markedly from the server's test inputs (`compare_inputs`). Under
    personalized evaluation, "personalized": its personal model's metrics on its held-out examples
    and their count."""
    header: dict[str, Any] = {
        "task": task_id,
        "num_examples": update.num_examples,
        "num_steps": update.num_steps,
        "train_loss": update.train_loss,
        "train_accuracy": update.train_accuracy,
        "initial_loss": update.initial_loss,
        "metrics": dict(update.metrics),
    }
    if inputs_differ:
        header["inputs_differ"] = True
    if update.personalized is not None:
        metrics, count = update.personalized
        header["personalized"] = {"metrics": dict(metrics), "num_examples": count}
    tensors = {f"delta/{k}": v for k, v in update.delta.items()}
    tensors.update({f"extras/{k}": v for k, v in update.extras.items()})  # the client state stays here
    return Message(Kind.UPDATE, header, tensors)


def compare_inputs(summary, data: TensorData, client_id: int) -> bool:
    """Whether this client's training inputs differ markedly from the server's test inputs
    (`summary`, its welcome's `test_inputs`: network/inputs.py); warns on the console when they do."""
    if summary is None:
        return False
    try:
        theirs = InputSummary.from_header(summary)
    except ValueError as e:
        log.warning("client %d: ignored the server's summary of its test inputs: %s", client_id, e)
        return False
    mine = InputSummary.of(data.x)
    reason = "they are not one tensor of floats, the server's are" if mine is None else theirs.differs(mine)
    if reason is not None:
        log.warning(
            "client %d: this client's training inputs differ markedly from the test inputs the server "
            "evaluates on: %s. Are they prepared as the server's (range, shape)? This client's updates tell the "
            "server so (one flag).",
            client_id,
            reason,
        )
    return reason is not None


DEFAULT_GIVE_UP_AFTER = 600.0  # seconds without a server before a client exits with status 2


def connection_failure(error: grpc.RpcError, server: str, *, tls: bool, connected: bool) -> str:
    """What failed, in words, from gRPC's error: `connected` when this connection had brought
    messages before it broke; otherwise why it could not be made (refused, a name not resolved,
    a TLS handshake that failed)."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = error.details() if callable(getattr(error, "details", None)) else None
    last = details.rpartition("last error: ")[2][:200] if isinstance(details, str) else ""  # gRPC's own words
    text = last.lower()
    if connected:
        return f"connection lost ({name})"
    if "connection refused" in text:
        return f"cannot connect to {server}: connection refused (is the server running, on that port?)"
    if "resolv" in text or "domain name not found" in text or "name or service not known" in text:
        return f"cannot connect to {server}: its name could not be resolved"
    if "wrong_version_number" in text:  # an answer that is not TLS
        return f"cannot connect to {server}: TLS handshake failed: is the server using TLS? (without it, --insecure)"
    if any(
        sign in text
        for sign in (
            "certificate_verify_failed",
            "certificate verify failed",
            "signature failure",
            "unable to get local issuer",
            "hostname",
            "subject alt",
        )
    ):
        return (
            f"cannot connect to {server}: TLS handshake failed: the server's certificate is not one --root-cert "
            f"vouches for (signed by another CA, or for another host name)"
        )
    if "handshake" in text or "ssl" in text:
        return f"cannot connect to {server}: TLS handshake failed ({last})"
    if not tls and ("socket closed" in text or "connection reset" in text):
        return (
            f"cannot connect to {server}: the server closed the connection at once: is it using TLS? "
            f"(then --root-cert, not --insecure)"
        )
    if "timed out" in text or "timeout" in text or name == "DEADLINE_EXCEEDED":
        return f"cannot connect to {server}: no answer (timed out)"
    return f"cannot connect to {server} ({name}{': ' + last if last else ''})"


def _channel(server: str, root_cert: bytes | None, max_message_bytes: int) -> grpc.Channel:
    # Our own loop does the backing off: gRPC's (up to 120 s, shared by every channel to the same
    # server through the global subchannel pool) would otherwise keep a reconnect waiting. gRPC
    # refuses a message from the server past max_message_bytes before it is held whole.
    options = [o for o in channel_options(max_message_bytes) if o[0] != "grpc.max_receive_message_length"] + [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if root_cert is None:
        return grpc.insecure_channel(server, options=options)
    return grpc.secure_channel(server, grpc.ssl_channel_credentials(root_certificates=root_cert), options=options)


_SERVER_KINDS = (Kind.WELCOME, Kind.REJECT, Kind.TASK, Kind.EVALUATE, Kind.SHUTDOWN, *_SECAGG_REQUESTS)


def _stream(call, max_message_bytes: int):
    """The server's messages on `call`; one past max_message_bytes (refused by gRPC) as Unacceptable."""
    try:
        yield from call
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in str(e.details()):
            raise Unacceptable(f"a message larger than --max-message-mb ({max_message_bytes} bytes)") from None
        raise


def _received(raw: bytes, max_message_bytes: int) -> Message:
    """The message in `raw`, or Unacceptable: malformed, too large, or a kind only clients send."""
    try:
        message = decode(raw, max_bytes=max_message_bytes)
    except WireError as e:
        raise Unacceptable(f"a malformed message: {e}") from None
    if message.kind not in _SERVER_KINDS:
        raise Unacceptable(f"a {message.kind.name} message, which only clients send")
    if message.kind in (Kind.REJECT, Kind.SHUTDOWN, Kind.WELCOME) and message.tensors:
        raise Unacceptable(f"a {message.kind.name} message with tensors")
    return message


def run_client(
    server: str,
    client_id: int,
    secret: str,
    source: PartitionOf | LocalData | ClientApp,
    *,
    root_cert: bytes | None,
    compression: str | None = None,
    max_message_bytes: int = 256 << 20,
    max_backoff: float = 30.0,
    give_up_after: float | None = DEFAULT_GIVE_UP_AFTER,
    retry_on_server_failure: bool = False,
    secagg_floor: Floor = Floor(),
    limits: ClientLimits = ClientLimits(),
    references: References = References(),
    state_dir: str | Path | None = None,
) -> int:
    """Serve the federation until it shuts down; returns the exit status: 0 the run finished,
    1 refused (wrong secret, replaced by another process with this id), 2 no server for
    `give_up_after` seconds, 3 the server's run failed, or the server sent a message this client
    refuses (malformed, over `max_message_bytes`, beyond `limits`, or naming code `references`
    does not allow: one logged line).

    When the connection breaks (the server restarts, the network drops) or the server refuses
    for now (too many failed attempts from this address), the client reconnects with exponential
    backoff and jitter, up to `max_backoff` seconds between tries; it gives up after
    `give_up_after` seconds without a connection (None or math.inf: never); each failure is logged
    in words (`connection_failure`). With `retry_on_server_failure` a failed run, or a refused
    message, is waited out the same way (the server may come back with --resume). A secure
    aggregation round below `secagg_floor` is declined (the client tells the server why).

    What the client keeps between its rounds (its algorithm's client state, its optimizer's state)
    moves on when the server counts its update: each task says which of its updates counted, and
    the client commits or drops the state its last task left (network/state.py); a word that
    disagrees with what it holds is refused as a message is. With `state_dir`, both are written
    there after each task it trains and when the run ends, and read back when it starts, so that
    they survive a restart; a file that is damaged or does not fit the run is one ConfigError
    line. None: kept in memory only.
    """
    app = as_app(source)
    state_file = state_path(state_dir, client_id) if state_dir is not None else None
    references = dataclasses.replace(references, own_model=app.model is not None, own_task=app.task is not None)
    trainer: _Trainer | None = None
    inputs_differ = False  # from the server's test inputs, once welcomed
    secure: _SecureRound | None = None  # the secure aggregation round under way
    backoff, last_contact = 0.5, time.monotonic()
    metadata = ((CLIENT_ID_KEY, str(client_id)), (SECRET_KEY, secret))
    while True:
        outbox: queue.Queue = queue.Queue()
        received = False  # whether this connection brought any message
        channel = _channel(server, root_cert, max_message_bytes)
        try:
            stub = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)  # bytes as is
            for raw in _stream(stub(iter(outbox.get, None), metadata=metadata), max_message_bytes):
                message = _received(raw, max_message_bytes)
                last_contact, received = time.monotonic(), True
                if message.kind == Kind.REJECT:
                    reason = _text(message.header.get("reason", "no reason given"))
                    if message.header.get("retry") is not True:
                        raise Refused(reason)
                    log.warning("client %d: the server says: %s", client_id, reason)
                    break
                backoff = 0.5
                if message.kind == Kind.SHUTDOWN:
                    outbox.put(None)
                    if message.header.get("status") == "done":
                        if trainer is not None:
                            trainer.finish(client_id, message.header)
                        log.info("client %d: the server finished the run", client_id)
                        return EXIT_DONE
                    raise ServerFailed(_text(message.header.get("reason", "no reason given")))
                if message.kind == Kind.WELCOME:
                    if trainer is None:  # else a reconnect's welcome: the run this client joined goes on
                        trainer = _Trainer(
                            check_welcome(message.header, references), app, client_id, limits, state_file
                        )
                        inputs_differ = compare_inputs(message.header.get("test_inputs"), trainer.data, client_id)
                        log.info("client %d: joined (%d examples)", client_id, len(trainer.data))
                elif trainer is None:  # before the welcome (no secure round can be under way either)
                    if message.kind in (Kind.TASK, Kind.EVALUATE):
                        raise Unacceptable(f"a {message.kind.name} before its welcome")
                elif message.kind == Kind.EVALUATE:
                    outbox.put(encode(trainer.evaluation(client_id, message)))
                elif message.kind == Kind.TASK and "secagg" in message.header:
                    trainer.check(message)
                    secure = None
                    try:
                        secure = _SecureRound(client_id, message, secagg_floor)
                        flag = {"inputs_differ": True} if inputs_differ else {}  # as an UPDATE's header
                        outbox.put(secure.answer(Kind.SA_KEYS, {**secure.protocol.keys(), **flag}))
                        order = [k[len("global/") :] for k in message.tensors if k.startswith("global/")]
                        secure.quantize(trainer.train(client_id, message, privatize=False), order)
                    except (ProtocolError, QuantizationError, OutOfTime) as e:
                        log.warning(
                            "client %d: left secure aggregation round %r: %s", client_id, message.header.get("task"), e
                        )
                        if secure is None and type(message.header.get("task")) is int:  # it declined the round
                            outbox.put(
                                encode(
                                    Message(
                                        Kind.SA_KEYS,
                                        {"task": message.header["task"], "client": client_id, "refused": str(e)},
                                    )
                                )
                            )
                        secure = None
                elif (
                    message.kind in _SECAGG_REQUESTS
                    and secure is not None
                    and message.header.get("task") == secure.task_id
                ):
                    try:
                        outbox.put(secure.respond(message))
                    except (ProtocolError, QuantizationError) as e:
                        log.warning("client %d: left secure aggregation round %r: %s", client_id, secure.task_id, e)
                        secure = None
                elif message.kind == Kind.TASK:
                    try:
                        update = trainer.train(client_id, message)
                    except OutOfTime as e:
                        log.warning(
                            "client %d: left task %d after --max-round-seconds %g (%s); it sends nothing",
                            client_id,
                            message.header["task"],
                            limits.max_round_seconds,
                            e,
                        )
                        continue
                    outbox.put(
                        encode(
                            update_message(message.header["task"], update, inputs_differ=inputs_differ),
                            compression=compression,
                        )
                    )
        except Refused as e:
            log.error("client %d: refused by the server: %s", client_id, e)
            return EXIT_REFUSED
        except (ServerFailed, Unacceptable, DivergenceError, WireError) as e:
            # DivergenceError, WireError: training the server's task diverged, or gave an update that cannot be sent
            what = {ServerFailed: "the server's run failed", Unacceptable: "refused a message from the server"}.get(
                type(e), "the server's task cannot be trained"
            )
            if not retry_on_server_failure:
                log.error("client %d: %s: %s", client_id, what, e)
                return EXIT_SERVER_FAILED
            log.warning("client %d: %s (%s); waiting for it to come back", client_id, what, e)
        except grpc.RpcError as e:
            log.warning(
                "client %d: %s; retrying in %.1f s",
                client_id,
                connection_failure(e, server, tls=root_cert is not None, connected=received),
                backoff,
            )
        finally:
            outbox.put(None)
            channel.close()
            if received:  # the time without a server counts from the connection's end
                last_contact = time.monotonic()
        if give_up_after is not None and time.monotonic() - last_contact > give_up_after:
            log.error("client %d: no server for %.0f s; giving up", client_id, give_up_after)
            return EXIT_GAVE_UP
        time.sleep(backoff * random.uniform(0.5, 1.5))
        backoff = min(2 * backoff, max_backoff)


__all__ = [
    "DEFAULT_GIVE_UP_AFTER",
    "ClientLimits",
    "LocalData",
    "PartitionOf",
    "References",
    "as_app",
    "connection_failure",
    "run_client",
    "update_message",
]
