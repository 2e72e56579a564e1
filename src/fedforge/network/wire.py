"""The wire format: tensors as raw bytes with an explicit schema, never pickle.

A message is `MAGIC | kind (1 byte) | header length (4 bytes, big-endian) | header | payload`.
The header is a UTF-8 JSON object; when the message carries tensors, its "tensors" entry lists
them in payload order: {"name", "dtype", "shape", "encoding", "nbytes"} (+ "scale" for int8).
Encodings: "raw" (the tensor's own bytes, little-endian), "fp16" (floats sent as float16) and
"int8" (floats quantized symmetrically, one scale per tensor). Every number in a header is a
64-bit integer or a finite float (JSON's NaN and Infinity, 1e400 and 10**400 are refused), and
every dimension is at most MAX_ELEMENTS. Decoding checks every field and every length and raises
WireError for anything else: a message is either fully understood or refused.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeGuard

import torch

MAGIC = b"FFW1"
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
MAX_ELEMENTS = 1 << 31
MAX_INT = (1 << 63) - 1
MAX_SCALE = 1e30  # int8 scale: the largest value an int8 tensor may carry is 127 * MAX_SCALE

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
COMPRESSIONS = ("fp16", "int8")


class Kind(IntEnum):
    # 1 was HELLO: a client now authenticates in the call's metadata (hub.py)
    WELCOME = 2  # server -> client: the run's settings
    REJECT = 3  # server -> client: why it is refused
    TASK = 4  # server -> client: train the global model, with a plan and the round's config
    UPDATE = 5  # client -> server: the trained delta
    SHUTDOWN = 6  # server -> client: the run is over
    # Secure aggregation (secagg/protocol.py): a TASK with a "secagg" entry opens a round's protocol.
    SA_KEYS = 7  # client -> server: its public keys
    SA_NEIGHBOUR_KEYS = 8  # server -> client: its neighbours' public keys
    SA_SHARES = 9  # client -> server: its sealed shares and commitments
    SA_INPUT = 10  # server -> client: the shares addressed to it; send the masked input
    SA_MASKED = 11  # client -> server: the masked input
    SA_UNMASK = 12  # server -> client: who survived and who dropped
    SA_UNMASKED = 13  # client -> server: the shares that unmask the sum
    # Federated evaluation (engines/network.py): the global model on the clients' held-out examples.
    EVALUATE = 14  # server -> client: evaluate the global model, its shared entries sent as a TASK's
    EVALUATION = 15  # client -> server: its metrics and its held-out examples' count


class WireError(ValueError):
    """A message that is not well-formed; the reason is safe to log."""


@dataclass(frozen=True)
class Message:
    kind: Kind
    header: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _encode_tensor(t: torch.Tensor, compression: str | None) -> tuple[dict[str, Any], bytes]:
    t = t.detach().cpu().contiguous()
    if t.dtype not in NAMES:
        raise WireError(f"dtype {t.dtype} cannot be sent")
    entry: dict[str, Any] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "encoding": "raw"}
    if compression and t.is_floating_point():
        if compression == "fp16":
            entry["encoding"], t = "fp16", t.to(torch.float16)
        elif compression == "int8":
            peak = float(t.abs().max()) if t.numel() else 0.0
            scale = peak / 127 if peak > 0 else 1.0
            entry["encoding"], entry["scale"] = "int8", scale
            t = torch.round(t.float() / scale).clamp_(-127, 127).to(torch.int8)
        else:
            raise WireError(f"unknown compression {compression!r} (choose from: {', '.join(COMPRESSIONS)})")
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    entry["nbytes"] = len(data)
    return entry, data


def encode(message: Message, *, compression: str | None = None) -> bytes:
    """The bytes of `message`; float tensors compressed as `compression` says (None: exact)."""
    header = dict(message.header)
    parts = []
    if message.tensors:
        entries = []
        for name, tensor in message.tensors.items():
            entry, data = _encode_tensor(tensor, compression)
            entries.append({"name": name, **entry})
            parts.append(data)
        header["tensors"] = entries
    _check_numbers(header)
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return MAGIC + struct.pack(">BI", int(message.kind), len(head)) + head + b"".join(parts)


def is_number(value: object) -> TypeGuard[int | float]:
    """A JSON number: an int or a float, not a bool (nor a subclass)."""
    return type(value) in (int, float)


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise WireError(reason)


def _decode_tensor(entry: Any, payload: memoryview, offset: int) -> tuple[str, torch.Tensor, int]:
    _expect(isinstance(entry, dict), "tensor entry is not an object")
    name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
    encoding, nbytes = entry.get("encoding", "raw"), entry.get("nbytes")
    _expect(isinstance(name, str) and 0 < len(name) <= 1000, "tensor name missing or too long")
    _expect(dtype in DTYPES, f"tensor {name!r}: unknown dtype {dtype!r}")
    _expect(
        isinstance(shape, list) and len(shape) <= 16 and all(type(d) is int and 0 <= d <= MAX_ELEMENTS for d in shape),
        f"tensor {name!r}: bad shape",
    )
    numel = math.prod(shape)
    _expect(numel <= MAX_ELEMENTS, f"tensor {name!r}: too many elements")
    target = DTYPES[dtype]
    if encoding == "raw":
        sent = target
    elif encoding in ("fp16", "int8"):
        _expect(target.is_floating_point, f"tensor {name!r}: {encoding} encoding of a non-float tensor")
        sent = torch.float16 if encoding == "fp16" else torch.int8
    else:
        raise WireError(f"tensor {name!r}: unknown encoding {encoding!r}")
    size = numel * sent.itemsize
    _expect(type(nbytes) is int and nbytes == size, f"tensor {name!r}: nbytes does not match its shape")
    _expect(offset + size <= len(payload), f"tensor {name!r}: payload too short")
    raw = (
        torch.frombuffer(bytearray(payload[offset : offset + size]), dtype=torch.uint8)
        if size
        else torch.empty(0, dtype=torch.uint8)
    )
    tensor = raw.view(sent).reshape(shape)
    if encoding == "fp16":
        tensor = tensor.to(target)
    elif encoding == "int8":
        scale = entry.get("scale")
        _expect(type(scale) in (int, float) and 0 < scale <= MAX_SCALE, f"tensor {name!r}: bad int8 scale")
        tensor = (tensor.float() * scale).to(target)
    return name, tensor, offset + size


def _refuse_constant(name: str):
    raise WireError(f"header number is not finite ({name})")


def _check_numbers(value: Any) -> None:
    """Refuse integers past 64 bits and non-finite floats anywhere in a parsed header."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is int:
            _expect(-MAX_INT - 1 <= item <= MAX_INT, "header integer out of range")
        elif type(item) is float:
            _expect(math.isfinite(item), "header number is not finite")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _parse_int(text: str) -> int:
    # Python refuses to convert more than 4,300 digits (ValueError); anything past 19 is out of range.
    _expect(len(text.lstrip("-")) <= 19, "header integer out of range")
    value = int(text)
    _expect(-MAX_INT - 1 <= value <= MAX_INT, "header integer out of range")
    return value


def _parse_float(text: str) -> float:
    value = float(text)  # 1e400 is inf
    _expect(math.isfinite(value), "header number is not finite")
    return value


def decode(data: bytes, *, max_bytes: int | None = None) -> Message:
    """Parse and check a message. Raises WireError with the reason when anything is off."""
    try:
        return _decode(data, max_bytes)
    except WireError:
        raise
    except Exception as e:
        raise WireError(f"malformed message ({type(e).__name__})") from None


def _decode(data: bytes, max_bytes: int | None) -> Message:
    _expect(isinstance(data, (bytes, bytearray, memoryview)), "message is not bytes")
    _expect(
        max_bytes is None or len(data) <= max_bytes, f"message of {len(data)} bytes exceeds the limit of {max_bytes}"
    )
    _expect(len(data) >= len(MAGIC) + 5 and data[: len(MAGIC)] == MAGIC, "not a fedforge message (bad magic)")
    kind_value, head_len = struct.unpack(">BI", data[len(MAGIC) : len(MAGIC) + 5])
    _expect(kind_value in Kind._value2member_map_, f"unknown message kind {kind_value}")
    start = len(MAGIC) + 5
    _expect(head_len <= MAX_HEADER_BYTES and start + head_len <= len(data), "header length out of range")
    try:
        header = json.loads(
            bytes(data[start : start + head_len]).decode("utf-8"),
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_refuse_constant,
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError(f"header is not JSON ({type(e).__name__})") from None
    # Every number was checked as it was parsed (_parse_int, _parse_float, _refuse_constant).
    _expect(isinstance(header, dict), "header is not a JSON object")
    payload = memoryview(data)[start + head_len :]
    tensors: dict[str, torch.Tensor] = {}
    entries = header.pop("tensors", [])
    _expect(isinstance(entries, list) and len(entries) <= MAX_TENSORS, "tensors entry is not a list")
    offset = 0
    for entry in entries:
        name, tensor, offset = _decode_tensor(entry, payload, offset)
        _expect(name not in tensors, f"tensor {name!r} appears twice")
        tensors[name] = tensor
    _expect(offset == len(payload), f"{len(payload) - offset} bytes after the last tensor")
    return Message(Kind(kind_value), header, tensors)
