"""Federated LoRA fine-tuning benchmark: many clients' adapters over one frozen base.

A small Llama-architecture model built from a config with random weights (no download): 2 layers,
hidden 64, 4 heads, vocabulary 100, eager attention; LoRA r=8 on q_proj and v_proj (peft), the
base frozen. Causal-LM fine-tuning (next-token cross-entropy, padding ignored) on random token
sequences of 8..32 tokens; each client 16 of them, batch 8, one local epoch (2 steps), AdamW
(lr 1e-3, no weight decay). Per round, at each number of clients per round:

- vectorized: `simulate` with the vectorized engine (torch.func: the base's matrix products once
  over every client's rows, each client's adapters and AdamW moments its own);
- sequential: `simulate` with the sequential engine (one client after another, the same loop);
- peft loop: what a FlowerTune-style client does, one client after another: the global adapters
  loaded into the peft model (`set_peft_model_state_dict`), a fresh `torch.optim.AdamW`, a
  shuffled `DataLoader`, `get_peft_model_state_dict` after, and the adapters averaged.

Each case runs in a child process of its own, with one torch thread, so that its peak resident
memory is its own: printed as the growth of the peak over the resident memory once the model and
data are built (the base is held once: the growth is the chunk's adapters, optimizer state and
activations, not a copy of the base per client). Seconds per round: the median of the rounds
after the first, wall-clock and CPU (the process's: on a loaded machine the steadier of the two).
Also printed: how many clients a chunk of the vectorized engine holds, and the bytes a client
sends per round (the adapters) against the whole model's.

    python benchmarks/fine_tuning.py                          # 8, 32 and 128 clients per round
    python benchmarks/fine_tuning.py --clients 8 32 --rounds 3
    python benchmarks/fine_tuning.py --hidden 256 --vocab 8000  # a base of 5M parameters
    python benchmarks/fine_tuning.py --cases vectorized --max-memory 17179869184  # every client in one chunk
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.algorithms import nbytes
from fedforge.data import TensorData, iid
from fedforge.engines import ClientTask, SequentialEngine, VectorizedEngine, engine_choice
from fedforge.tasks import Task

EXAMPLES, LENGTH, BATCH, LR = 16, 32, 8, 1e-3
CASES = ("vectorized", "sequential", "peft-loop")


class Logits(nn.Module):
    """A transformers model as fedforge calls it: model(input_ids, attention_mask) -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def build_model(hidden: int, vocab: int, layers: int) -> Logits:
    import peft
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=LENGTH,
        pad_token_id=0,
        attn_implementation="eager",  # SDPA's mask builder cannot run under vmap
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return Logits(peft.get_peft_model(base, lora))


def _next_token(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _next_token_sums(logits, labels):
    return {
        "loss": F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
    }


def _tokens(labels) -> int:
    return int((labels[:, 1:] != -100).sum())


CAUSAL_LM = Task("causal-lm", _next_token, _next_token_sums, units=_tokens).with_optimizer("adamw", weight_decay=0.0)


def token_data(n: int, vocab: int, seed: int = 0) -> TensorData:
    """Random sequences of 8..LENGTH tokens, padded on the right (mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, LENGTH), generator=g)
    mask = (torch.arange(LENGTH) < torch.randint(8, LENGTH + 1, (n,), generator=g)[:, None]).long()
    ids = ids * mask
    return TensorData((ids, mask), ids.masked_fill(mask == 0, -100))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def fedforge_rounds(
    engine_name: str, model: nn.Module, data: TensorData, parts, per_round: int, rounds: int, max_memory: int | None
) -> dict:
    engine = VectorizedEngine(max_memory) if engine_name == "vectorized" else SequentialEngine()
    config = ClientConfig(task=CAUSAL_LM, lr=LR, batch_size=BATCH, local_epochs=1)
    cpu = []  # process seconds at the end of each round (round 0: the initial evaluation)
    result = simulate(
        model,
        FederatedData(data, parts, None),
        rounds=rounds,
        clients_per_round=per_round,
        client=config,
        engine=engine,
        seed=0,
        on_round=lambda record, state: cpu.append(time.process_time()),
    )
    records = result.history.records[1:]
    choice = str(engine_choice(engine))
    if isinstance(engine, VectorizedEngine):
        tasks = [ClientTask(c, data.rows(0, len(parts[c])), seed=c) for c in range(per_round)]  # sizes alone count
        choice += f", {engine.chunk_size(model, tasks, config)} clients a chunk"
    return {
        "seconds": [r.train_seconds for r in records],
        "cpu": [b - a for a, b in itertools.pairwise(cpu)],
        "loss": records[-1].train_loss,
        "choice": choice,
    }


def peft_loop_rounds(model: Logits, data: TensorData, parts, per_round: int, rounds: int) -> dict:
    """FlowerTune's shape: each selected client loads the global adapters, trains them with its own
    torch optimizer and DataLoader, and returns them; the server averages (weighted by examples)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from torch.utils.data import DataLoader, TensorDataset

    peft_model = model.model
    global_adapters = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    rng = np.random.default_rng(0)
    seconds, cpu, loss = [], [], float("nan")
    ids, mask = data.x
    for _ in range(rounds):
        start, cpu_start = time.perf_counter(), time.process_time()
        chosen = rng.choice(len(parts), per_round, replace=False)
        total = sum(len(parts[c]) for c in chosen)
        summed = {k: torch.zeros_like(v) for k, v in global_adapters.items()}
        losses = []
        for c in chosen:
            set_peft_model_state_dict(peft_model, global_adapters)
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
            rows = torch.as_tensor(parts[c])
            loader = DataLoader(TensorDataset(ids[rows], mask[rows], data.y[rows]), batch_size=BATCH, shuffle=True)
            for batch_ids, batch_mask, labels in loader:
                value = _next_token(model(batch_ids, batch_mask), labels)
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
                losses.append(value.item())
            for k, v in get_peft_model_state_dict(peft_model).items():
                summed[k] += v.detach() * (len(parts[c]) / total)
        global_adapters = summed
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        loss = statistics.mean(losses)
    return {"seconds": seconds, "cpu": cpu, "loss": loss, "choice": "peft loop"}


def run_case(
    case: str, per_round: int, rounds: int, hidden: int, vocab: int, layers: int, max_memory: int | None
) -> dict:
    torch.set_num_threads(1)
    num_clients = 2 * per_round
    data = token_data(num_clients * EXAMPLES, vocab)
    parts = iid(len(data), num_clients, rng=np.random.default_rng(0))
    model = build_model(hidden, vocab, layers)
    state = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = rss_bytes()
    if case == "peft-loop":
        out = peft_loop_rounds(model, data, parts, per_round, rounds)
    else:
        out = fedforge_rounds(case, model, data, parts, per_round, rounds, max_memory)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        **out,
        "peak_growth": peak - before,
        "rss_before": before,
        "model_bytes": nbytes(state),
        "adapter_bytes": nbytes({n: v for n, v in state.items() if n in trainable}),
    }


def _median(per_round: list[float]) -> float:
    """The median round, the first (warm-up) left out when there are others."""
    return statistics.median(per_round[1:] or per_round)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128], help="clients per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=100)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument(
        "--max-memory", type=int, help="the vectorized engine's bytes for a chunk (default: its own, 64 MiB on the CPU)"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # a child's: CASE:CLIENTS
    args = parser.parse_args()
    shape = (args.rounds, args.hidden, args.vocab, args.layers, args.max_memory)
    if args.case:
        case, per_round = args.case.split(":")
        print(json.dumps(run_case(case, int(per_round), *shape)))
        return
    print(f"tiny Llama: hidden {args.hidden}, vocabulary {args.vocab}, {args.layers} layers, LoRA r=8 (q_proj, v_proj)")
    print(f"{EXAMPLES} sequences of <= {LENGTH} tokens a client, batch {BATCH}, 1 epoch, AdamW; one torch thread")
    print(
        f"{'clients':>7} {'case':<11} {'s/round':>8} {'x peft':>7} {'cpu s':>7} {'x peft':>7} {'peak MiB':>9} "
        f"{'loss':>7}  trained by"
    )
    sizes = None
    for per_round in args.clients:
        results = {}
        for case in args.cases:
            command = [sys.executable, __file__, "--case", f"{case}:{per_round}", *sys.argv[1:]]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            results[case] = json.loads(line)
        loop = results.get("peft-loop")
        for case, r in results.items():
            per, cpu = _median(r["seconds"]), _median(r["cpu"])
            ratio, cpu_ratio = (
                (f"{_median(loop['seconds']) / per:.1f}", f"{_median(loop['cpu']) / cpu:.1f}") if loop else ("-", "-")
            )
            print(
                f"{per_round:>7} {case:<11} {per:>8.3f} {ratio:>7} {cpu:>7.3f} {cpu_ratio:>7} "
                f"{r['peak_growth'] / 2**20:>9.1f} {r['loss']:>7.4f}  {r['choice']}"
            )
            sizes = r
    if sizes is not None:
        print(
            f"bytes a client sends per round: {sizes['adapter_bytes']:,} (adapters) vs {sizes['model_bytes']:,} "
            f"(whole model); resident after setup {sizes['rss_before'] / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
