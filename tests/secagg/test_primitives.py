"""The primitives of secure aggregation: Shamir sharing, the cryptography, the fixed point."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedforge.secagg import crypto
from fedforge.secagg.crypto import _SMALL_ORDER, CryptoError, agree, new_key, public_bytes, small_order
from fedforge.secagg.quantize import COUNTERS, LOSS_BOUND, RING_MAX, QuantizationError, Quantizer
from fedforge.secagg.shamir import FIELD_BYTES, PRIME, SECRET_BYTES, ShareError, combine, split

FEW = settings(max_examples=50, deadline=None)


# -- Shamir -----------------------------------------------------------------------------------
@st.composite
def sharings(draw):
    """A secret, its holders' x values (distinct, >= 1), a threshold, and a random subset of
    `threshold` holders in random order."""
    secret = draw(st.binary(min_size=SECRET_BYTES, max_size=SECRET_BYTES))
    holders = draw(st.integers(1, 20))
    xs = draw(st.lists(st.integers(1, PRIME - 1), min_size=holders, max_size=holders, unique=True))
    threshold = draw(st.integers(1, holders))
    chosen = draw(st.permutations(xs))[:threshold]
    return secret, xs, threshold, chosen


@FEW
@given(sharings())
def test_shamir_any_threshold_shares_give_the_secret(case):
    secret, xs, t, chosen = case
    shares = split(secret, t, xs)
    assert sorted(shares) == sorted(xs)
    assert all(len(s) == FIELD_BYTES for s in shares.values())
    assert combine({x: shares[x] for x in chosen}, t) == secret


@FEW
@given(sharings())
def test_shamir_fewer_than_threshold_shares_refused(case):
    secret, xs, t, chosen = case
    shares = split(secret, t, xs)
    with pytest.raises(ShareError):
        combine({x: shares[x] for x in chosen[: t - 1]}, t)


@FEW
@given(sharings(), st.data())
def test_shamir_altered_share_does_not_give_the_secret(case, data):
    secret, xs, t, chosen = case
    shares = {x: split(secret, t, xs)[x] for x in chosen}
    victim = data.draw(st.sampled_from(chosen))
    position = data.draw(st.integers(0, FIELD_BYTES - 1))
    flip = data.draw(st.integers(1, 255))
    altered = bytearray(shares[victim])
    altered[position] ^= flip
    shares[victim] = bytes(altered)
    try:
        got = combine(shares, t)
    except ShareError:  # not a field element, or not a 32-byte secret: refused, also fine
        return
    assert got != secret


def test_shamir_split_refuses_bad_arguments():
    secret = bytes(range(SECRET_BYTES))
    with pytest.raises(ShareError):
        split(secret[:-1], 1, [1])
    with pytest.raises(ShareError):
        split(secret, 3, [1, 2])
    with pytest.raises(ShareError):
        split(secret, 0, [1, 2])
    with pytest.raises(ShareError):
        split(secret, 1, [0, 1])  # x = 0 would be the secret itself
    with pytest.raises(ShareError):
        split(secret, 1, [2, 2])
    shares = split(secret, 2, [1, 2, 3])
    with pytest.raises(ShareError):
        combine({1: shares[1], 2: shares[2][:-1]}, 2)


# -- crypto -----------------------------------------------------------------------------------
def test_expand_deterministic_sized_and_seed_dependent():
    seed, other = bytes(range(32)), bytes(range(1, 33))
    a, b, c = crypto.expand(seed, 1000), crypto.expand(seed, 1000), crypto.expand(other, 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.array_equal(a, b)
    assert np.mean(a == c) < 0.01
    assert np.array_equal(crypto.expand(seed, 10), a[:10])  # a prefix of the same stream
    assert crypto.expand(seed, 0).shape == (0,)
    assert crypto.expand(seed, 7).shape == (7,)


def test_expand_looks_uniform():
    words = crypto.expand(b"\x07" * 32, 100_000).astype(np.float64)
    std_of_mean = 2.0**32 / np.sqrt(12) / np.sqrt(len(words))
    assert abs(words.mean() - 2**31) < 5 * std_of_mean
    assert words.min() < 2**32 * 0.001 and words.max() > 2**32 * 0.999
    bits = np.unpackbits(crypto.expand(b"\x07" * 32, 100_000).view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.005
    assert len(np.unique(words)) > 99_000


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_expand_refuses_wrong_seed_length(length):
    with pytest.raises(CryptoError):
        crypto.expand(bytes(length), 10)


def test_agree_symmetric_and_label_separated():
    a, b, c = crypto.new_key(), crypto.new_key(), crypto.new_key()
    ab = crypto.agree(a, crypto.public_bytes(b), b"mask")
    assert len(ab) == crypto.KEY_BYTES
    assert ab == crypto.agree(b, crypto.public_bytes(a), b"mask")
    assert ab != crypto.agree(a, crypto.public_bytes(b), b"share")
    assert ab != crypto.agree(a, crypto.public_bytes(c), b"mask")
    with pytest.raises(CryptoError):
        crypto.agree(a, crypto.public_bytes(b)[:-1], b"mask")
    with pytest.raises(CryptoError):
        crypto.agree(a, bytes(32), b"mask")  # a low-order point


def test_private_key_round_trip():
    key = crypto.new_key()
    raw = crypto.private_bytes(key)
    assert crypto.public_bytes(crypto.private_from_bytes(raw)) == crypto.public_bytes(key)
    with pytest.raises(CryptoError):
        crypto.private_from_bytes(raw[:-1])


def test_seal_round_trip_and_tampering():
    key, other = bytes(range(32)), bytes(range(1, 33))
    plaintext, aad = b"the shares of client 3" * 5, b"round 1, 3 -> 4"
    sealed = crypto.seal(key, plaintext, aad)
    assert len(sealed) == crypto.NONCE_BYTES + len(plaintext) + crypto.TAG_BYTES
    assert plaintext not in sealed
    assert crypto.seal(key, plaintext, aad) != sealed  # a fresh nonce each time
    assert crypto.open_sealed(key, sealed, aad) == plaintext
    for position in (0, crypto.NONCE_BYTES, len(sealed) // 2, len(sealed) - 1):
        flipped = bytearray(sealed)
        flipped[position] ^= 1
        with pytest.raises(CryptoError):
            crypto.open_sealed(key, bytes(flipped), aad)
    with pytest.raises(CryptoError):
        crypto.open_sealed(key, sealed, b"round 1, 3 -> 5")
    with pytest.raises(CryptoError):
        crypto.open_sealed(other, sealed, aad)
    with pytest.raises(CryptoError):
        crypto.open_sealed(key, sealed[: crypto.NONCE_BYTES + crypto.TAG_BYTES - 1], aad)


def test_commitment_is_length_prefixed():
    assert crypto.commitment(b"ab", b"c") != crypto.commitment(b"a", b"bc")
    assert crypto.commitment(b"ab", b"c") == crypto.commitment(b"ab", b"c")
    assert len(crypto.commitment(b"x")) == 32


# -- quantize ---------------------------------------------------------------------------------
@st.composite
def rounds(draw):
    """A quantizer and the inputs of `count` <= clients clients: clipped deltas, weights, losses."""
    clients = draw(st.integers(1, 20))
    clip = draw(st.floats(1e-3, 1e3))
    max_weight = draw(st.integers(1, 100_000))
    count = draw(st.integers(1, clients))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    deltas = rng.uniform(-clip, clip, (count, 17))
    deltas *= np.minimum(1.0, clip / np.linalg.norm(deltas, axis=1, keepdims=True))  # clipped in L2, as clients do
    deltas[0] = 0
    deltas[0, 0] = clip  # the extremes are inputs too
    if count > 1:
        deltas[-1] = 0
        deltas[-1, 1] = -clip
    weights = [draw(st.integers(1, max_weight)) for _ in range(count)]
    unclipped = [draw(st.booleans()) for _ in range(count)]
    losses = rng.uniform(-10, 50, count)
    return Quantizer(clients, clip, max_weight), deltas, weights, unclipped, losses


@FEW
@given(rounds())
def test_quantizer_sum_decodes_within_error_bound(case):
    q, deltas, weights, unclipped, losses = case
    count = len(weights)
    inputs = [q.encode(d, w, u, loss) for d, w, u, loss in zip(deltas, weights, unclipped, losses, strict=True)]
    assert all(x.dtype == np.uint32 and x.shape == (q.length(deltas.shape[1]),) for x in inputs)
    total = np.zeros_like(inputs[0])
    for x in inputs:
        total += x  # mod 2^32, as the masked sum is
    got = q.decode(total, count, sum(weights))
    total_weight = sum(weights)
    assert got.weight == total_weight
    assert got.unclipped == sum(unclipped)
    assert got.count == count
    exact = (np.asarray(weights, dtype=np.float64)[:, None] * deltas).sum(axis=0) / total_weight
    bound = q.error_bound(count, total_weight)
    assert bound > 0
    assert np.abs(got.weighted_delta / total_weight - exact).max() <= bound * (1 + 1e-6) + 1e-12
    exact_loss = float(np.dot(weights, losses)) / total_weight
    loss_bound = count / (2 * q.loss_scale * total_weight)
    assert abs(got.loss - exact_loss) <= loss_bound * (1 + 1e-6) + 1e-12


@FEW
@given(st.integers(1, 20), st.floats(1e-3, 1e3), st.integers(1, 100_000), st.sampled_from([1.0, -1.0]))
def test_quantizer_extreme_sum_does_not_wrap(clients, clip, max_weight, sign):
    q = Quantizer(clients, clip, max_weight)
    extreme = np.zeros(5)
    extreme[0] = sign * clip  # the largest coordinate an input clipped to L2 norm `clip` has
    x = q.encode(extreme, max_weight, True, sign * LOSS_BOUND * 10)
    total = np.zeros_like(x)
    for _ in range(clients):
        total += x
    got = q.decode(total, clients, clients * max_weight)
    total_weight = clients * max_weight
    assert got.weight == total_weight and got.unclipped == clients
    assert np.sign(got.weighted_delta[0]) == sign and not got.projected
    assert np.abs(got.weighted_delta / total_weight - extreme).max() <= q.error_bound(clients, total_weight) * (
        1 + 1e-6
    )
    assert abs(got.loss - sign * LOSS_BOUND) <= clients / (2 * q.loss_scale * total_weight) * (1 + 1e-6)
    assert np.all(np.abs(total.view(np.int32)[:-COUNTERS].astype(np.int64)) <= RING_MAX)


def test_quantizer_error_bound_is_reached():
    q = Quantizer(3, 1.0, 10)
    half_step = 0.5 / q.scale  # rounds to 0 (to even): off by exactly the bound
    got = q.decode(q.encode(np.array([half_step, 0.25]), 1, True, 0.0), 1, 1)
    assert q.error_bound(1, 1) == pytest.approx(half_step, rel=1e-12)
    assert abs(got.weighted_delta[0] - half_step) == pytest.approx(q.error_bound(1, 1), rel=1e-6)


def test_quantizer_counters():
    q = Quantizer(4, 1.0, 100)
    inputs = [
        q.encode(np.zeros(3), 10, True, 2.0),
        q.encode(np.zeros(3), 30, False, 6.0),
        q.encode(np.zeros(3), 60, True, float("nan")),
        q.encode(np.zeros(3), 1, False, -1e9),
    ]
    total = sum(inputs[:2])
    got = q.decode(total, 2, 40)
    assert (got.weight, got.unclipped, got.count) == (40, 1, 2)
    assert got.loss == pytest.approx((10 * 2.0 + 30 * 6.0) / 40, abs=2 / (2 * q.loss_scale * 40))
    got = q.decode(inputs[2] + inputs[3], 2, 61)  # a NaN loss counts as LOSS_BOUND, others are clamped
    assert got.weight == 61 and got.unclipped == 1
    assert got.loss == pytest.approx((60 * LOSS_BOUND - LOSS_BOUND) / 61, abs=2 / (2 * q.loss_scale * 61))
    assert np.all(got.weighted_delta == 0)


@pytest.mark.parametrize(
    "clients, max_weight",
    [(1, RING_MAX), (2, RING_MAX // 2), (1000, 2**22), (1000, (RING_MAX - 1000) // 1000 + 1), (20, 2**27)],
)
def test_quantizer_refuses_a_weight_sum_that_could_wrap(clients, max_weight):
    assert clients * max_weight > RING_MAX - clients
    with pytest.raises(QuantizationError):
        Quantizer(clients, 1.0, max_weight)


@pytest.mark.parametrize("clients", [1, 2, 1000])
def test_quantizer_accepts_the_largest_weight_that_fits(clients):
    max_weight = (RING_MAX - clients) // clients
    q = Quantizer(clients, 1.0, max_weight)
    x = q.encode(np.ones(2), max_weight, False, 0.0)
    total = np.zeros_like(x)
    for _ in range(clients):
        total += x
    assert q.decode(total, clients, clients * max_weight).weight == clients * max_weight


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(clients=0, clip=1.0, max_weight=1),
        dict(clients=2.0, clip=1.0, max_weight=1),
        dict(clients=2, clip=0.0, max_weight=1),
        dict(clients=2, clip=-1.0, max_weight=1),
        dict(clients=2, clip=float("nan"), max_weight=1),
        dict(clients=2, clip=1.0, max_weight=0),
        dict(clients=2, clip=1.0, max_weight=1.5),
    ],
)
def test_quantizer_refuses_bad_parameters(kwargs):
    with pytest.raises(QuantizationError):
        Quantizer(**kwargs)


def test_quantizer_refuses_inputs_past_its_bounds():
    q = Quantizer(5, 2.0, 100)
    q.encode(np.array([2.0, -2.0, 2.0 * (1 + 1e-7)]), 100, True, 0.0)  # at the bound (and a hair over) is fine
    for delta in ([0.0, 2.01], [-2.01, 0.0], [np.inf, 0.0], [np.nan, 0.0]):
        with pytest.raises(QuantizationError):
            q.encode(np.array(delta), 1, True, 0.0)
    for weight in (0, -1, 101, 1.0, True):
        with pytest.raises(QuantizationError):
            q.encode(np.zeros(3), weight, True, 0.0)


def _changed(words: np.ndarray, index: int, change: int) -> np.ndarray:
    out = words.copy()
    out[index] = np.uint32((int(out[index]) + change) % 2**32)
    return out


def test_quantizer_decode_clamps_what_count_inputs_cannot_reach():
    """Words past what `count` clipped inputs can reach (a client's words past its bounds; masking
    hides whose) are clamped to that reach and counted: the round goes on, moved no further than an
    input within the bounds could move it. Declared weights the round cannot have are refused."""
    q = Quantizer(10, 1.0, 100)
    rng = np.random.default_rng(1)
    inputs = [
        q.encode(d / np.linalg.norm(d), w, True, 0.5)
        for d, w in zip(rng.uniform(-1, 1, (4, 20)), range(1, 5), strict=True)
    ]
    total = sum(inputs)
    honest = q.decode(total, 4, 10)
    assert honest.weight == 10 and honest.clamped == 0
    reach = 10 * q.clip * q.scale  # the most a coordinate of 4 inputs of total weight 10 can be, give or take 4
    for change in (2**30, -(2**30)):
        out = q.decode(_changed(total, 3, change), 4, 10)
        assert out.clamped == 1 and abs(out.weighted_delta[3]) <= (reach + 4) / q.scale
        assert out.projected and np.linalg.norm(out.weighted_delta - honest.weighted_delta) <= 2 * (10 * q.clip + 1e-3)
    zeros = sum(q.encode(np.zeros(20), w, True, 0.5) for w in range(1, 5))  # a sum of 0: its edge is in the ball
    for sign in (1, -1):
        edge = zeros.copy()
        edge[3] = np.uint32(sign * int(reach) % 2**32)
        at_edge = q.decode(edge, 4, 10)
        assert at_edge.clamped == 0 and at_edge.weighted_delta[3] == pytest.approx(sign * 10 * q.clip, rel=1e-6)
        edge[3] = np.uint32(sign * (int(reach) + 5) % 2**32)
        past = q.decode(edge, 4, 10)
        assert past.clamped == 1 and past.weighted_delta[3] == pytest.approx(sign * 10 * q.clip, rel=1e-6)
    for change, unclipped in ((5, 4), (-5, 0)):  # the unclipped count, clamped to [0, count]
        out = q.decode(_changed(total, -2, change), 4, 10)
        assert out.clamped == 1 and out.unclipped == unclipped
    out = q.decode(_changed(total, -1, 2**30), 4, 10)  # the loss counter
    assert out.clamped == 1 and abs(out.loss) <= 1e4 * (1 + 1e-6)
    for weight in (3, 401):  # declared weights fewer than one per input, or past the cap of each
        with pytest.raises(QuantizationError, match="declared weights"):
            q.decode(total, 4, weight)
    assert not honest.projected and np.linalg.norm(honest.weighted_delta) <= 10 * q.clip


def test_a_sum_past_the_inputs_l2_reach_is_scaled_down_to_it():
    """Every coordinate within the per-coordinate reach, but the sum's L2 norm past Σw · clip
    (which no sum of clipped inputs passes): scaled down to it, so a client that sent words past
    its bounds moves the sum by at most 2 Σw · clip in L2. Honest sums are untouched."""
    q = Quantizer(10, 1.0, 100)
    rng = np.random.default_rng(2)
    size = 400
    inputs = []
    for w in range(1, 5):
        delta = rng.normal(size=size)
        inputs.append(q.encode(delta / np.linalg.norm(delta), w, True, 0.5))  # norm exactly the clip
    total = sum(inputs)
    honest = q.decode(total, 4, 10)
    assert not honest.projected and honest.clamped == 0
    hostile = total.copy()
    hostile[:size] += np.uint32(int(0.5 * q.scale))  # half the clip on every coordinate: norm 10 past the ball
    out = q.decode(hostile, 4, 10)
    assert out.projected and out.clamped == 0
    ball = 10 * q.clip + 4 * 0.5 * np.sqrt(size) / q.scale
    assert np.linalg.norm(out.weighted_delta) == pytest.approx(ball, rel=1e-9)
    assert np.linalg.norm(out.weighted_delta - honest.weighted_delta) <= 2 * ball


def test_small_order_is_what_the_key_agreement_refuses():
    """Every key on the small-order list, with bit 255 clear or set, makes X25519 refuse (the
    all-zero secret); random keys, and keys one off each listed one, do not, and are not listed."""
    key = new_key()
    for listed in _SMALL_ORDER:
        for public in (listed, listed[:31] + bytes([listed[31] | 0x80])):
            assert small_order(public)
            with pytest.raises(CryptoError, match="low order"):
                agree(key, public, b"test")
        near = bytes([listed[0] ^ 0x02]) + listed[1:]
        if near not in _SMALL_ORDER:
            agree(key, near, b"test")
            assert not small_order(near)
    for _ in range(200):
        public = public_bytes(new_key())
        assert not small_order(public)
        agree(key, public, b"test")
    assert not small_order(bytes(31))
