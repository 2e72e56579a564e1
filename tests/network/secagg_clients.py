"""Several deployment clients in one process (threads), for the secure aggregation tests.

    python secagg_clients.py PORT IDS DATASET:N [--die STAGE:TASK] [--hostile ID=MODE:TASK ...]

Each id in IDS (comma-separated) runs fedforge's own client (`run_client`) on part id of the
N-way partition of DATASET. `--die STAGE:TASK` kills the whole process (os._exit: every client in
it dies at once, as a machine that loses power) when its first client reaches STAGE of task TASK:
"keys" (it has sent its public keys), "shares" (it has sent its shares) or "upload" (it has sent
its masked input). `--hostile ID=MODE:TASK` makes client ID misbehave in task TASK: "badshare"
(reveals an altered share when unmasking), "other" (sends its shares in another client's name),
"malformed" (a masked input one word short), "twice" (sends its masked input two times).
"""

import argparse
import base64
import logging
import os
import queue
import sys
import threading
import types
from pathlib import Path

import fedforge.network.client as client_module
from fedforge.network.client import PartitionOf, _SecureRound, run_client
from fedforge.network.wire import Kind, Message, decode, encode

STAGES = {"keys": Kind.SA_NEIGHBOUR_KEYS, "shares": Kind.SA_INPUT, "upload": Kind.SA_UNMASK}
local = threading.local()


class Outbox(queue.Queue):
    """The client's outbox; puts an item twice when its thread asked for that (mode "twice")."""

    def put(self, item, *args, **kwargs):
        super().put(item, *args, **kwargs)
        if getattr(local, "twice", False):
            local.twice = False
            super().put(item, *args, **kwargs)


def tamper(data: bytes, mode: str, client_id: int) -> bytes:
    message = decode(data)
    header, tensors = dict(message.header), dict(message.tensors)
    if mode == "badshare":
        other = next(k for k in header["b"] if k != str(client_id))
        share = bytearray(base64.b64decode(header["b"][other]))
        share[-1] ^= 1
        header["b"] = {**header["b"], other: base64.b64encode(bytes(share)).decode()}
    elif mode == "other":
        header["client"] = client_id + 1
    elif mode == "malformed":
        tensors["masked"] = tensors["masked"][:-1]
    return encode(Message(message.kind, header, tensors))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port")
    parser.add_argument("ids")
    parser.add_argument("partition")
    parser.add_argument("--die")
    parser.add_argument("--hostile", nargs="*", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    dataset, count = args.partition.split(":")
    die = args.die.split(":") if args.die else None
    hostile = {}
    for spec in args.hostile:
        who, what = spec.split("=")
        mode, task = what.split(":")
        hostile[int(who)] = (mode, int(task))
    when = {"badshare": Kind.SA_UNMASK, "other": Kind.SA_NEIGHBOUR_KEYS, "malformed": Kind.SA_INPUT,
            "twice": Kind.SA_INPUT}
    respond = _SecureRound.respond

    def patched(self, message):
        task = message.header.get("task")
        if die and message.kind == STAGES[die[0]] and task == int(die[1]):
            print(f"dying at {die[0]} of task {task}", flush=True)
            os._exit(0)
        data = respond(self, message)
        mode, at = hostile.get(self.protocol.id, (None, None))
        if task == at and message.kind == when[mode]:
            print(f"client {self.protocol.id}: {mode} in task {task}", flush=True)
            if mode == "twice":
                local.twice = True
            else:
                data = tamper(data, mode, self.protocol.id)
        return data

    _SecureRound.respond = patched
    client_module.queue = types.SimpleNamespace(Queue=Outbox, Empty=queue.Empty)
    threads = []
    for client_id in map(int, args.ids.split(",")):
        secret = Path(f"client-{client_id}.token").read_text().strip()
        source = PartitionOf(dataset, client_id, int(count))
        threads.append(threading.Thread(target=run_client, args=(f"127.0.0.1:{args.port}", client_id, secret, source),
                                        kwargs={"root_cert": None, "give_up_after": 60}, daemon=True))
        threads[-1].start()
    for thread in threads:
        thread.join()
    print("done", flush=True)


if __name__ == "__main__":
    main()
