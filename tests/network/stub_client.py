"""A scripted client for the deployment tests: it speaks the protocol but misbehaves on purpose.

    python stub_client.py PORT CLIENT_ID TOKEN_FILE MODE[,MODE...]

Each MODE answers one task: "hang" (never answer), "shape" (a delta of the wrong shape), "nan",
"oversized" (a message past --max-message-mb), "late" (an update for another task), "many" (a
claim of 10**18 examples with a large delta), "huge" (10**400 examples, bytes written by hand
past the encoder's checks), "steps" (a step count its task does not give), "loss" (a training
loss of 1e308), "zero" (a well-formed update of zeros), "twice" (that update, sent two times), "norm" (a
well-formed update of L2 norm 10**6, neither clipped nor noised; the global model of its task is
saved as stub-CLIENT_ID-task-N.pt, so a test can see how far each round moved it), "reconnect"
(open a new session and leave the old one open and silent). It prints "task N" when a task
arrives, so a test can kill it mid-round.

MODEs that start with "eval-" answer the server's requests to evaluate the global model
(EVALUATE), in order, and the others its tasks: "eval-nan" (a NaN metric, written by hand),
"eval-many" (10**18 examples), "eval-metrics" (40 metrics), "eval-big" (an answer of 100 kB),
"eval-exit" (the stub leaves without an answer); once they are used up, a well-formed
evaluation of 10 examples (loss 1, accuracy 0.5).
"""

import queue
import sys
import time
from pathlib import Path

import grpc
import torch

from fedforge.client import ClientConfig, ClientPlan
from fedforge.network.hub import CLIENT_ID_KEY, METHOD, SECRET_KEY
from fedforge.network.wire import Kind, Message, decode, encode


def bad_update(mode, task, config):
    h = task.header
    delta = {k[len("global/") :]: torch.zeros_like(v) for k, v in task.tensors.items() if k.startswith("global/")}
    steps = ClientPlan(epochs=h["epochs"], max_steps=h["max_steps"]).num_steps(10, config)
    header = {"task": h["task"], "num_examples": 10, "num_steps": steps, "train_loss": 1.0, "train_accuracy": 0.5}
    if mode == "shape":
        name = next(iter(delta))
        delta[name] = torch.zeros(3, 3)
    elif mode == "nan":
        name = next(iter(delta))
        delta[name] = torch.full_like(delta[name], float("nan"))
    elif mode == "oversized":
        delta = {**delta, "padding": torch.zeros(200_000)}
    elif mode == "late":
        header["task"] = h["task"] - 1
    elif mode in ("many", "huge"):
        delta = {k: torch.full_like(v, 100.0) for k, v in delta.items()}
        header["num_examples"] = 10**18
        header["num_steps"] = ClientPlan(epochs=h["epochs"], max_steps=h["max_steps"]).num_steps(10**18, config)
    elif mode == "steps":
        header["num_steps"] = steps + 1
    elif mode == "loss":
        header["train_loss"] = 1e308
    elif mode == "norm":
        size = sum(v.numel() for v in delta.values())
        delta = {k: torch.full_like(v, 1e6 / size**0.5) for k, v in delta.items()}
    data = encode(Message(Kind.UPDATE, header, {f"delta/{k}": v for k, v in delta.items()}))
    if mode == "huge":
        data = _with_header_number(data, "num_examples", "1" + "0" * 400)
    return data


def evaluation(mode, request, client_id):
    header = {
        "task": request.header["task"],
        "client": client_id,
        "metrics": {"loss": 1.0, "accuracy": 0.5},
        "num_examples": 10,
    }
    if mode == "eval-many":
        header["num_examples"] = 10**18
    elif mode == "eval-metrics":
        header["metrics"] = {f"m{i}": 0.0 for i in range(40)}
    elif mode == "eval-big":
        header["padding"] = "x" * 100_000
    data = encode(Message(Kind.EVALUATION, header))
    if mode == "eval-nan":  # the encoder refuses NaN: the same length by hand
        data = data.replace(b'"loss":1.0', b'"loss":NaN')
    return data


def _with_header_number(data: bytes, key: str, digits: str) -> bytes:
    """`data` with the header's `key` set to `digits`, written by hand (the encoder refuses it)."""
    import json
    import struct

    start = 4 + 5
    (length,) = struct.unpack(">I", data[5:9])
    header = json.loads(data[start : start + length])
    header[key] = 0
    head = json.dumps(header).replace(f'"{key}": 0', f'"{key}": {digits}').encode()
    return data[:4] + struct.pack(">BI", data[4], len(head)) + head + data[start + length :]


def main():
    port, client_id, token_file, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
    evaluations = [m for m in modes if m.startswith("eval-")]
    modes = [m for m in modes if not m.startswith("eval-")]
    secret = Path(token_file).read_text().strip()
    metadata = ((CLIENT_ID_KEY, str(client_id)), (SECRET_KEY, secret))
    config, calls = None, []
    try:
        while True:
            # Sessions left behind stay open and silent, as a connection broken on this side only.
            outbox = queue.Queue()
            calls.append(
                grpc.insecure_channel(f"127.0.0.1:{port}").stream_stream(METHOD)(
                    iter(outbox.get, None), metadata=metadata
                )
            )
            for raw in calls[-1]:
                message = decode(raw)
                if message.kind == Kind.WELCOME:
                    settings = message.header["config"]
                    config = ClientConfig(local_epochs=settings["local_epochs"], batch_size=settings["batch_size"])
                elif message.kind == Kind.TASK:
                    print(f"task {message.header['task']}", flush=True)
                    mode = modes.pop(0) if modes else "hang"
                    if mode == "norm":
                        model = {k[len("global/") :]: v for k, v in message.tensors.items() if k.startswith("global/")}
                        torch.save(model, f"stub-{client_id}-task-{message.header['task']}.pt")
                    if mode == "reconnect":
                        break
                    if mode == "hang":
                        time.sleep(3600)
                    outbox.put(bad_update(mode, message, config))
                    if mode == "twice":
                        outbox.put(bad_update(mode, message, config))
                elif message.kind == Kind.EVALUATE:
                    mode = evaluations.pop(0) if evaluations else "eval-ok"
                    print(f"evaluate {message.header['task']} {mode}", flush=True)
                    if mode == "eval-exit":
                        return
                    outbox.put(evaluation(mode, message, client_id))
                elif message.kind in (Kind.SHUTDOWN, Kind.REJECT):
                    print(message.kind.name, message.header, flush=True)
                    return
            else:
                return
    except grpc.RpcError as e:
        print("rpc error", e.code(), flush=True)


if __name__ == "__main__":
    main()
