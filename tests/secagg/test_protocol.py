"""One round of secure aggregation, its two state machines driven in-process: the exact sum
under dropouts, failure below the threshold, masking, the SecAgg+ graph, hostile messages."""

from __future__ import annotations

import base64
import copy
import logging
import os
import random

import numpy as np
import pytest

from fedforge.secagg.crypto import agree, expand, new_key, private_bytes, public_bytes
from fedforge.secagg.protocol import (
    COMPLETE_UP_TO,
    SEALED_BYTES,
    ClientRound,
    Floor,
    ProtocolError,
    SecAggFailed,
    ServerRound,
    Setup,
    b64,
    degree_for,
    neighbour_graph,
    threshold_for,
)
from fedforge.secagg.quantize import Quantizer

STAGES = ("keys", "shares", "input", "unmask")  # a client dropped at a stage sends no answer to it


class Round:
    """A server and its clients, each stage run for the clients still in, minus those dropped."""

    def __init__(self, ids, *, length=64, threshold=0.5, neighbours=None, seed=0, inputs=None, weights=None):
        self.ids, self.length = list(ids), length
        self.server = ServerRound(
            7, self.ids, threshold=threshold, neighbours=neighbours, clip=1.0, max_weight=100, rng=random.Random(seed)
        )
        self.clients = {i: ClientRound(i, Setup.from_header(self.server.setup(i).to_header(), i)) for i in self.ids}
        rng = np.random.default_rng(seed)
        self.inputs = inputs or {i: rng.integers(0, 2**32, length, dtype=np.uint32) for i in self.ids}
        self.masked: dict[int, np.ndarray] = {}
        self.weights = weights or dict.fromkeys(self.ids, 1)  # what each declares beside its input

    def keys(self, drop=()):
        for i in self.ids:
            if i not in drop:
                self.server.on_keys(i, self.clients[i].keys())

    def shares(self, drop=()):
        for i in sorted(self.server.keys):
            header = self.server.neighbour_keys(i)
            if i not in drop:
                self.server.on_shares(i, self.clients[i].shares(header))

    def input(self, drop=()):
        for i in sorted(self.server.sealed):
            header = self.server.input_request(i)
            if i not in drop:
                self.masked[i], complaints = self.clients[i].masked_input(header, self.inputs[i])
                complaints["weight"] = self.weights[i]
                if i in self.server.excluded:  # reported by a neighbour that sent its input first
                    with pytest.raises(ProtocolError, match="out of the round"):
                        self.server.on_input(i, self.masked[i], self.length, complaints)
                    continue
                self.server.on_input(i, self.masked[i], self.length, complaints)

    def unmask(self, drop=(), tamper=None):
        for i in sorted(self.server.inputs):
            header = self.server.unmask_request(i)
            if i not in drop:
                answer = self.clients[i].unmask(header)
                self.server.on_unmasked(i, tamper(i, answer) if tamper else answer)

    def run(self, drops=None, tamper=None):
        drops = drops or {}
        self.keys(drops.get("keys", ()))
        self.shares(drops.get("shares", ()))
        self.input(drops.get("input", ()))
        self.unmask(drops.get("unmask", ()), tamper)
        return self.server.result()

    def expected(self) -> np.ndarray:
        total = np.zeros(self.length, dtype=np.uint32)
        for i in self.server.inputs:
            total += self.inputs[i]
        return total


def flip_byte(text: str, position: int = 10) -> str:
    data = bytearray(base64.b64decode(text))
    data[position] ^= 0x5A
    return b64(bytes(data))


# -- the exact sum ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 10])
def test_all_alive_gives_the_exact_sum(n):
    r = Round(range(n))
    total = r.run()
    assert total.dtype == np.uint32
    assert sorted(r.server.inputs) == list(range(n)) and r.server.responded == set(range(n))
    assert np.array_equal(total, r.expected())
    assert not r.server.refused_shares


def test_sparse_ids_and_quantized_inputs_decode():
    ids = [5, 17, 10**9, 3, 42, 2**40]
    q = Quantizer(len(ids), 1.0, 100)
    rng = np.random.default_rng(3)
    deltas = {
        i: d / np.linalg.norm(d) for i, d in zip(ids, rng.uniform(-1, 1, (len(ids), 30)), strict=True)
    }  # clipped to 1
    weights = {i: int(w) for i, w in zip(ids, rng.integers(1, 101, len(ids)), strict=True)}
    r = Round(
        ids,
        length=q.length(30),
        inputs={i: q.encode(deltas[i], weights[i], i % 2 == 0, 0.5) for i in ids},
        weights=weights,
    )
    got = q.decode(r.run(), len(ids), sum(r.server.weights.values()))
    total_weight = sum(weights.values())
    assert got.weight == total_weight and got.unclipped == 3
    exact = sum(weights[i] * deltas[i] for i in ids) / total_weight
    assert np.abs(got.weighted_delta / total_weight - exact).max() <= q.error_bound(len(ids), total_weight) * 1.000001


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_at_each_stage_give_the_survivors_sum(stage, count):
    r = Round(range(10), seed=count)
    dropped = set(random.Random(f"{stage}{count}").sample(range(10), count))
    total = r.run({stage: dropped})
    assert r.server.threshold == 6
    survivors = set(range(10)) - dropped if stage != "unmask" else set(range(10))
    assert set(r.server.inputs) == survivors
    assert np.array_equal(total, r.expected())
    everyone = np.zeros(r.length, dtype=np.uint32)
    for i in range(10):
        everyone += r.inputs[i]
    assert np.array_equal(total, everyone) == (stage == "unmask")


def test_one_dropout_at_every_stage():
    r = Round(range(10), seed=11)
    total = r.run({"keys": {9}, "shares": {0}, "input": {4}, "unmask": {7}})
    assert set(r.server.inputs) == {1, 2, 3, 5, 6, 7, 8}
    assert r.server.responded == {1, 2, 3, 5, 6, 8}
    assert np.array_equal(total, r.expected())


@pytest.mark.parametrize("neighbours", [2, 4])
def test_sparse_graph_with_dropouts(neighbours):
    r = Round(range(12), neighbours=neighbours, seed=neighbours)
    graph = r.server.graph
    assert all(len(graph[i]) == neighbours and all(i in graph[j] for j in graph[i]) for i in range(12))
    assert r.server.threshold == neighbours // 2 + 1
    # two far apart, so that every secret keeps t live holders
    far = next(j for j in range(12) if j != 3 and j not in graph[3] and not set(graph[3]) & set(graph[j]))
    total = r.run({"shares": {3}, "input": {far}})
    assert set(r.server.inputs) == set(range(12)) - {3, far}
    assert np.array_equal(total, r.expected())


# -- below the threshold ----------------------------------------------------------------------
def test_too_few_inputs_fails():
    r = Round(range(10))
    r.keys()
    r.shares()
    r.input(drop={0, 1, 2, 3, 4})
    assert not r.server.enough_inputs()
    with pytest.raises(SecAggFailed, match="threshold"):
        r.server.result()
    with pytest.raises(ProtocolError):  # and a client refuses to unmask for fewer than t survivors
        r.clients[5].unmask(r.server.unmask_request(5))


@pytest.mark.parametrize("drops", [{"unmask": {0, 1, 2, 3, 4}}, {"input": {0, 1, 2, 3}, "unmask": {4}}])
def test_too_few_unmask_answers_fails(drops):
    r = Round(range(10))
    with pytest.raises(SecAggFailed, match="verified shares"):
        r.run(drops)
    assert len(r.server.responded) == 5


def test_server_refuses_impossible_thresholds():
    with pytest.raises(SecAggFailed):
        ServerRound(1, range(10), threshold=5, neighbours=None, clip=1.0, max_weight=1)
    with pytest.raises(SecAggFailed):
        ServerRound(1, range(10), threshold=0.4, neighbours=None, clip=1.0, max_weight=1)
    with pytest.raises(SecAggFailed):
        ServerRound(1, range(10), threshold=11, neighbours=None, clip=1.0, max_weight=1)
    with pytest.raises(SecAggFailed):
        ServerRound(1, [3], threshold=0.5, neighbours=None, clip=1.0, max_weight=1)
    assert ServerRound(1, range(10), threshold=6, neighbours=None, clip=1.0, max_weight=1).threshold == 6


# -- masking ----------------------------------------------------------------------------------
def test_masked_inputs_hide_each_input():
    r = Round(range(6), length=2000, seed=5)
    r.keys()
    r.shares()
    r.input(drop={2})
    for i, masked in r.masked.items():
        x, client = r.inputs[i], r.clients[i]
        assert np.mean(masked != x) > 0.99
        pair_masks = {}
        for j in r.server._forwarded[i]:
            mask = expand(agree(client._s, r.server.keys[j][1], b"mask" + (7).to_bytes(8, "big")), r.length)
            pair_masks[j] = mask if i < j else -mask
        self_mask = expand(client._seed, r.length)
        assert len(pair_masks) == 5  # 2 sent shares, so the others mask with it
        for mask in [self_mask, *pair_masks.values()]:  # no one seed unmasks it
            assert np.mean(masked - mask != x) > 0.99
        assert np.mean(masked - sum(pair_masks.values()) != x) > 0.99  # the self-mask alone hides it
        assert np.array_equal(masked - self_mask - sum(pair_masks.values()), x)  # y = x + PRG(b) +- PRG(s_ij)
    assert np.mean(r.masked[0] != r.masked[1]) > 0.99


# -- SecAgg+: the Harary graph ----------------------------------------------------------------
def test_harary_graph_of_100():
    ids = list(range(100))
    degree = degree_for(100, None)
    assert degree == 28 < 99
    r = Round(ids, length=50, seed=2)
    graph = r.server.graph
    assert sorted(graph) == ids
    assert all(len(graph[i]) == degree == len(set(graph[i])) and i not in graph[i] for i in ids)
    assert all(i in graph[j] for i in ids for j in graph[i])
    assert r.server.threshold == threshold_for(0.5, degree + 1) == 15
    assert all(r.clients[i].setup.neighbours == graph[i] for i in ids)
    dropped = set(random.Random(0).sample(ids, 10))
    total = r.run({"unmask": dropped})
    assert len(r.server.inputs) == 100 and r.server.responded == set(ids) - dropped
    assert np.array_equal(total, r.expected())


def test_neighbour_graph_is_fresh_and_regular():
    ids = list(range(30))
    a, b = neighbour_graph(ids, 6, random.Random(1)), neighbour_graph(ids, 6, random.Random(2))
    assert a != b
    for g in (a, b):
        assert all(len(g[i]) == 6 and all(i in g[j] for j in g[i]) for i in ids)
    assert neighbour_graph(ids, 29, random.Random(1))[4] == tuple(j for j in ids if j != 4)
    with pytest.raises(ValueError):
        neighbour_graph(ids, 5, random.Random(1))


@pytest.mark.parametrize(
    "count, neighbours, degree",
    [
        (1, None, 0),
        (2, None, 1),
        (COMPLETE_UP_TO, None, 63),
        (65, None, 26),
        (100, None, 28),
        (10, 3, 4),
        (10, 4, 4),
        (10, 8, 8),
        (10, 9, 9),
        (10, 50, 9),
    ],
)
def test_degree_for(count, neighbours, degree):
    assert degree_for(count, neighbours) == degree


# -- parameters -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, holders, t",
    [(0.5, 10, 6), (0.5, 9, 5), (0.99, 10, 10), (6, 10, 6), (10, 10, 10), (1, 1, 1), (0.5, 2, 2), (0.75, 29, 22)],
)
def test_threshold_for(spec, holders, t):
    assert threshold_for(spec, holders) == t


@pytest.mark.parametrize("spec, holders", [(5, 10), (1, 10), (0, 10), (0.4, 10), (0.3, 10), (4, 9), (1, 2)])
def test_threshold_for_refuses_half_or_less(spec, holders):
    with pytest.raises(ProtocolError, match="more than half"):
        threshold_for(spec, holders)


def _header(**changes):
    header = {"round": 3, "neighbours": [1, 2, 3, 4], "threshold": 3, "clients": 10, "clip": 1.0, "max_weight": 100}
    header.update(changes)
    return header


def test_setup_header_round_trip():
    setup = Setup.from_header(_header(), 0)
    assert setup == Setup(3, (1, 2, 3, 4), 3, 10, 1.0, 100)
    assert Setup.from_header(setup.to_header(), 0) == setup
    assert Setup.from_header(_header(clip=2), 0).clip == 2.0


@pytest.mark.parametrize(
    "changes",
    [
        dict(threshold=2),
        dict(threshold=1),
        dict(threshold=6),
        dict(threshold=0),  # 5 holders: t in 3..5
        dict(neighbours=[1, 2, 0, 4]),
        dict(neighbours=[1, 2, 2, 4]),
        dict(neighbours=[]),
        dict(neighbours=list(range(1, 11))),
        dict(neighbours=[1, 2, -3, 4]),
        dict(neighbours=[1, 2, "3", 4]),
        dict(neighbours=[1, 2, 3.0, 4]),
        dict(neighbours="1234"),
        dict(neighbours=None),
        dict(round="3"),
        dict(round=-1),
        dict(round=3.0),
        dict(round=None),
        dict(threshold=3.0),
        dict(threshold=True),
        dict(threshold="3"),
        dict(clients=10.0),
        dict(clients=1),
        dict(clients="10"),
        dict(clients=True),
        dict(clip=0),
        dict(clip=-1.0),
        dict(clip="1"),
        dict(clip=float("inf")),
        dict(clip=True),
        dict(max_weight=0),
        dict(max_weight=100.0),
        dict(max_weight=None),
    ],
)
def test_setup_refuses_bad_headers(changes):
    with pytest.raises(ProtocolError):
        Setup.from_header(_header(**changes), 0)


def test_setup_refuses_a_missing_header():
    for header in (None, [], "secagg", {}):
        with pytest.raises(ProtocolError):
            Setup.from_header(header, 0)
    with pytest.raises(ProtocolError):
        Setup.from_header(_header(clients=200_000, neighbours=list(range(1, 5))), 0)


# -- hostile clients --------------------------------------------------------------------------
def test_wrong_revealed_share_is_refused_and_the_round_completes(caplog):
    r = Round(range(10), seed=4)

    def tamper(i, answer):
        if i == 3:
            answer["b"]["5"] = flip_byte(answer["b"]["5"])  # client 3 lies about client 5's seed share
        if i == 6:
            answer["s"]["2"] = flip_byte(answer["s"]["2"], 65)  # and 6 about dropped client 2's mask key
        return answer

    with caplog.at_level(logging.WARNING, logger="fedforge.secagg"):
        total = r.run({"input": {2}}, tamper=tamper)
    assert sorted(r.server.refused_shares) == [(3, 5), (6, 2)]
    assert "does not match its commitment" in caplog.text
    assert np.array_equal(total, r.expected())


def test_wrong_revealed_shares_below_threshold_fail():
    r = Round(range(10), seed=4)

    def tamper(i, answer):
        if i == 3:
            answer["b"]["5"] = flip_byte(answer["b"]["5"])
        return answer

    with pytest.raises(SecAggFailed, match="client 5"):  # 6 answers, one share of 5's seed refused: 5 < t
        r.run({"unmask": {0, 1, 2, 4}}, tamper=tamper)
    assert r.server.refused_shares == [(3, 5)]


@pytest.fixture
def keyed():
    """A round of 10 in a ring of degree 2 (t = 2 of 3), its keys in, and client 0's shares."""
    r = Round(range(10), neighbours=2, seed=8)
    r.keys()
    for i in range(1, 10):
        r.server.on_shares(i, r.clients[i].shares(r.server.neighbour_keys(i)))
    header = r.clients[0].shares(r.server.neighbour_keys(0))
    return r, header


def _non_neighbour(r, i=0):
    return next(j for j in r.ids if j != i and j not in r.server.graph[i])


def test_keyed_fixture_is_accepted(keyed):
    r, header = keyed
    assert len(header["shares"]) == 2
    r.server.on_shares(0, header)
    assert 0 in r.server.sealed
    r.input()
    r.unmask()
    assert np.array_equal(r.server.result(), r.expected())


@pytest.mark.parametrize(
    "attack",
    [
        "missing",
        "extra",
        "swapped",
        "outsider",
        "not-base64",
        "short",
        "long",
        "not-a-string",
        "not-a-dict",
        "padded-id",
        "no-commitments",
        "missing-commitment",
        "short-commitment",
        "commitment-not-a-pair",
        "no-seed",
        "short-seed",
    ],
)
def test_on_shares_refuses_bad_messages(keyed, attack):
    r, header = keyed
    bad = copy.deepcopy(header)
    first, second = sorted(bad["shares"])
    text = bad["shares"][first]
    if attack == "missing":
        del bad["shares"][first]
    elif attack == "extra":
        bad["shares"][str(_non_neighbour(r))] = text
    elif attack == "swapped":
        bad["shares"][str(_non_neighbour(r))] = bad["shares"].pop(first)
    elif attack == "outsider":
        bad["shares"]["999"] = bad["shares"].pop(first)
    elif attack == "not-base64":
        bad["shares"][first] = "*" * len(text)
    elif attack == "short":
        bad["shares"][first] = b64(os.urandom(SEALED_BYTES - 1))
    elif attack == "long":
        bad["shares"][first] = b64(os.urandom(SEALED_BYTES + 1))  # the same number of base64 characters
        assert len(bad["shares"][first]) == len(text)
    elif attack == "not-a-string":
        bad["shares"][first] = list(base64.b64decode(text))
    elif attack == "not-a-dict":
        bad["shares"] = [text, bad["shares"][second]]
    elif attack == "padded-id":
        bad["shares"][second + " "] = bad["shares"].pop(second)
    elif attack == "no-commitments":
        del bad["commitments"]
    elif attack == "missing-commitment":
        del bad["commitments"]["0"]
    elif attack == "short-commitment":
        bad["commitments"][first][0] = b64(os.urandom(31))
    elif attack == "commitment-not-a-pair":
        bad["commitments"][first] = bad["commitments"][first][:1]
    elif attack == "no-seed":
        del bad["seed"]
    elif attack == "short-seed":
        bad["seed"] = b64(os.urandom(31))
    with pytest.raises(ProtocolError):
        r.server.on_shares(0, bad)
    assert 0 not in r.server.sealed


def test_on_keys_refuses_bad_keys():
    r = Round(range(6), seed=3)
    r.keys(drop={0})
    good = r.clients[0].keys()
    c1, s1 = r.server.keys[1]
    one = next(iter(good["c"]))
    attacks = [
        {**good, "s": b64(s1)},  # another client's key
        {**good, "c": {**good["c"], one: b64(c1[0])}},
        {**good, "c": {**good["c"], one: good["c"][one][:-4]}},
        {**good, "c": {**good["c"], one: good["s"]}},  # one key twice
        {**good, "c": dict(list(good["c"].items())[1:])},  # a neighbour without a channel key
        {**good, "c": {**good["c"], "0": good["c"][one]}},  # a key for itself
        {"c": good["c"]},
        {"s": good["s"]},
        {**good, "c": good["s"]},
    ]
    for attack in attacks:
        with pytest.raises(ProtocolError):
            r.server.on_keys(0, attack)
        assert 0 not in r.server.keys
    r.server.on_keys(0, good)
    assert 0 in r.server.keys


@pytest.mark.parametrize("flag", ["yes", 1, 0, None, [True], {"a": 1}])
def test_on_keys_refuses_an_inputs_differ_flag_that_is_not_a_bool(flag):
    """The one diagnostic flag a client's keys may carry (its inputs differ from the server's test
    inputs, network/inputs.py): true, false or absent; anything else refuses its keys."""
    r = Round(range(4), seed=1)
    with pytest.raises(ProtocolError, match=r"inputs_differ .* is not true or false"):
        r.server.on_keys(0, {**r.clients[0].keys(), "inputs_differ": flag})
    assert 0 not in r.server.keys
    r.server.on_keys(1, {**r.clients[1].keys(), "inputs_differ": True})
    r.server.on_keys(2, {**r.clients[2].keys(), "inputs_differ": False})
    assert {1, 2} <= set(r.server.keys)


def test_on_input_refuses_wrong_length_or_dtype():
    r = Round(range(4), length=20)
    r.keys()
    r.shares()
    masked, _ = r.clients[0].masked_input(r.server.input_request(0), r.inputs[0])
    for vector in (
        masked[:-1],
        np.concatenate([masked, masked[:1]]),
        masked.astype(np.int32),
        masked.astype(np.int64),
        masked.astype(np.uint64),
        masked.astype(np.float32),
        masked.reshape(4, 5),
        masked.astype(np.uint16),
    ):
        with pytest.raises(ProtocolError):
            r.server.on_input(0, vector, 20, {"weight": 1})
    for weight in (None, 0, 101, 1.0, True, "1"):  # the round's cap is 100
        with pytest.raises(ProtocolError, match="weight"):
            r.server.on_input(0, masked, 20, {"weight": weight})
    assert 0 not in r.server.inputs
    with pytest.raises(ProtocolError):  # never sent the shares it would mask with
        r.server.on_input(1, r.inputs[1], 20, {"weight": 1})
    r.server.on_input(0, masked, 20, {"weight": 100})
    assert 0 in r.server.inputs


def test_client_stages_out_of_order():
    r = Round(range(4))
    setup = r.clients[0].setup
    fresh = ClientRound(0, setup)
    with pytest.raises(ProtocolError, match="out of order"):
        fresh.shares({"keys": {}})
    fresh = ClientRound(0, setup)
    with pytest.raises(ProtocolError, match="out of order"):
        fresh.unmask({"survivors": [], "dropped": []})
    r.keys()
    with pytest.raises(ProtocolError, match="out of order"):
        r.clients[0].keys()
    with pytest.raises(ProtocolError, match="out of order"):
        r.clients[0].masked_input({"shares": {}}, r.inputs[0])
    r.shares()
    with pytest.raises(ProtocolError, match="out of order"):
        r.clients[0].shares(r.server.neighbour_keys(0))
    r.input()
    header = r.server.unmask_request(0)
    answer = r.clients[0].unmask(header)
    assert set(answer["b"]) == {"0", "1", "2", "3"} and answer["s"] == {}
    with pytest.raises(ProtocolError, match="out of order"):  # asked to unmask twice
        r.clients[0].unmask({"survivors": [], "dropped": [1, 2, 3]})


def _at_unmask(n=6):
    r = Round(range(n))
    r.keys()
    r.shares()
    r.input()
    return r


@pytest.mark.parametrize(
    "request_",
    [
        {"survivors": [1, 2, 3, 4], "dropped": [4]},
        {"survivors": [1, 2, 3, 4, 5], "dropped": [1]},
        {"survivors": [1, 2, 3, 4, 0], "dropped": []},
        {"survivors": [1, 2, 3, 4, 4], "dropped": []},
        {"survivors": [1, 2, 3, 4, 99], "dropped": []},
        {"survivors": [1, 2], "dropped": [3, 4, 5]},
        {"survivors": [1, 2, 3, "4"], "dropped": []},
        {"survivors": [1, 2, 3, 4]},
        {"survivors": "12345", "dropped": []},
    ],
)
def test_client_unmask_refuses_bad_requests(request_):
    r = _at_unmask()
    assert r.server.threshold == 4
    with pytest.raises(ProtocolError):
        r.clients[0].unmask(request_)


def test_client_unmask_at_the_threshold():
    r = _at_unmask()
    answer = r.clients[0].unmask({"survivors": [1, 2, 3], "dropped": [4, 5]})  # 3 + itself = t survivors
    assert set(answer["b"]) == {"0", "1", "2", "3"} and set(answer["s"]) == {"4", "5"}


def test_client_never_reveals_both_secrets_of_one_client():
    r = _at_unmask()
    with pytest.raises(ProtocolError, match="both"):
        r.clients[0].unmask({"survivors": [1, 2, 3, 4], "dropped": [4, 5]})
    with pytest.raises(ProtocolError):  # and, once refused, it answers nothing more
        r.clients[0].unmask({"survivors": [1, 2, 3, 4, 5], "dropped": []})


def test_garbage_sealed_share_is_logged_and_the_round_completes(caplog):
    r = Round(range(10), seed=9)
    r.keys()
    r.shares()
    r.server.sealed[4][7] = b64(os.urandom(SEALED_BYTES))  # 4's shares for 7: garbage of the right size
    r.server.sealed[5][7] = "not base64 at all"  # and 5's: not even base64
    with caplog.at_level(logging.WARNING, logger="fedforge.secagg"):
        r.input()
    assert 7 in r.server.inputs
    assert "client 7: the shares of client 4 are refused" in caplog.text
    assert "client 7: the shares of client 5 are refused" in caplog.text
    answer = r.clients[7].unmask(r.server.unmask_request(7))
    assert "4" not in answer["b"] and "5" not in answer["b"] and "6" in answer["b"]
    r.server.on_unmasked(7, answer)
    for i in sorted(set(r.server.inputs) - {7}):
        r.server.on_unmasked(i, r.clients[i].unmask(r.server.unmask_request(i)))
    assert np.array_equal(r.server.result(), r.expected())


def test_garbage_sealed_share_of_a_dropped_dealer():
    r = Round(range(10), seed=10)
    r.keys()
    r.shares()
    r.server.sealed[4][7] = b64(os.urandom(SEALED_BYTES))
    r.input(drop={4})  # 4 dropped: its mask key comes back from the other holders' shares
    r.unmask()
    assert 4 not in r.server.inputs
    assert np.array_equal(r.server.result(), r.expected())


def test_shares_relayed_to_another_client_do_not_open(caplog):
    r = Round(range(6), seed=12)
    r.keys()
    r.shares()
    r.server.sealed[1][2] = r.server.sealed[1][3]  # 1's shares for 3, relayed to 2
    with caplog.at_level(logging.WARNING, logger="fedforge.secagg"):
        r.input()
    assert "client 2: the shares of client 1 are refused" in caplog.text
    r.unmask()
    assert np.array_equal(r.server.result(), r.expected())


def test_client_refuses_too_few_forwarded_shares():
    r = Round(range(10))
    r.keys()
    r.shares()
    header = r.server.input_request(0)
    header["shares"] = dict(list(header["shares"].items())[:4])  # 4 neighbours + itself < t = 6
    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        r.clients[0].masked_input(header, r.inputs[0])


def test_client_refuses_too_few_neighbour_keys():
    r = Round(range(10))
    r.keys()
    header = r.server.neighbour_keys(0)
    header["keys"] = dict(list(header["keys"].items())[:4])
    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        r.clients[0].shares(header)


def test_dealer_committing_to_another_seed_fails_the_round():
    r = Round(range(6))
    r.keys()
    for i in sorted(r.server.keys):
        header = r.clients[i].shares(r.server.neighbour_keys(i))
        if i == 2:
            header["seed"] = b64(os.urandom(32))
        r.server.on_shares(i, header)
    r.input()
    r.unmask()
    with pytest.raises(SecAggFailed, match="client 2 dealt shares"):
        r.server.result()


def test_dropped_dealer_of_another_mask_key_fails_the_round():
    r = Round(range(6))
    for i in r.ids:
        header = r.clients[i].keys()
        if i == 2:  # announces a mask key other than the one it shares
            header["s"] = b64(public_bytes(new_key()))
        r.server.on_keys(i, header)
    r.shares()
    r.input(drop={2})
    r.unmask()
    with pytest.raises(SecAggFailed, match="client 2 dealt shares"):
        r.server.result()


@pytest.mark.parametrize("attack", ["b-of-dropped", "s-of-survivor", "outsider", "short", "not-base64", "no-b"])
def test_on_unmasked_refuses_bad_answers(attack):
    r = Round(range(8))
    r.keys()
    r.shares()
    r.input(drop={2})
    header = r.server.unmask_request(0)
    assert header == {"survivors": [1, 3, 4, 5, 6, 7], "dropped": [2]}
    answer = r.clients[0].unmask(header)
    held = r.clients[0]._held
    if attack == "b-of-dropped":
        answer["b"]["2"] = b64(held[2][0])
    elif attack == "s-of-survivor":
        answer["s"]["3"] = b64(held[3][1])
    elif attack == "outsider":
        answer["b"]["99"] = answer["b"]["3"]
    elif attack == "short":
        answer["b"]["3"] = b64(base64.b64decode(answer["b"]["3"])[:-1])
    elif attack == "not-base64":
        answer["s"]["2"] = "!" * len(answer["s"]["2"])
    elif attack == "no-b":
        del answer["b"]
    with pytest.raises(ProtocolError):
        r.server.on_unmasked(0, answer)
    assert 0 not in r.server.responded and not r.server.refused_shares


@pytest.mark.parametrize("public", [bytes(32), b"\x01" + bytes(31), bytes(31) + b"\x80", b"\xed" + b"\xff" * 31])
def test_a_low_order_public_key_is_refused(public):
    srv = ServerRound(1, [0, 1, 2], threshold=0.5, neighbours=None, clip=1.0, max_weight=100)
    good = ClientRound(0, Setup.from_header(srv.setup(0).to_header(), 0)).keys()
    with pytest.raises(ProtocolError, match="low order"):
        srv.on_keys(0, {"c": {**good["c"], "2": b64(public)}, "s": good["s"]})
    with pytest.raises(ProtocolError, match="low order"):
        srv.on_keys(0, {"c": good["c"], "s": b64(public)})


def test_messages_from_clients_the_server_did_not_ask_are_refused():
    srv = ServerRound(1, [0, 1, 2], threshold=0.5, neighbours=None, clip=1.0, max_weight=100)
    cl = {i: ClientRound(i, Setup.from_header(srv.setup(i).to_header(), i)) for i in range(3)}
    with pytest.raises(ProtocolError, match="not a participant"):
        srv.on_keys(7, cl[0].keys())
    for i in (1, 2):
        srv.on_keys(i, cl[i].keys())
    z = b64(bytes(32))
    with pytest.raises(ProtocolError, match="was not sent"):
        srv.on_shares(0, {"shares": {}, "commitments": {"0": [z, z]}, "seed": z})
    with pytest.raises(ProtocolError, match="was not asked"):
        srv.on_unmasked(1, {"b": {}, "s": {}})


# -- one hostile client does not stop the round ---------------------------------------------------
def _dealing(r, hostile, change):
    """Stage 2 with client `hostile`'s answer changed by `change(header)`."""
    r.keys()
    for i in sorted(r.server.keys):
        header = r.clients[i].shares(r.server.neighbour_keys(i))
        r.server.on_shares(i, change(header) if i == hostile else header)


@pytest.mark.parametrize("how", ["garbage", "uncommitted", "replayed"])
def test_a_dealer_of_bad_shares_is_named_and_the_round_completes_without_it(how, caplog):
    """Client 3 seals shares nobody can open (random bytes; shares that do not match its
    commitments; its shares of an earlier round, replayed): each neighbour reports it with the
    pair's channel key, the server opens the shares itself, puts 3 out (as a dropout) and sums
    the other five exactly."""
    earlier = Round(range(6), seed=21)
    earlier.keys()
    old = {i: earlier.clients[i].shares(earlier.server.neighbour_keys(i)) for i in earlier.ids}
    r = Round(range(6), seed=22)

    def change(header):
        if how == "garbage":
            header["shares"] = {j: b64(os.urandom(SEALED_BYTES)) for j in header["shares"]}
        elif how == "uncommitted":
            header["commitments"] = {j: [b64(os.urandom(32))] * 2 for j in header["commitments"]}
        else:
            header["shares"] = old[3]["shares"]
        return header

    _dealing(r, 3, change)
    with caplog.at_level(logging.WARNING, logger="fedforge.secagg"):
        r.input()
        r.unmask()
        total = r.server.result()
    assert set(r.server.excluded) == {3} and "shares for client" in r.server.excluded[3]
    assert sorted(r.server.inputs) == [0, 1, 2, 4, 5]
    assert np.array_equal(total, r.expected())


def test_a_false_report_puts_the_reporter_out_and_the_round_completes():
    """Client 2 reports client 4's good shares (as if they did not open): the server opens them
    with the key 2 reveals, finds them good, and puts 2 out; 4 stays; the round completes."""
    r = Round(range(6), seed=23)
    r.keys()
    r.shares()
    for i in sorted(r.server.sealed):
        header = r.server.input_request(i)
        r.masked[i], complaints = r.clients[i].masked_input(header, r.inputs[i])
        if i == 2:
            complaints = {"complaints": {"4": b64(private_bytes(r.clients[2]._c[4]))}, "weight": 1}
            with pytest.raises(ProtocolError, match="open and match"):
                r.server.on_input(i, r.masked[i], r.length, {**complaints, "weight": 1})
            with pytest.raises(ProtocolError, match="out of the round"):  # and once out, it stays out
                r.server.on_input(i, r.masked[i], r.length, {"weight": 1})
            continue
        r.server.on_input(i, r.masked[i], r.length, {**complaints, "weight": 1})
    assert list(r.server.excluded) == [2] and 4 in r.server.inputs
    r.unmask()
    assert np.array_equal(r.server.result(), r.expected())


def test_a_report_with_another_key_puts_the_reporter_out():
    r = Round(range(6), seed=24)
    r.keys()
    r.shares()
    r.server.input_request(2)
    masked, _ = r.clients[2].masked_input(r.server.input_request(2), r.inputs[2])
    for key in (private_bytes(new_key()), private_bytes(r.clients[2]._c[5])):
        with pytest.raises(ProtocolError, match="not its own"):
            r.server.on_input(2, masked, r.length, {"complaints": {"4": b64(key)}, "weight": 1})
        r.server.excluded.clear()


def test_a_dealer_committing_to_another_seed_is_named_for_the_retry():
    r = Round(range(6))

    def change(header):
        header["seed"] = b64(os.urandom(32))
        return header

    _dealing(r, 2, change)
    r.input()
    r.unmask()
    with pytest.raises(SecAggFailed, match="client 2 dealt shares") as failed:
        r.server.result()
    assert list(failed.value.culprits) == [2]


@pytest.mark.parametrize(
    "floor, changes, reason",
    [
        (Floor(), dict(clients=2, neighbours=[1], threshold=2), "2 participants, below this client's floor of 3"),
        (Floor(neighbours=3), dict(neighbours=[1, 2], threshold=2), "2 neighbours, below this client's floor of 3"),
        (Floor(threshold=4), dict(), "3 threshold, below this client's floor of 4"),
    ],
)
def test_a_client_declines_a_round_below_its_floor(floor, changes, reason):
    """A server's 2-client round (whose other member may be its own key) is declined by default,
    and any round below the client's own floor, with the reason."""
    with pytest.raises(ProtocolError, match=reason):
        floor.check(Setup.from_header(_header(**changes), 0))
    floor.check(Setup.from_header(_header(clients=5, neighbours=[1, 2, 3, 4], threshold=4), 0))


@pytest.mark.parametrize("value", [0, 1, 1.5, True, None, 200_000])
def test_a_floor_refuses_bad_settings(value):
    with pytest.raises(ValueError, match="must be a count >= 2"):
        Floor(clients=value)


def test_a_dealer_of_too_few_good_shares_fails_the_attempt_named():
    """Client 3 seals good shares for 4 and 5 only (t = 4 of 6): 0, 1 and 2 report it and it is
    out, but its mask key, which 4 and 5 mask with, cannot be rebuilt from 2 shares: the attempt
    fails, and 3 is among those proven out (the engine leaves them out of the retry)."""
    r = Round(range(6), seed=25)

    def change(header):
        header["shares"] = {j: b64(os.urandom(SEALED_BYTES)) if int(j) < 3 else v for j, v in header["shares"].items()}
        return header

    _dealing(r, 3, change)
    r.input()
    r.unmask()
    assert list(r.server.excluded) == [3] and "do not open" in r.server.excluded[3]
    with pytest.raises(SecAggFailed, match="dropped client 3's mask key: 2 verified shares, the threshold is 4"):
        r.server.result()


def test_a_client_declines_more_neighbours_than_its_cap():
    """A server's round of 100,000 neighbours would cost the client minutes of key agreements,
    shares and masks: past its cap (default 1000) the round is declined."""
    floor = Floor(max_neighbours=4)
    floor.check(Setup.from_header(_header(), 0))
    with pytest.raises(ProtocolError, match="gives this client 5 neighbours, more than its cap of 4"):
        floor.check(Setup.from_header(_header(neighbours=[1, 2, 3, 4, 5], threshold=4), 0))


def test_small_order_keys_from_the_server_are_a_protocol_error_not_a_crash():
    """A server that relays a small-order key (32 zero bytes) as a neighbour's: the client refuses
    the round in one line (before, its key agreement raised out of the protocol)."""
    r = Round(range(4), seed=3)
    r.keys()
    header = r.server.neighbour_keys(0)
    first = next(iter(header["keys"]))
    header["keys"][first] = [b64(bytes(32)), header["keys"][first][1]]
    with pytest.raises(ProtocolError, match=f"keys of client {first} are of small order"):
        r.clients[0].shares(header)


def test_a_client_masks_only_with_as_many_neighbours_as_its_floor():
    """A server that forwards a client bad shares from all but one neighbour would leave its input
    under its self-mask and one pairwise mask: with a floor of 2 neighbours the client refuses to
    send it (it still reports the dealers); without a floor it masks with the one left."""
    for floor, refuses in ((2, True), (0, False)):
        r = Round(range(5), seed=4)
        r.clients[0] = ClientRound(0, r.clients[0].setup, min_neighbours=floor)
        r.keys()
        r.shares()
        header = r.server.input_request(0)
        header["shares"] = {
            j: b64(os.urandom(SEALED_BYTES)) if j != min(header["shares"]) else v for j, v in header["shares"].items()
        }
        if refuses:
            with pytest.raises(
                ProtocolError, match="the shares of only 1 neighbours opened, below this client's floor"
            ):
                r.clients[0].masked_input(header, r.inputs[0])
        else:
            _, complaints = r.clients[0].masked_input(header, r.inputs[0])
            assert len(complaints["complaints"]) == 3
