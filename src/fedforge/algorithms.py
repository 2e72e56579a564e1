"""Client algorithms: what a client does in a round beyond plain local training, as hooks.

A strategy decides how the server aggregates; a `ClientAlgorithm` decides what each client does
with the model it receives. It says:

- which entries of the model's state are *shared* (trained, sent, aggregated), *personal*
  (trained, kept by the client, never sent) or *frozen* (neither trained nor sent: the same on
  every client), by `Roles`;
- what the client keeps between its rounds (`init_state`: its initial value, made on the client's
  first round), and what it does with it after training (`finish`: the new state, and tensors
  sent to the server beyond the update, e.g. SCAFFOLD's control-variate change);
- how the local objective changes: `terms` (`optim.LocalTerms`, a gradient term linear in the
  parameters: FedProx's and Ditto's proximal terms, FedDyn's, SCAFFOLD's correction), which every
  kernel applies fused into the optimizer's step, or `loss_term`, any differentiable function of
  the parameters, added to the loss through autograd;
- how the round's training is split (`phases`): FedRep trains the head, then the body; Ditto
  trains the shared model, then a personal copy of it.

The hooks are pure functions over tensors (dicts of them), so that each engine runs the same
code: the sequential one on one client's tensors, the vectorized one on the clients' tensors
stacked along a leading dimension (`torch.vmap`), the Ray and network clients on their own.
Every tensor a hook gets or returns is one client's; the vectorized engine maps them over clients.

The built-in algorithms (`CLIENT_ALGORITHMS`, `--algorithm`) are below; a strategy may bring its
own (`Strategy.client_algorithm`: FedProx's, SCAFFOLD's, FedDyn's). To write one of your own,
subclass `ClientAlgorithm` (docs/algorithms.md walks through one).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .errors import ConfigError
from .optim import LocalTerms, State

if TYPE_CHECKING:
    from .contract import ClientPlan

SHARED, PERSONAL, FROZEN = "shared", "personal", "frozen"
ROLES = (SHARED, PERSONAL, FROZEN)

# Entry names, or a test of an entry: (its name in the state dict, the module that holds it).
Selector = Sequence[str] | Callable[[str, nn.Module], bool]


def _owner(model: nn.Module, name: str) -> nn.Module:
    """The module that holds state entry `name` (e.g. "features.1.running_mean" -> features[1])."""
    path = name.rpartition(".")[0]
    return model.get_submodule(path) if path else model


def _matching(model: nn.Module, names: Sequence[str], selector: Selector, role: str) -> set[str]:
    """The entries `selector` picks, each pattern required to match one at least."""
    if callable(selector):
        return {n for n in names if selector(n, _owner(model, n))}
    picked: set[str] = set()
    for pattern in selector:
        found = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not found:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise ConfigError(f"{role} pattern {pattern!r} matches no entry of the model (its entries: {shown})")
        picked |= found
    return picked


HEAD = ("@head",)  # the personal entries of FedPer and FedRep by default: the model's last layer


def head(model: nn.Module) -> list[str]:
    """The state entries of the model's last layer with parameters (its classifier, for FedPer and FedRep)."""
    last = None
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = name
    if last is None:
        raise ConfigError("the model has no parameters, so no head")
    prefix = f"{last}." if last else ""
    return [n for n in model.state_dict() if n.startswith(prefix) and "." not in n[len(prefix) :]]


@dataclass(frozen=True)
class Roles:
    """Which entries of the model's state are shared, personal or frozen (module docstring).

    Each of `personal`, `frozen` and `shared` is a list of `fnmatch` patterns over the state dict's
    names (e.g. "fc3.*"; `HEAD` picks the last layer) or a test `(name, module) -> bool` (FedBN's:
    the module is a BatchNorm). Every pattern must match an entry; an entry picked twice is an
    error. An entry picked by none is shared, except a parameter with `requires_grad=False`,
    which is frozen unless `shared` picks it (a pretrained base frozen by its owner).
    """

    personal: Selector = ()
    frozen: Selector = ()
    shared: Selector = ()

    def assign(self, model: nn.Module) -> RoleMap:
        names = list(model.state_dict())
        picked = {}
        for role in ROLES:
            selector = getattr(self, role)
            if selector == HEAD:
                selector = head(model)
            picked[role] = _matching(model, names, selector, role)
        for a, b in ((SHARED, PERSONAL), (SHARED, FROZEN), (PERSONAL, FROZEN)):
            twice = sorted(picked[a] & picked[b])
            if twice:
                raise ConfigError(f"entry {twice[0]!r} is picked as both {a} and {b}")
        # Every name of a tied parameter (a head tied to the frozen embedding is frozen too).
        no_grad = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        roles = {}
        for n in names:
            chosen = [role for role in ROLES if n in picked[role]]
            roles[n] = chosen[0] if chosen else FROZEN if n in no_grad else SHARED
        parameters = tuple(n for n, _ in model.named_parameters())
        return RoleMap(roles, parameters)

    @property
    def default(self) -> bool:
        return not (self.personal or self.frozen or self.shared)


@dataclass(frozen=True)
class RoleMap:
    """Each state entry's role, in the state dict's order, and which entries are parameters."""

    roles: Mapping[str, str]
    parameters: tuple[str, ...]

    def names(self, *roles: str) -> list[str]:
        return [n for n, r in self.roles.items() if r in roles]

    @property
    def shared(self) -> list[str]:
        return self.names(SHARED)

    @property
    def personal(self) -> list[str]:
        return self.names(PERSONAL)

    @property
    def all_shared(self) -> bool:
        return all(r == SHARED for r in self.roles.values())

    def trained(self, roles: Sequence[str]) -> list[str]:
        """The parameters a phase training `roles` updates (frozen ones never)."""
        return [n for n in self.parameters if self.roles[n] in roles and self.roles[n] != FROZEN]


def _split_names(roles: Sequence[str]) -> tuple[str, ...]:
    for role in roles:
        if role not in (SHARED, PERSONAL):
            raise ConfigError(f"a phase trains shared and/or personal entries, not {role!r}")
    return tuple(roles)


@dataclass(frozen=True)
class Phase:
    """One stretch of a client's local training in a round.

    `trains`: the roles whose parameters it updates (the others stay as they are); `epochs`: its
    local epochs (None: the round's); `copy`: it trains the client's personal copy of the model
    (Ditto's), kept in its state and never sent, instead of the model the client sends.

    Each phase draws its own batches: the first from the client's batch seed (so that a one-phase
    algorithm sees the batches plain training sees), the next ones from seeds derived from it.
    """

    trains: tuple[str, ...] = (SHARED, PERSONAL)
    epochs: int | None = None
    copy: bool = False

    def __post_init__(self):
        object.__setattr__(self, "trains", _split_names(self.trains))
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"a phase's epochs must be >= 1, got {self.epochs}")

    def plan(self, plan: ClientPlan) -> ClientPlan:
        """`plan` as this phase trains it: with the phase's epochs where it names them."""
        return replace(plan, epochs=self.epochs) if self.epochs else plan


def nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """The bytes of a table of tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def phase_seed(seed: int, phase: int) -> int:
    """The batch seed of phase `phase` of a client whose batch seed is `seed` (phase 0: `seed`)."""
    return seed if phase == 0 else (seed * 1_000_003 + 7_919 * phase) % (1 << 63)


@dataclass(frozen=True)
class ClientState:
    """What a client keeps between its rounds: its personal entries of the model (`personal`), its
    algorithm's own tensors (`algorithm`: SCAFFOLD's control variate, FedDyn's linear term), and
    its personal copy of the model (`copy`: Ditto's), each a table of tensors by name."""

    personal: State = field(default_factory=dict)
    algorithm: State = field(default_factory=dict)
    copy: State = field(default_factory=dict)

    PARTS: ClassVar[tuple[str, ...]] = ("personal", "algorithm", "copy")

    def flat(self) -> State:
        """One table, each name prefixed by its part ("personal/fc3.weight"): what a checkpoint or
        a client's disk holds."""
        return {f"{part}/{k}": v for part in self.PARTS for k, v in getattr(self, part).items()}

    @classmethod
    def from_flat(cls, tensors: Mapping[str, torch.Tensor]) -> ClientState:
        parts: dict[str, State] = {part: {} for part in cls.PARTS}
        for key, value in tensors.items():
            part, _, name = key.partition("/")
            if part not in parts or not name:
                raise ConfigError(f"client state entry {key!r} is not personal/, algorithm/ or copy/ NAME")
            parts[part][name] = value
        return cls(**parts)

    def nbytes(self) -> int:
        return nbytes(self.flat())


@dataclass(frozen=True)
class ClientAlgorithm:
    """Plain local training (FedAvg's clients), and the base of every client algorithm: override
    what yours does differently. See the module docstring for the hooks.

    `name` (a class attribute), `roles` (every entry shared by default) and `phases` say what it
    is; `has_loss_term` is whether it overrides `loss_term`. A hook gets the
    entries it concerns by name, one client's tensors, and must not change them in place.
    """

    name: ClassVar[str] = "fedavg"
    roles: Roles = field(default=Roles(), kw_only=True)

    @property
    def phases(self) -> tuple[Phase, ...]:
        """How the round's training is split (one phase, training every trainable entry, by default)."""
        return (Phase(),)

    @property
    def has_loss_term(self) -> bool:
        return type(self).loss_term is not ClientAlgorithm.loss_term

    @property
    def personalizes(self) -> bool:
        """Whether a client ends a round with a model of its own (personal entries or a copy):
        what personalized evaluation evaluates."""
        return bool(self.roles.personal) or any(p.copy for p in self.phases)

    @property
    def keeps_state(self) -> bool:
        """Whether a client keeps anything between its rounds (a model of its own, or state)."""
        return self.personalizes or type(self).init_state is not ClientAlgorithm.init_state

    def init_state(self, shared: State) -> State:
        """The client's algorithm state before its first round, from the global model's shared
        entries (the tensors it keeps; none by default)."""
        return {}

    def terms(self, phase: int, received: State, state: State, inputs: State) -> LocalTerms:
        """What phase `phase` adds to each trained parameter's gradient (`optim.LocalTerms`).

        `received` holds the model the client received this round (the global model's shared
        entries, its own personal ones) for the parameters the phase trains; `state` is its
        algorithm state, `inputs` what the server sent it beyond the model (`ClientPlan.inputs`).
        Offsets and corrections cover any of `received`'s names (a missing one is zero).
        """
        return LocalTerms(0.0)

    def loss_term(self, phase: int, params: State, received: State, state: State, inputs: State) -> torch.Tensor:
        """A scalar added to the local loss of each batch, differentiable in `params` (the trained
        parameters' current values); only called when a subclass defines it (`has_loss_term`)."""
        raise NotImplementedError

    def finish(
        self, received: State, trained: State, state: State, inputs: State, steps: torch.Tensor, lr: float
    ) -> tuple[State, State]:
        """After local training: the new algorithm state, and the extras sent to the server beside
        the update (tensors by name; none by default). `received` and `trained` are the shared
        entries before and after training, `steps` the optimizer steps taken (a 0-d tensor), `lr`
        the round's client learning rate."""
        return state, {}

    def inputs_like(self, shared: State) -> State:
        """Tensors shaped as the `inputs` a client may be sent (what a client checks a task's
        against; none by default)."""
        return {}

    def extras_like(self, shared: State) -> State:
        """Tensors shaped as the extras `finish` returns (what a server checks an update's against)."""
        return {}

    def with_roles(self, roles: Roles) -> ClientAlgorithm:
        """This algorithm with `roles` instead of its own (`--personal`, `--frozen`); itself when
        `roles` are the default ones."""
        return self if roles.default else replace(self, roles=roles)


PLAIN = ClientAlgorithm()


def proximal(received: State, mu: float) -> LocalTerms:
    """mu/2 ||w - w_received||^2: gradient mu w - mu w_received (decay mu, offset -mu w_received)."""
    if not mu:
        return LocalTerms(0.0)
    return LocalTerms(mu, {n: -mu * v for n, v in received.items()})


@dataclass(frozen=True)
class Proximal(ClientAlgorithm):
    """FedProx's clients (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"):
    loss + mu/2 ||w - w_global||^2."""

    mu: float = 0.01
    name: ClassVar[str] = "fedprox"

    def __post_init__(self):
        if not (self.mu >= 0 and math.isfinite(self.mu)):
            raise ConfigError(f"proximal_mu must be >= 0, got {self.mu}")

    def terms(self, phase, received, state, inputs):
        return proximal(received, self.mu)


@dataclass(frozen=True)
class ScaffoldClient(ClientAlgorithm):
    """SCAFFOLD's clients (Karimireddy et al. 2020, option II). The client keeps its control
    variate c_i (zero at first); the server sends its control c (`inputs`). Every step moves a
    parameter by -lr (c - c_i) too, outside the optimizer's state (`LocalTerms.correction`);
    after K steps, c_i+ = c_i - c - (w_trained - w_received) / (K lr), and the change c_i+ - c_i is
    sent to the server, which adds its sum / N to c."""

    name: ClassVar[str] = "scaffold"

    def init_state(self, shared):
        return {k: torch.zeros_like(v) for k, v in shared.items() if v.is_floating_point()}

    def terms(self, phase, received, state, inputs):
        return LocalTerms(0.0, None, {k: inputs[k] - state[k] for k in received if k in inputs})

    def finish(self, received, trained, state, inputs, steps, lr):
        scale = 1.0 / (steps * lr)
        new = {k: state[k] - inputs[k] - scale * (trained[k] - received[k]) for k in state}
        return new, {k: new[k] - state[k] for k in state}

    def inputs_like(self, shared):
        return self.init_state(shared)

    def extras_like(self, shared):
        return self.init_state(shared)


@dataclass(frozen=True)
class FedDynClient(ClientAlgorithm):
    """FedDyn's clients (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization"):
    loss - <g_i, w> + alpha/2 ||w - w_global||^2, where g_i, the client's state (zero at first),
    becomes g_i - alpha (w_trained - w_global) after each of its rounds."""

    alpha: float = 0.01
    name: ClassVar[str] = "feddyn"

    def __post_init__(self):
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"feddyn alpha must be > 0, got {self.alpha}")

    def init_state(self, shared):
        return {k: torch.zeros_like(v) for k, v in shared.items() if v.is_floating_point()}

    def terms(self, phase, received, state, inputs):
        a = self.alpha
        return LocalTerms(a, {n: -a * v - state[n] if n in state else -a * v for n, v in received.items()})

    def finish(self, received, trained, state, inputs, steps, lr):
        return {k: state[k] - self.alpha * (trained[k] - received[k]) for k in state}, {}


@dataclass(frozen=True)
class Ditto(ClientAlgorithm):
    """Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through
    Personalization"): the client trains the global model as FedAvg's do and sends it; then it
    trains its personal copy v (the global model at its first round), `epochs` local epochs of
    loss + lambda/2 ||v - w_global||^2, and keeps it. Its personal model is v."""

    lam: float = 0.1
    epochs: int | None = None
    name: ClassVar[str] = "ditto"

    def __post_init__(self):
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ConfigError(f"ditto lambda must be >= 0, got {self.lam}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"ditto epochs must be >= 1, got {self.epochs}")

    @property
    def phases(self) -> tuple[Phase, ...]:
        return (Phase(), Phase(epochs=self.epochs, copy=True))

    def terms(self, phase, received, state, inputs):
        return proximal(received, self.lam) if phase == 1 else LocalTerms(0.0)


@dataclass(frozen=True)
class FedPer(ClientAlgorithm):
    """FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers"): the
    head (the last layer, or the entries `roles` names personal) stays on each client; the body
    is shared. Local training trains both."""

    roles: Roles = field(default=Roles(personal=HEAD), kw_only=True)
    name: ClassVar[str] = "fedper"


@dataclass(frozen=True)
class FedRep(ClientAlgorithm):
    """FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated
    Learning"): the head is personal as in FedPer, but each round trains it first, alone, for
    `head_epochs` (the paper's 10), then the body alone for the round's local epochs."""

    head_epochs: int = 10
    roles: Roles = field(default=Roles(personal=HEAD), kw_only=True)
    name: ClassVar[str] = "fedrep"

    def __post_init__(self):
        if self.head_epochs < 1:
            raise ConfigError(f"fedrep head_epochs must be >= 1, got {self.head_epochs}")

    @property
    def phases(self) -> tuple[Phase, ...]:
        return (Phase(trains=(PERSONAL,), epochs=self.head_epochs), Phase(trains=(SHARED,)))


def is_batchnorm(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase)


@dataclass(frozen=True)
class FedBN(ClientAlgorithm):
    """FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
    Normalization"): every BatchNorm layer's weights and running statistics stay on the client."""

    roles: Roles = field(default=Roles(personal=is_batchnorm), kw_only=True)
    name: ClassVar[str] = "fedbn"


CLIENT_ALGORITHMS: dict[str, type[ClientAlgorithm]] = {
    "fedavg": ClientAlgorithm,
    "ditto": Ditto,
    "fedper": FedPer,
    "fedrep": FedRep,
    "fedbn": FedBN,
}


# Every built-in client algorithm by name, the strategies' own included: what a deployment client
# may be asked to run (a user's own runs only where the client's operator gives it).
BUILT_IN: dict[str, type[ClientAlgorithm]] = {
    **CLIENT_ALGORITHMS,
    "fedprox": Proximal,
    "scaffold": ScaffoldClient,
    "feddyn": FedDynClient,
}
MAX_OPTION = 1e6


def _options(cls: type[ClientAlgorithm]) -> dict[str, type]:
    """The numeric options of a built-in algorithm's class, by name: int or float."""
    found = {}
    for f in fields(cls):
        kind = {"float": float, "int": int, "int | None": int}.get(str(f.type))
        if kind is not None:
            found[f.name] = kind
    return found


MAX_PATTERNS = 32  # role patterns in an algorithm's description, each of at most MAX_PATTERN_CHARS
MAX_PATTERN_CHARS = 200


def _default_roles(cls: type[ClientAlgorithm]) -> Roles:
    """The roles an algorithm's class gives it."""
    default = next(f.default for f in fields(cls) if f.name == "roles")
    assert isinstance(default, Roles), "ClientAlgorithm's roles have a default"
    return default


def describe(algorithm: ClientAlgorithm) -> dict:
    """A built-in algorithm as a task message names it: {"name": ..., "options": {...}}, and its
    role patterns where they are not its class's ("personal", "frozen": lists of `fnmatch`
    patterns; a server's --personal and --frozen). A test of an entry (FedBN's) travels only as
    its class's default: code never goes on the wire."""
    cls = type(algorithm)
    default = _default_roles(cls) if BUILT_IN.get(algorithm.name) is cls else None
    roles = algorithm.roles
    patterns: dict[str, list[str]] = {}
    for role in (PERSONAL, FROZEN):
        selector = getattr(roles, role)
        if default is not None and selector != getattr(default, role):
            if callable(selector) or not all(isinstance(p, str) for p in selector):
                default = None  # a test of its own cannot travel
            else:
                patterns[role] = list(selector)
    if default is None or roles.shared != default.shared:
        raise ConfigError(
            f"client algorithm {algorithm.name} ({cls.__name__}, roles {roles}) cannot travel to deployment "
            "clients: they run built-in algorithms, with their own roles or personal and frozen name patterns"
        )
    options = {k: getattr(algorithm, k) for k in _options(type(algorithm)) if getattr(algorithm, k) is not None}
    return {"name": algorithm.name, "options": options, **patterns}


def _patterns(name: str, role: str, value: object) -> tuple[str, ...]:
    """A description's `role` patterns, checked: a list of at most MAX_PATTERNS printable strings."""
    if (
        not isinstance(value, list)
        or not 0 < len(value) <= MAX_PATTERNS
        or not all(isinstance(p, str) and 0 < len(p) <= MAX_PATTERN_CHARS and p.isprintable() for p in value)
    ):
        raise ConfigError(
            f"algorithm {name}: {role} must be 1 to {MAX_PATTERNS} name patterns of at most {MAX_PATTERN_CHARS} "
            "printable characters"
        )
    return tuple(value)


def from_description(description: object) -> ClientAlgorithm:
    """The built-in algorithm a task message names (`describe`); ConfigError (a safe one-line
    reason) for anything else: an unknown name, an unknown option, a value out of bounds, role
    patterns that are not a short list of short strings. (Whether each pattern matches an entry
    of the client's model is `Roles.assign`'s check.)"""
    if not isinstance(description, dict) or not {"name", "options"} <= set(description) <= {
        "name",
        "options",
        PERSONAL,
        FROZEN,
    }:
        raise ConfigError("algorithm must be {name, options} and optionally personal, frozen")
    name, options = description["name"], description["options"]
    cls = BUILT_IN.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"algorithm {str(name)[:40]!r} is not a built-in one")
    known = _options(cls)
    if not isinstance(options, dict) or not set(options) <= set(known):
        raise ConfigError(f"algorithm {name}: options must be among {sorted(known)}")
    for key, value in options.items():
        kind = known[key]
        if type(value) not in ((int,) if kind is int else (int, float)) or not abs(value) <= MAX_OPTION:
            raise ConfigError(f"algorithm {name}: {key} must be a {kind.__name__} within +-{MAX_OPTION:g}")
    default = _default_roles(cls)
    roles = Roles(
        personal=_patterns(name, PERSONAL, description[PERSONAL]) if PERSONAL in description else default.personal,
        frozen=_patterns(name, FROZEN, description[FROZEN]) if FROZEN in description else default.frozen,
    )
    algorithm = cls(**options)
    algorithm.phases  # noqa: B018 (its phases, checked when made)
    return algorithm if roles == default else replace(algorithm, roles=roles)


def check_loss_term(value: object, algorithm: ClientAlgorithm) -> torch.Tensor:
    """`value`, a loss term, if it is a scalar tensor; a one-line ConfigError otherwise."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(f"algorithm {algorithm.name}: loss_term must return a scalar tensor, got {shape}")
    return value


__all__ = [
    "BUILT_IN",
    "CLIENT_ALGORITHMS",
    "FROZEN",
    "HEAD",
    "PERSONAL",
    "PLAIN",
    "ROLES",
    "SHARED",
    "ClientAlgorithm",
    "ClientState",
    "Ditto",
    "FedBN",
    "FedDynClient",
    "FedPer",
    "FedRep",
    "Phase",
    "Proximal",
    "RoleMap",
    "Roles",
    "ScaffoldClient",
    "check_loss_term",
    "describe",
    "from_description",
    "head",
    "is_batchnorm",
    "nbytes",
    "phase_seed",
    "proximal",
]
