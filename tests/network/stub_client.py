"""A scripted client for the deployment tests: it speaks the protocol but misbehaves on purpose.

    python stub_client.py PORT CLIENT_ID TOKEN_FILE MODE[,MODE...]

Each MODE answers one task: "hang" (never answer), "shape" (a delta of the wrong shape), "nan",
"oversized" (a message past --max-message-mb), "late" (an update for another task). It prints
"task N" when a task arrives, so a test can kill it mid-round.
"""

import queue
import sys
import time
from pathlib import Path

import grpc
import torch

from fedforge.network.server import METHOD
from fedforge.network.wire import Kind, Message, decode, encode


def bad_update(mode, task):
    h = task.header
    delta = {k[len("global/"):]: torch.zeros_like(v) for k, v in task.tensors.items() if k.startswith("global/")}
    header = {"task": h["task"], "num_examples": 10, "num_steps": 1, "train_loss": 1.0, "train_accuracy": 0.5}
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
    return Message(Kind.UPDATE, header, {f"delta/{k}": v for k, v in delta.items()})


def main():
    port, client_id, token_file, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
    outbox = queue.Queue()
    secret = Path(token_file).read_text().strip()
    outbox.put(encode(Message(Kind.HELLO, {"client_id": client_id, "secret": secret})))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        for raw in channel.stream_stream(METHOD)(iter(outbox.get, None)):
            message = decode(raw)
            if message.kind == Kind.TASK:
                print(f"task {message.header['task']}", flush=True)
                mode = modes.pop(0) if modes else "hang"
                if mode == "hang":
                    time.sleep(3600)
                outbox.put(encode(bad_update(mode, message)))
            elif message.kind in (Kind.SHUTDOWN, Kind.REJECT):
                print(message.kind.name, message.header, flush=True)
                break
    except grpc.RpcError as e:
        print("rpc error", e.code(), flush=True)
    outbox.put(None)


if __name__ == "__main__":
    main()
