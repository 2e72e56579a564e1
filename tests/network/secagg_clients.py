"""Several deployment clients in one process (threads), for the secure aggregation tests.

    python secagg_clients.py PORT IDS DATASET:N [--die STAGE:TASK] [--hostile ID=MODE:TASK ...]

Each id in IDS (comma-separated) runs fedforge's own client (`run_client`) on part id of the
N-way partition of DATASET. `--die STAGE:TASK` kills the whole process (os._exit: every client in
it dies at once, as a machine that loses power) when its first client reaches STAGE of task TASK:
"keys" (it has sent its public keys), "shares" (it has sent its shares) or "upload" (it has sent
its masked input). `--hostile ID=MODE:TASK` makes client ID misbehave in task TASK: "badshare"
(reveals an altered share when unmasking), "other" (sends its shares in another client's name),
"malformed" (a masked input one word short), "twice" (sends its masked input two times), "garbage"
(seals shares nobody can open), "replay" (sends the sealed shares of its previous task again),
"seed" (commits to a seed other than the one it shares), "liar" (reports a neighbour's good
shares as unopenable), "heavy" (weighs its update as 850 examples, past any cap), "differ" (its
keys carry an inputs_differ flag that is not a bool). TASK "*": every task.
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
from fedforge.secagg.quantize import Quantizer

STAGES = {"keys": Kind.SA_NEIGHBOUR_KEYS, "shares": Kind.SA_INPUT, "upload": Kind.SA_UNMASK}
local = threading.local()


class Outbox(queue.Queue):
    """The client's outbox; puts an item twice when its thread asked for that (mode "twice")."""

    def put(self, item, *args, **kwargs):
        super().put(item, *args, **kwargs)
        if getattr(local, "twice", False):
            local.twice = False
            super().put(item, *args, **kwargs)


previous = {}  # client -> the sealed shares it sent in its previous task


def tamper(data: bytes, mode: str, client_id: int, secure) -> bytes:
    message = decode(data)
    header, tensors = dict(message.header), dict(message.tensors)
    if mode == "garbage":
        header["shares"] = {
            j: base64.b64encode(os.urandom(len(base64.b64decode(v)))).decode() for j, v in header["shares"].items()
        }
    elif mode == "replay":
        header["shares"], previous[client_id] = previous.get(client_id, header["shares"]), header["shares"]
    elif mode == "seed":
        header["seed"] = base64.b64encode(os.urandom(32)).decode()
    elif mode == "liar":
        good = sorted(secure.protocol._held)[0]
        header["complaints"] = {str(good): base64.b64encode(secure.protocol._c[good].private_bytes_raw()).decode()}
    elif mode == "badshare":
        other = next(k for k in header["b"] if k != str(client_id))
        share = bytearray(base64.b64decode(header["b"][other]))
        share[-1] ^= 1
        header["b"] = {**header["b"], other: base64.b64encode(bytes(share)).decode()}
    elif mode == "other":
        header["client"] = client_id + 1
    elif mode == "malformed":
        tensors["masked"] = tensors["masked"][:-1]
    elif mode == "range":  # words past any sum of clipped inputs: an update coordinate and both counters
        masked = tensors["masked"].clone()
        masked[[0, -2, -1]] += 1 << 30
        tensors["masked"] = masked
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
        hostile[int(who)] = (mode, task if task == "*" else int(task))
    when = {
        "badshare": Kind.SA_UNMASK,
        "other": Kind.SA_NEIGHBOUR_KEYS,
        "malformed": Kind.SA_INPUT,
        "twice": Kind.SA_INPUT,
        "garbage": Kind.SA_NEIGHBOUR_KEYS,
        "replay": Kind.SA_NEIGHBOUR_KEYS,
        "seed": Kind.SA_NEIGHBOUR_KEYS,
        "liar": Kind.SA_INPUT,
        "heavy": None,
        "range": Kind.SA_INPUT,
        "differ": None,
    }
    respond, quantize, answer = _SecureRound.respond, _SecureRound.quantize, _SecureRound.answer

    def differ(self, kind, header, tensors=None):
        """Keys whose inputs_differ flag is a string (the honest client sends true or nothing)."""
        mode, at = hostile.get(self.protocol.id, (None, None))
        if mode == "differ" and kind == Kind.SA_KEYS and at in (self.task_id, "*"):
            print(f"client {self.protocol.id}: differ in task {self.task_id}", flush=True)
            header = {**header, "inputs_differ": "yes"}
        return answer(self, kind, header, tensors)

    def heavy(self, update, order):
        """Weigh the update as 850 examples whatever the round's cap (the honest client caps it)."""
        if hostile.get(self.protocol.id, (None,))[0] != "heavy":
            return quantize(self, update, order)
        import torch

        flat = torch.cat(
            [update.delta[k].detach().reshape(-1).double() for k in order if update.delta[k].is_floating_point()]
        )
        flat = flat * min(1.0, self.setup.clip / max(float(torch.linalg.vector_norm(flat)), 1e-12))
        q = Quantizer(self.setup.clients, self.setup.clip, self.setup.max_weight)
        lax = types.SimpleNamespace(max_weight=10**9, clip=q.clip, scale=q.scale, loss_scale=q.loss_scale)
        self.input = Quantizer.encode(lax, flat.numpy(), 850, True, update.train_loss)
        self.weight = 850
        print(f"client {self.protocol.id}: weighs as 850 examples in task {self.task_id}", flush=True)

    def patched(self, message):
        task = message.header.get("task")
        if die and message.kind == STAGES[die[0]] and task == int(die[1]):
            print(f"dying at {die[0]} of task {task}", flush=True)
            os._exit(0)
        data = respond(self, message)
        mode, at = hostile.get(self.protocol.id, (None, None))
        if at in (task, "*") and message.kind == when[mode]:
            print(f"client {self.protocol.id}: {mode} in task {task}", flush=True)
            if mode == "twice":
                local.twice = True
            else:
                data = tamper(data, mode, self.protocol.id, self)
        return data

    _SecureRound.respond, _SecureRound.quantize, _SecureRound.answer = patched, heavy, differ
    client_module.queue = types.SimpleNamespace(Queue=Outbox, Empty=queue.Empty)
    threads = []
    for client_id in map(int, args.ids.split(",")):
        secret = Path(f"client-{client_id}.token").read_text().strip()
        source = PartitionOf(dataset, client_id, int(count))
        threads.append(
            threading.Thread(
                target=run_client,
                args=(f"127.0.0.1:{args.port}", client_id, secret, source),
                kwargs={"root_cert": None, "give_up_after": 60},
                daemon=True,
            )
        )
        threads[-1].start()
    for thread in threads:
        thread.join()
    print("done", flush=True)


if __name__ == "__main__":
    main()
