"""One round of secure aggregation (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020) as two
state machines, with no network in them: `ClientRound` (one per client and round) and
`ServerRound` (the server's, relaying every message). The network engine carries their messages
(JSON headers, bytes as base64; the masked input as an int32 tensor); tests run them directly.

The stages, for the participants P of a round and each client i's neighbours N(i) (every other
participant for small rounds, a random Harary graph of degree k for large ones):

1. keys: i sends X25519 public keys: one channel key c_ij per neighbour j (the channel its shares
   travel on with j) and s_i (masks). U1: those who did.
2. shares: the server sends i the keys of N(i) in U1. i picks a self-mask seed b_i, splits b_i and
   its mask private key among N(i) in U1 and itself with threshold t (Shamir), seals each
   neighbour's pair of shares for it (ChaCha20-Poly1305 under the pair's c-key agreement), and
   commits to every share and to b_i (SHA-256). U2: those whose shares arrived.
3. input: the server forwards to i the sealed shares addressed to it by N(i) in U2, with their
   dealers' commitments to them. i opens and checks each; it reports a dealer j whose shares do
   not open or match, revealing its private c_ij, and does not mask with j. It sends
   y_i = x_i + PRG(b_i) + sum_{j it masks with, j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij) (mod 2^32),
   x_i its quantized input (quantize.py), with its weight w_i beside it (at most the round's cap).
   The server opens each reported share with the revealed key: a bad one puts its dealer out of
   the round, a good one the reporter (a false report); either is then treated as dropped.
   U3: those whose input arrived and who are not out.
4. unmask: the server tells i which of its neighbours in U2 are in U3 (survivors) and which are
   not (dropped). i reveals its shares of the survivors' b_j (and of its own b_i) and of the
   dropped ones' mask keys; never both for one client, and only once. The server checks each
   share against its dealer's commitment (a wrong share is refused and logged, the others
   suffice), rebuilds each survivor's b_j and each dropped client's mask key (checked against
   its seed commitment and its public key), and removes their masks from sum_{U3} y_i. A dealer
   whose shares give back another seed than it committed to fails the round, named
   (`SecAggFailed.culprits`), for the retry to go on without it.

Below t live holders for any secret the round fails (`SecAggFailed`) with nothing unmasked:
the server has then fewer than t shares of it, which reveal nothing. The server learns the sum
of the survivors' inputs (and their weights) and no single input, unless it colludes with t - 1
clients. Threat model (docs/secure-aggregation.md): an honest-but-curious server that relays
faithfully; clients may be hostile, and everything they send is checked, but under masking
nobody can check that a client's input is a well-clipped update (the sum's range is checked
after unmasking).
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..network.wire import is_number
from .crypto import (
    KEY_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    CryptoError,
    agree,
    commitment,
    expand,
    new_key,
    open_sealed,
    private_bytes,
    private_from_bytes,
    public_bytes,
    seal,
    small_order,
)
from .shamir import FIELD_BYTES, SECRET_BYTES, ShareError, combine, split

log = logging.getLogger("fedforge.secagg")

COMPLETE_UP_TO = 64  # "auto" neighbours: every pair up to this many participants, a Harary graph above
SEALED_BYTES = NONCE_BYTES + 2 * FIELD_BYTES + TAG_BYTES
DIGEST_BYTES = 32


class ProtocolError(ValueError):
    """A message that breaks the protocol; the reason is safe to log."""


class SecAggFailed(Exception):
    """The round cannot be unmasked (too few live holders, a dealer's inconsistent shares).
    `culprits`: the clients the failure is proven against (id -> why), to leave out of a retry."""

    def __init__(self, reason: str, culprits: Mapping[int, str] | None = None):
        super().__init__(reason)
        self.culprits = dict(culprits or {})


# -- parameters -------------------------------------------------------------------------------
def degree_for(count: int, neighbours: int | None) -> int:
    """Each participant's number of neighbours among `count`: `neighbours` (None: auto), made
    even and at most count - 1 (then every pair)."""
    if count <= 1:
        return 0
    if neighbours is None:
        if count <= COMPLETE_UP_TO:
            return count - 1
        neighbours = 2 * math.ceil(2 * math.log2(count))
    k = neighbours + neighbours % 2
    return count - 1 if k >= count - 1 else k


def threshold_for(spec: float | int, holders: int) -> int:
    """t for a secret split among `holders` (a client and its neighbours): a count, or a fraction
    f of the holders (t = floor(f * holders) + 1, at most `holders`). t must exceed half the
    holders: below that, a server that lies about who dropped could collect both of a client's
    secrets from different halves of its neighbours; and a count past the holders could never be met."""
    t = spec if type(spec) is int else min(holders, math.floor(spec * holders) + 1)
    if not 2 * t > holders:
        raise ProtocolError(f"threshold {t} of {holders} holders: it must be more than half of them")
    if t > holders:
        raise ProtocolError(f"threshold {t} exceeds the {holders} holders of each secret")
    return t


def neighbour_graph(ids: Sequence[int], degree: int, rng: random.Random) -> dict[int, tuple[int, ...]]:
    """Each id's neighbours: every other id when `degree` >= len(ids) - 1, else a Harary graph
    (each id linked to the degree / 2 nearest on either side of a ring in random order), drawn
    afresh each round: SecAgg+'s random graph, in which the server cannot choose who pairs with whom."""
    ids = list(ids)
    if degree >= len(ids) - 1:
        return {i: tuple(j for j in ids if j != i) for i in ids}
    if degree % 2:
        raise ValueError("a Harary graph's degree must be even")
    order = ids[:]
    rng.shuffle(order)
    n = len(order)
    return {
        order[p]: tuple(sorted(order[(p + d) % n] for d in range(-degree // 2, degree // 2 + 1) if d)) for p in range(n)
    }


def _x(client_id: int) -> int:
    """A client's point on the sharing polynomials (never 0, where the secret is)."""
    return client_id + 1


def _committed(pair) -> tuple[bytes, bytes] | None:
    """A dealer's commitments to one holder's two shares, from their base64 pair."""
    if not (isinstance(pair, list) and len(pair) == 2):
        return None
    return _bytes(pair[0], DIGEST_BYTES, "a commitment"), _bytes(pair[1], DIGEST_BYTES, "a commitment")


def _round_bytes(round_id: int) -> bytes:
    return round_id.to_bytes(8, "big")


def _aad(round_id: int, sender: int, recipient: int) -> bytes:
    return b"fedforge secagg share" + _round_bytes(round_id) + sender.to_bytes(8, "big") + recipient.to_bytes(8, "big")


def _mask_key(own, peer_public: bytes, round_id: int) -> bytes:
    return agree(own, peer_public, b"mask" + _round_bytes(round_id))


def _share_key(own, peer_public: bytes, round_id: int) -> bytes:
    """The key of the channel two clients' shares travel on, through the server."""
    return agree(own, peer_public, b"share" + _round_bytes(round_id))


def _share_commitment(round_id: int, dealer: int, holder: int, which: bytes, share: bytes) -> bytes:
    return commitment(
        b"share", _round_bytes(round_id), dealer.to_bytes(8, "big"), holder.to_bytes(8, "big"), which, share
    )


def _seed_commitment(round_id: int, dealer: int, seed: bytes) -> bytes:
    return commitment(b"seed", _round_bytes(round_id), dealer.to_bytes(8, "big"), seed)


# -- encoding ---------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes(value, length: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 4 * math.ceil(length / 3):
        raise ProtocolError(f"{what} is not {length} bytes in base64")
    try:
        data = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{what} is not base64") from None
    if len(data) != length:
        raise ProtocolError(f"{what} is not {length} bytes")
    return data


def _ids(value, allowed: Iterable[int], what: str) -> list[int]:
    allowed = set(allowed)
    if (
        not isinstance(value, list)
        or len(value) > len(allowed)
        or not all(type(i) is int for i in value)
        or len(set(value)) != len(value)
        or not set(value) <= allowed
    ):
        raise ProtocolError(f"{what} must list distinct clients among {len(allowed)} allowed")
    return value


def _by_id(value, allowed: Iterable[int], what: str) -> dict[int, object]:
    """A JSON object keyed by client ids (as strings), each among `allowed`."""
    allowed = set(allowed)
    if not isinstance(value, dict) or len(value) > len(allowed):
        raise ProtocolError(f"{what} must be an object of at most {len(allowed)} clients")
    out = {}
    for key, item in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 18) or int(key) not in allowed:
            raise ProtocolError(f"{what}: {key[:20]!r} is not one of the clients it may name")
        out[int(key)] = item
    return out


@dataclass(frozen=True)
class Setup:
    """What a client learns at the start of a round (the "secagg" entry of its task)."""

    round_id: int
    neighbours: tuple[int, ...]
    threshold: int
    clients: int  # the participants: the quantizer's n
    clip: float
    max_weight: int

    def to_header(self) -> dict:
        return {
            "round": self.round_id,
            "neighbours": list(self.neighbours),
            "threshold": self.threshold,
            "clients": self.clients,
            "clip": self.clip,
            "max_weight": self.max_weight,
        }

    @classmethod
    def from_header(cls, header, client_id: int, max_clients: int = 100_000) -> Setup:
        if not isinstance(header, dict):
            raise ProtocolError("secure aggregation settings missing")
        round_id, clients, t = header.get("round"), header.get("clients"), header.get("threshold")
        clip, max_weight = header.get("clip"), header.get("max_weight")
        if not (type(clients) is int and 2 <= clients <= max_clients):
            raise ProtocolError(f"clients {clients!r} out of range")
        neighbours = header.get("neighbours")
        if not (
            isinstance(neighbours, list)
            and 1 <= len(neighbours) < clients
            and all(type(j) is int and 0 <= j < 1 << 60 and j != client_id for j in neighbours)
            and len(set(neighbours)) == len(neighbours)
        ):
            raise ProtocolError("neighbours must be distinct other clients")
        if not (type(round_id) is int and round_id >= 0):
            raise ProtocolError(f"round {round_id!r} is not a count")
        if not (type(t) is int and 2 * t > len(neighbours) + 1 and t <= len(neighbours) + 1):
            raise ProtocolError(f"threshold {t!r} is not more than half of {len(neighbours) + 1} holders")
        if not (is_number(clip) and 0 < clip < 1e30) or not (type(max_weight) is int and max_weight >= 1):
            raise ProtocolError("clip or max_weight out of range")
        return cls(round_id, tuple(neighbours), t, clients, float(clip), max_weight)


@dataclass(frozen=True)
class Floor:
    """The smallest round a client joins (its own settings, never the server's): below it the
    masks hide too little. With 2 participants the other one may be the server's own key, and
    the sum then gives this client's update back exactly; with 1 neighbour, or a threshold of 1,
    the same holds for the pair or the one holder."""

    clients: int = 3
    neighbours: int = 2
    threshold: int = 2
    max_neighbours: int = 1000  # each costs a key agreement, shares and a mask: a server's 100,000 would take minutes

    def __post_init__(self):
        for name in ("clients", "neighbours", "threshold", "max_neighbours"):
            value = getattr(self, name)
            if not (type(value) is int and 2 <= value <= 100_000):
                raise ValueError(f"the secure round floor's {name} must be a count >= 2, got {value!r}")

    def check(self, setup: Setup) -> None:
        """ProtocolError with the reason when `setup` is below this floor (or gives this client
        more neighbours than `max_neighbours`)."""
        for name, have, need in (
            ("participants", setup.clients, self.clients),
            ("neighbours", len(setup.neighbours), self.neighbours),
            ("threshold", setup.threshold, self.threshold),
        ):
            if have < need:
                raise ProtocolError(
                    f"the round has {have} {name}, below this client's floor of {need}: too small "
                    f"to hide its update (the server could recover it)"
                )
        if len(setup.neighbours) > self.max_neighbours:
            raise ProtocolError(
                f"the round gives this client {len(setup.neighbours)} neighbours, more than its cap of "
                f"{self.max_neighbours}"
            )


# -- the client -------------------------------------------------------------------------------
class ClientRound:
    """One client's side of one round. Each method answers one of the server's messages, at most
    once, in order; anything else raises ProtocolError (the client then sends nothing more)."""

    def __init__(self, client_id: int, setup: Setup, *, min_neighbours: int = 0):
        """`min_neighbours`: mask only with at least that many neighbours whose shares opened and
        matched (the client's floor): a server that forwards it bad shares cannot leave its input
        under its self-mask alone, which the server could then remove with its neighbours' shares."""
        self.id, self.setup, self.min_neighbours = client_id, setup, min_neighbours
        # one channel key per neighbour: revealing one (to prove a neighbour's shares do not
        # open) exposes that pair's channel only
        self._c = {j: new_key() for j in setup.neighbours}
        self._s, self._seed = new_key(), os.urandom(SECRET_BYTES)
        self._stage = 0
        self._keys: dict[int, tuple[bytes, bytes]] = {}  # neighbours' (c, s) public keys
        self._own: tuple[bytes, bytes] | None = None  # this client's shares of its own secrets
        self._held: dict[int, tuple[bytes, bytes]] = {}  # neighbours' shares that opened: those it masks with

    def _advance(self, stage: int) -> None:
        if self._stage != stage:
            raise ProtocolError(f"stage {stage + 1} asked out of order (this client is at stage {self._stage + 1})")
        self._stage += 1

    def keys(self) -> dict:
        self._advance(0)
        return {"c": {str(j): b64(public_bytes(k)) for j, k in self._c.items()}, "s": b64(public_bytes(self._s))}

    def shares(self, header: dict) -> dict:
        self._advance(1)
        keys = _by_id(header.get("keys"), self.setup.neighbours, "keys")
        t = self.setup.threshold
        if len(keys) + 1 < t:
            raise ProtocolError(f"{len(keys)} neighbours left, fewer than the threshold {t} needs")
        for j, pair in keys.items():
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ProtocolError(f"keys of client {j} are not a pair")
            self._keys[j] = (_bytes(pair[0], KEY_BYTES, "a c key"), _bytes(pair[1], KEY_BYTES, "an s key"))
            if any(small_order(key) for key in self._keys[j]):  # no key agreement with them: a server's forgery
                raise ProtocolError(f"keys of client {j} are of small order")
        holders = [*sorted(keys), self.id]
        b_shares = split(self._seed, t, [_x(j) for j in holders])
        s_shares = split(private_bytes(self._s), t, [_x(j) for j in holders])
        r = self.setup.round_id
        self._own = (b_shares[_x(self.id)], s_shares[_x(self.id)])
        sealed, commitments = {}, {}
        for j in holders:
            b, s = b_shares[_x(j)], s_shares[_x(j)]
            commitments[str(j)] = [
                b64(_share_commitment(r, self.id, j, b"b", b)),
                b64(_share_commitment(r, self.id, j, b"s", s)),
            ]
            if j != self.id:
                key = _share_key(self._c[j], self._keys[j][0], r)
                sealed[str(j)] = b64(seal(key, b + s, _aad(r, self.id, j)))
        return {"shares": sealed, "commitments": commitments, "seed": b64(_seed_commitment(r, self.id, self._seed))}

    def masked_input(self, header: dict, vector: np.ndarray) -> tuple[np.ndarray, dict]:
        """`vector` (this client's quantized input) masked for the neighbours whose shares the
        server forwarded, opened and matched their dealer's commitments; and the complaints
        about the others (`{"complaints": {j: this pair's channel private key}}`): with that key
        the server opens j's sealed shares itself and finds out which of the two is lying."""
        self._advance(2)
        sealed = _by_id(header.get("shares"), self._keys, "shares")
        commitments = _by_id(header.get("commitments"), self._keys, "commitments")
        t, r = self.setup.threshold, self.setup.round_id
        if len(sealed) + 1 < t:
            raise ProtocolError(f"shares from {len(sealed)} neighbours, fewer than the threshold {t} needs")
        complaints = {}
        for j, text in sealed.items():
            try:
                key = _share_key(self._c[j], self._keys[j][0], r)
                pair = open_sealed(key, _bytes(text, SEALED_BYTES, "a sealed share"), _aad(r, j, self.id))
                b, s = pair[:FIELD_BYTES], pair[FIELD_BYTES:]
                if _committed(commitments.get(j)) != (
                    _share_commitment(r, j, self.id, b"b", b),
                    _share_commitment(r, j, self.id, b"s", s),
                ):
                    raise ProtocolError("they do not match their commitments")
                self._held[j] = (b, s)
            except (CryptoError, ProtocolError) as e:  # this client does not mask with j: it reports j
                log.warning("client %d: the shares of client %d are refused: %s; reported", self.id, j, e)
                complaints[str(j)] = b64(private_bytes(self._c[j]))
        if len(self._held) < self.min_neighbours:
            raise ProtocolError(
                f"the shares of only {len(self._held)} neighbours opened, below this client's floor of "
                f"{self.min_neighbours}: too few masks to hide its update"
            )
        masked = vector.astype(np.uint32, copy=True)
        masked += expand(self._seed, len(masked))
        for j in sorted(self._held):
            mask = expand(_mask_key(self._s, self._keys[j][1], r), len(masked))
            if self.id < j:
                masked += mask
            else:
                masked -= mask
        return masked, {"complaints": complaints}

    def unmask(self, header: dict) -> dict:
        self._advance(3)
        survivors = _ids(header.get("survivors"), self._held, "survivors")
        dropped = _ids(header.get("dropped"), self._held, "dropped")
        if set(survivors) & set(dropped):
            raise ProtocolError("a client named both a survivor and dropped")
        if len(survivors) + 1 < self.setup.threshold:
            raise ProtocolError(f"{len(survivors) + 1} survivors, fewer than the threshold {self.setup.threshold}")
        assert self._own is not None, "set by the stage that deals the shares, which _advance put before this one"
        b = {str(self.id): b64(self._own[0])}
        b.update({str(j): b64(self._held[j][0]) for j in survivors})
        s = {str(j): b64(self._held[j][1]) for j in dropped}
        return {"b": b, "s": s}


# -- the server -------------------------------------------------------------------------------
class ServerRound:
    """The server's side of one round: what to send each client at each stage, what to accept
    from it (`on_*` raise ProtocolError for a message that is refused: the client is then out of
    the round), and the unmasked sum (`result`)."""

    def __init__(
        self,
        round_id: int,
        participants: Sequence[int],
        *,
        threshold: float | int,
        neighbours: int | None,
        clip: float,
        max_weight: int,
        rng: random.Random | None = None,
    ):
        self.round_id = round_id
        self.participants = tuple(participants)
        if len(self.participants) < 2:
            raise SecAggFailed(f"{len(self.participants)} participants: secure aggregation needs at least 2")
        degree = degree_for(len(self.participants), neighbours)
        self.graph = neighbour_graph(self.participants, degree, rng or random.SystemRandom())
        try:
            self.threshold = threshold_for(threshold, degree + 1)
        except ProtocolError as e:
            raise SecAggFailed(str(e)) from None
        self.clip, self.max_weight = clip, max_weight
        self.keys: dict[int, tuple[dict[int, bytes], bytes]] = {}  # U1: (a channel key per neighbour, mask key)
        self._public: set[bytes] = set()
        self._sent_keys: dict[int, tuple[int, ...]] = {}
        self.sealed: dict[int, dict[int, str]] = {}  # U2: dealer -> holder -> sealed shares (base64)
        self._commitments: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        self._seed_commitments: dict[int, bytes] = {}
        self._forwarded: dict[int, tuple[int, ...]] = {}  # i -> the neighbours whose shares i was sent
        self._masks: dict[int, frozenset[int]] = {}  # i -> the neighbours i masks with (those it did not report)
        self.inputs: dict[int, np.ndarray] = {}  # U3
        self.weights: dict[int, int] = {}  # the weight each input declares, at most max_weight
        self._asked: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        self._b: dict[int, dict[int, bytes]] = {}  # dealer -> x -> verified share of its seed
        self._s: dict[int, dict[int, bytes]] = {}  # dealer -> x -> verified share of its mask key
        self.responded: set[int] = set()  # U4
        self.refused_shares: list[tuple[int, int]] = []  # (holder, dealer) of shares that failed their commitment
        self.excluded: dict[int, str] = {}  # clients put out of the round for what is proven against them, and why

    def setup(self, client_id: int) -> Setup:
        return Setup(
            self.round_id, self.graph[client_id], self.threshold, len(self.participants), self.clip, self.max_weight
        )

    def on_keys(self, client_id: int, header: dict) -> None:
        if client_id not in self.graph or client_id in self.keys:
            raise ProtocolError("keys from a client that is not a participant, or a second time")
        if "refused" in header:  # the client declines the round (below its floor): it says why
            raise ProtocolError(f"it declines the round: {str(header['refused'])[:300]!r}")
        differ = header.get("inputs_differ", False)  # a diagnostic the engine reads (network/inputs.py)
        if type(differ) is not bool:
            raise ProtocolError(f"inputs_differ {str(differ)[:40]!r} is not true or false")
        neighbours = set(self.graph[client_id])
        texts = _by_id(header.get("c"), neighbours, "c keys")
        if set(texts) != neighbours:
            raise ProtocolError(f"c keys for {len(texts)} of its {len(neighbours)} neighbours")
        c = {j: _bytes(text, KEY_BYTES, "a c key") for j, text in texts.items()}
        s = _bytes(header.get("s"), KEY_BYTES, "s key")
        mine = {s, *c.values()}
        if len(mine) != len(c) + 1 or mine & self._public:
            raise ProtocolError("a public key used twice")
        if any(small_order(key) for key in mine):  # a neighbour's key agreement with it would fail
            raise ProtocolError("a public key of low order")
        self._public |= mine
        self.keys[client_id] = (c, s)

    def neighbour_keys(self, client_id: int) -> dict:
        live = tuple(j for j in self.graph[client_id] if j in self.keys)
        self._sent_keys[client_id] = live
        return {"keys": {str(j): [b64(self.keys[j][0][client_id]), b64(self.keys[j][1])] for j in live}}

    def on_shares(self, client_id: int, header: dict) -> None:
        if client_id not in self._sent_keys or client_id in self.sealed:
            raise ProtocolError("shares from a client that was not sent its neighbours' keys, or a second time")
        expected = set(self._sent_keys[client_id])
        sealed = _by_id(header.get("shares"), expected, "shares")
        if set(sealed) != expected:
            raise ProtocolError(f"shares for {len(sealed)} of its {len(expected)} neighbours")
        for text in sealed.values():
            _bytes(text, SEALED_BYTES, "a sealed share")
        holders = expected | {client_id}
        commitments = _by_id(header.get("commitments"), holders, "commitments")
        if set(commitments) != holders:
            raise ProtocolError("commitments must cover every holder")
        checked = {}
        for j, pair in commitments.items():
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ProtocolError("a commitment is not a pair")
            checked[j] = (_bytes(pair[0], DIGEST_BYTES, "a commitment"), _bytes(pair[1], DIGEST_BYTES, "a commitment"))
        self._seed_commitments[client_id] = _bytes(header.get("seed"), DIGEST_BYTES, "the seed commitment")
        self._commitments[client_id] = checked
        self.sealed[client_id] = {j: text for j, text in sealed.items() if isinstance(text, str)}  # all, checked above

    def input_request(self, client_id: int) -> dict:
        dealers = tuple(j for j in self.graph[client_id] if j in self.sealed)
        self._forwarded[client_id] = dealers
        return {
            "shares": {str(j): self.sealed[j][client_id] for j in dealers},
            "commitments": {str(j): [b64(d) for d in self._commitments[j][client_id]] for j in dealers},
        }

    def on_input(self, client_id: int, vector: np.ndarray, length: int, header: dict | None = None) -> None:
        """The masked input of `client_id` and its complaints (`header`): each names a neighbour
        whose shares did not open or match their commitments, with the pair's channel private
        key. The server opens those shares itself: when they are bad the dealer is out of the
        round (`excluded`; treated as dropped: its input is not summed, its mask key is rebuilt
        for the neighbours that mask with it), when they are good the complaint was false and
        the accuser is out (ProtocolError)."""
        if client_id in self.excluded:
            raise ProtocolError(f"it is out of the round: {self.excluded[client_id]}")
        if client_id not in self._forwarded or client_id in self.inputs:
            raise ProtocolError("an input without the shares it masks with, or a second one")
        if vector.dtype != np.uint32 or vector.shape != (length,):
            raise ProtocolError(f"the masked input must be {length} 32-bit words, got {vector.shape} {vector.dtype}")
        header = header or {}
        weight = header.get("weight")
        if not (type(weight) is int and 1 <= weight <= self.max_weight):
            raise ProtocolError(f"its weight {weight!r} is not between 1 and the round's cap {self.max_weight}")
        complaints = _by_id(header.get("complaints", {}), self._forwarded[client_id], "complaints")
        culprits = {}
        for dealer, text in complaints.items():
            culprit, why = self._judge(client_id, dealer, _bytes(text, KEY_BYTES, "a channel key"))
            if culprit == client_id:
                self.excluded[client_id] = why
                raise ProtocolError(why)
            culprits[dealer] = why
        for dealer, why in culprits.items():
            self.excluded.setdefault(dealer, why)
            self.inputs.pop(dealer, None)
            self.weights.pop(dealer, None)
        self._masks[client_id] = frozenset(self._forwarded[client_id]) - set(complaints)
        self.inputs[client_id] = vector
        self.weights[client_id] = weight

    def _judge(self, holder: int, dealer: int, private: bytes) -> tuple[int, str]:
        """Who is lying, `holder` that reports `dealer`'s shares, revealing its channel key for the
        pair, or `dealer`: (the culprit, why)."""
        if self.excluded.get(dealer):
            return dealer, self.excluded[dealer]
        try:
            key = private_from_bytes(private)
        except (CryptoError, ValueError):
            return holder, f"it reported client {dealer}'s shares with a channel key that is not one"
        if public_bytes(key) != self.keys[holder][0][dealer]:
            return holder, f"it reported client {dealer}'s shares with a channel key that is not its own"
        r = self.round_id
        try:
            sealed = _bytes(self.sealed[dealer][holder], SEALED_BYTES, "a sealed share")
            pair = open_sealed(_share_key(key, self.keys[dealer][0][holder], r), sealed, _aad(r, dealer, holder))
        except (CryptoError, ProtocolError):
            return dealer, f"its shares for client {holder} do not open"
        b, s = pair[:FIELD_BYTES], pair[FIELD_BYTES:]
        if self._commitments[dealer][holder] != (
            _share_commitment(r, dealer, holder, b"b", b),
            _share_commitment(r, dealer, holder, b"s", s),
        ):
            return dealer, f"its shares for client {holder} do not match its commitments"
        return holder, f"it reported client {dealer}'s shares, which open and match their commitments"

    def enough_inputs(self) -> bool:
        return len(self.inputs) >= self.threshold

    def unmask_request(self, client_id: int) -> dict:
        mine = set(self._masks[client_id])
        survivors, dropped = mine & set(self.inputs), mine - set(self.inputs)
        self._asked[client_id] = (frozenset(survivors), frozenset(dropped))
        return {"survivors": sorted(survivors), "dropped": sorted(dropped)}

    def on_unmasked(self, client_id: int, header: dict) -> None:
        if client_id not in self._asked or client_id in self.responded:
            raise ProtocolError("shares to unmask from a client that was not asked, or a second time")
        survivors, dropped = self._asked[client_id]
        b = _by_id(header.get("b"), survivors | {client_id}, "b shares")
        s = _by_id(header.get("s"), dropped, "s shares")
        found = [(dealer, _bytes(text, FIELD_BYTES, "a share"), b"b", self._b) for dealer, text in b.items()]
        found += [(dealer, _bytes(text, FIELD_BYTES, "a share"), b"s", self._s) for dealer, text in s.items()]
        for dealer, share, which, into in found:
            expected = self._commitments[dealer][client_id][0 if which == b"b" else 1]
            if _share_commitment(self.round_id, dealer, client_id, which, share) != expected:
                log.warning(
                    "round %d: client %d's share of client %d's %s does not match its commitment; refused",
                    self.round_id,
                    client_id,
                    dealer,
                    "self-mask seed" if which == b"b" else "mask key",
                )
                self.refused_shares.append((client_id, dealer))  # it had checked that share: it lies now
                self.excluded.setdefault(
                    client_id, f"it revealed a share of client {dealer}'s secrets that is not the one it was dealt"
                )
                continue
            into.setdefault(dealer, {})[_x(client_id)] = share
        self.responded.add(client_id)

    def result(self) -> np.ndarray:
        """sum_{U3} x_i mod 2^32: the survivors' inputs, their masks removed. SecAggFailed when
        some secret has fewer than t verified shares or does not match its dealer's commitment."""
        if not self.enough_inputs():
            raise SecAggFailed(f"{len(self.inputs)} inputs, below the threshold {self.threshold}")
        t, r = self.threshold, self.round_id
        total = np.zeros_like(next(iter(self.inputs.values())))
        for vector in self.inputs.values():
            total += vector
        for i in self.inputs:
            shares = self._b.get(i, {})
            if len(shares) < t:
                raise SecAggFailed(f"client {i}'s self-mask: {len(shares)} verified shares, the threshold is {t}")
            seed = _combine(shares, t, f"client {i}'s self-mask")
            if _seed_commitment(r, i, seed) != self._seed_commitments[i]:
                why = "it dealt shares that do not give back the seed it committed to"
                raise SecAggFailed(f"client {i} dealt shares that do not give back the seed it committed to", {i: why})
            total -= expand(seed, len(total))
        for j in sorted(set(self.sealed) - set(self.inputs)):  # shared, then sent no (accepted) input
            partners = [i for i in self.inputs if j in self._masks[i]]
            if not partners:
                continue
            shares = self._s.get(j, {})
            if len(shares) < t:
                raise SecAggFailed(
                    f"dropped client {j}'s mask key: {len(shares)} verified shares, the threshold is {t}"
                )
            key = private_from_bytes(_combine(shares, t, f"client {j}'s mask key"))
            if public_bytes(key) != self.keys[j][1]:
                raise SecAggFailed(
                    f"client {j} dealt shares that do not give back its mask key",
                    {j: "it dealt shares that do not give back its mask key"},
                )
            for i in partners:
                mask = expand(_mask_key(key, self.keys[i][1], r), len(total))
                if i < j:
                    total -= mask
                else:
                    total += mask
        return total


def _combine(shares: Mapping[int, bytes], t: int, what: str) -> bytes:
    try:
        return combine(shares, t)
    except ShareError as e:
        raise SecAggFailed(f"{what}: {e}") from None
