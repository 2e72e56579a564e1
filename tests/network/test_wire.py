"""The wire format: round trips, compression error, and a fuzzed decoder that never crashes."""

import contextlib
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedforge.network.wire import MAGIC, Kind, Message, WireError, decode, encode

DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]


@st.composite
def messages(draw):
    tensors = {}
    for i in range(draw(st.integers(0, 4))):
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        tensors[f"t{i}"] = (torch.rand(shape) * 100).to(dtype)
    header = draw(
        st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5), max_size=3)
    )
    header.pop("tensors", None)
    return Message(draw(st.sampled_from(list(Kind))), header, tensors)


@settings(max_examples=200, deadline=None)
@given(messages())
def test_exact_round_trip(message):
    back = decode(encode(message))
    assert back.kind == message.kind and back.header == message.header
    assert back.tensors.keys() == message.tensors.keys()
    for name, t in message.tensors.items():
        assert back.tensors[name].dtype == t.dtype and torch.equal(back.tensors[name], t)


@pytest.mark.parametrize("compression, bound", [("fp16", 1e-3), ("int8", 1 / 127)])
def test_compression_error_is_bounded(compression, bound):
    torch.manual_seed(0)
    w = torch.randn(1000)
    back = decode(encode(Message(Kind.UPDATE, {}, {"w": w, "steps": torch.tensor(7)}), compression=compression))
    relative = ((back.tensors["w"] - w).abs().max() / w.abs().max()).item()
    assert 0 < relative <= bound
    assert back.tensors["steps"].item() == 7 and back.tensors["w"].dtype == torch.float32


def valid_bytes():
    return encode(
        Message(
            Kind.UPDATE, {"round": 1, "client": 2}, {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
        )
    )


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_are_refused(data):
    with contextlib.suppress(WireError):
        decode(data, max_bytes=10_000)


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_mutated_messages_never_crash(data):
    raw = bytearray(valid_bytes())
    for _ in range(data.draw(st.integers(1, 5))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        position = data.draw(st.integers(0, len(raw) - 1))
        if action == "flip":
            raw[position] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del raw[position:]
            if not raw:
                raw = bytearray(b"\0")
        else:
            raw[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        message = decode(bytes(raw), max_bytes=10_000)
    except WireError:
        return
    assert isinstance(message, Message)  # a mutation may still be well-formed (e.g. in a value)


def header_with(entries, payload=b""):
    head = json.dumps({"tensors": entries}).encode()
    return MAGIC + struct.pack(">BI", int(Kind.UPDATE), len(head)) + head + payload


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"hello world", "bad magic"),
        (MAGIC + struct.pack(">BI", 99, 0), "unknown message kind"),
        (MAGIC + struct.pack(">BI", 5, 10**9), "header length"),
        (MAGIC + struct.pack(">BI", 5, 3) + b"{x}", "not JSON"),
        (MAGIC + struct.pack(">BI", 5, 2) + b"[]", "not a JSON object"),
        (header_with([{"name": "w", "dtype": "object", "shape": [1], "nbytes": 8}]), "unknown dtype"),
        (header_with([{"name": "w", "dtype": "float32", "shape": [2], "nbytes": 8}], b"\0" * 4), "payload too short"),
        (header_with([{"name": "w", "dtype": "float32", "shape": [1], "nbytes": 99}], b"\0" * 4), "nbytes"),
        (header_with([{"name": "w", "dtype": "float32", "shape": [-1], "nbytes": 4}]), "bad shape"),
        (header_with([{"name": "w", "dtype": "float32", "shape": [1], "nbytes": 4}], b"\0" * 8), "bytes after"),
        (header_with([{"name": "w", "dtype": "float32", "shape": [1], "nbytes": 4}] * 2, b"\0" * 8), "twice"),
        (header_with([{"name": "w", "dtype": "int64", "shape": [1], "nbytes": 2, "encoding": "fp16"}]), "non-float"),
        (
            header_with(
                [{"name": "w", "dtype": "float32", "shape": [1], "nbytes": 1, "encoding": "int8", "scale": -1}], b"\0"
            ),
            "int8 scale",
        ),
    ],
)
def test_specific_refusals(data, reason):
    with pytest.raises(WireError, match=reason):
        decode(data)


def test_encode_refuses_what_decode_would():
    with pytest.raises(WireError, match="out of range"):
        encode(Message(Kind.UPDATE, {"num_examples": 10**30}))
    with pytest.raises(WireError, match="not finite"):
        encode(Message(Kind.UPDATE, {"train_loss": float("inf")}))


def test_size_limit():
    with pytest.raises(WireError, match="exceeds the limit"):
        decode(valid_bytes(), max_bytes=10)


def test_no_pickle_anywhere():
    import inspect

    import fedforge.network.wire as wire

    assert "pickle" not in inspect.getsource(wire).replace("never pickle", "")


def raw_header(text: str, payload: bytes = b"") -> bytes:
    head = text.encode()
    return MAGIC + struct.pack(">BI", int(Kind.UPDATE), len(head)) + head + payload


@pytest.mark.parametrize(
    "data, reason",
    [
        (raw_header('{"num_examples": ' + "9" * 5000 + "}"), "not JSON|out of range"),  # past Python's digit limit
        (raw_header('{"num_examples": ' + "9" * 400 + "}"), "out of range"),
        (raw_header('{"train_loss": 1e400}'), "not finite"),
        (raw_header('{"train_loss": NaN}'), "not finite"),
        (raw_header('{"train_loss": -Infinity}'), "not finite"),
        (header_with([{"name": "w", "dtype": "float32", "shape": [0, 2**70], "nbytes": 0}]), "bad shape|out of range"),
        (header_with([{"name": "w", "dtype": "float32", "shape": [0, 2**40, 2**40], "nbytes": 0}]), "bad shape"),
        (
            header_with(
                [{"name": "w", "dtype": "float32", "shape": [1], "nbytes": 1, "encoding": "int8", "scale": 10**400}],
                b"\0",
            ),
            "out of range|int8 scale",
        ),
        (
            header_with(
                [{"name": "w", "dtype": "float32", "shape": [1], "nbytes": 1, "encoding": "int8", "scale": "1"}], b"\0"
            ),
            "int8 scale",
        ),
        (
            header_with(
                [{"name": "w", "dtype": "float32", "shape": [1], "nbytes": 1, "encoding": "int8", "scale": True}], b"\0"
            ),
            "int8 scale",
        ),
        (
            header_with(
                [{"name": "w", "dtype": "float32", "shape": [1], "nbytes": 1, "encoding": "int8", "scale": 1e300}],
                b"\0",
            ),
            "int8 scale",
        ),
        (header_with([{"name": "w", "dtype": "float32", "shape": [True], "nbytes": 4}], b"\0" * 4), "bad shape"),
    ],
)
def test_values_past_any_bound_are_refused(data, reason):
    with pytest.raises(WireError, match=reason):
        decode(data)


huge_ints = (
    st.integers(min_value=2**62, max_value=2**80)
    | st.integers(max_value=-(2**62), min_value=-(2**80))
    | st.just(10**400)
    | st.just(10**4000)
)
odd_scalars = (
    huge_ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.none()
    | st.text(max_size=3)
    | st.lists(st.integers(), max_size=2)
)


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_fuzzed_values_never_escape(data):
    """Huge integers anywhere, huge dimensions next to a zero, scales of any type: refused or parsed."""
    shape = data.draw(st.lists(st.integers(0, 3) | huge_ints, min_size=1, max_size=4))
    if data.draw(st.booleans()):
        shape[data.draw(st.integers(0, len(shape) - 1))] = 0
    entry = {
        "name": "w",
        "dtype": data.draw(st.sampled_from(["float32", "int64", "float16"])),
        "shape": shape,
        "nbytes": data.draw(st.integers(0, 8) | huge_ints),
        "encoding": data.draw(st.sampled_from(["raw", "fp16", "int8"])),
    }
    if data.draw(st.booleans()):
        entry["scale"] = data.draw(odd_scalars | st.floats(1e-3, 10))
    header = {"tensors": [entry], "num_examples": data.draw(odd_scalars), "x": data.draw(odd_scalars)}
    text = json.dumps(header, allow_nan=True)
    payload = data.draw(st.binary(max_size=16))
    with contextlib.suppress(WireError):
        decode(raw_header(text, payload), max_bytes=10**7)
