"""LoRA over a frozen transformers base: the vectorized engine trains many clients' adapters over
one copy of the base, and equals the sequential engine."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedforge import ClientConfig, FederatedData, simulate
from fedforge.data import TensorData, dirichlet
from fedforge.engines import ClientTask, SequentialEngine, VectorizedEngine
from fedforge.tasks import Task

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, LENGTH = 100, 12


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Logits(nn.Module):
    """A transformers model as fedforge calls it: model(input_ids, attention_mask) -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def llama(kind: str, dtype: torch.dtype = torch.float32, *, tied: bool = False, dropout: float = 0.0) -> nn.Module:
    """A tiny Llama (random weights, no download) with LoRA r=8 on q_proj and v_proj; the base
    frozen by peft, and a classifier's score head trained (shared) beside the adapters."""
    # Eager attention: SDPA's mask builder tests the mask's values in Python (`padding_mask.all()`),
    # which vmap cannot batch.
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=3,
        attn_implementation="eager",
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    base = (transformers.LlamaForCausalLM if kind == "causal" else transformers.LlamaForSequenceClassification)(config)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=dropout))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: a random B makes the adapters matter from step one
            nn.init.normal_(p, std=0.02)
        if kind == "classifier" and name.endswith("score.weight"):
            p.requires_grad_(True)
    return Logits(model).to(dtype)


def _next_token(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _next_token_sums(logits, labels):
    flat, target = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    counted = target != -100
    return {
        "loss": F.cross_entropy(flat, target, ignore_index=-100, reduction="sum"),
        "accuracy": ((flat.argmax(1) == target) & counted).sum(),
    }


def _tokens(labels):
    return int((labels[:, 1:] != -100).sum())


CAUSAL_LM = Task("causal-lm", _next_token, _next_token_sums, units=_tokens)


def _classification_sums(logits, y):
    return {"loss": F.cross_entropy(logits, y, reduction="sum"), "accuracy": (logits.argmax(1) == y).sum()}


CLASSIFIER = Task("classifier", lambda logits, y: F.cross_entropy(logits, y), _classification_sums)


def tokens(kind: str, n: int = 96, seed: int = 0) -> TensorData:
    """Random token sequences of 4..LENGTH tokens, padded on the right (mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=g)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    ids = ids * mask  # pad_token_id 0
    if kind == "causal":
        return TensorData((ids, mask), ids.masked_fill(mask == 0, -100))
    return TensorData((ids, mask), torch.randint(0, 3, (n,), generator=g))


def run(engine, kind, *, optimizer="sgd", dtype=torch.float32, rounds=2, tied=False, test=None):
    data = tokens(kind)
    labels = np.zeros(len(data), dtype=np.int64) if kind == "causal" else data.y.numpy()
    parts = dirichlet(labels, 6, alpha=1.0, rng=np.random.default_rng(0))
    task = CAUSAL_LM if kind == "causal" else CLASSIFIER
    if optimizer != "sgd":
        task = task.with_optimizer(optimizer)
    config = ClientConfig(task=task, lr=0.05 if optimizer == "sgd" else 0.01, batch_size=8, local_epochs=1)
    return simulate(
        llama(kind, dtype, tied=tied),
        FederatedData(data, parts, test),
        rounds=rounds,
        clients_per_round=4,
        client=config,
        engine=engine,
        seed=2,
    )


@pytest.mark.parametrize("kind", ["causal", "classifier"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_lora_clients_batched_over_one_base_equal_sequential(kind, optimizer, dtype):
    engine = VectorizedEngine()
    vectorized = run(engine, kind, optimizer=optimizer, dtype=dtype)
    sequential = run(SequentialEngine(), kind, optimizer=optimizer, dtype=dtype)
    assert str(engine.choice) == "vectorized (torch.func kernel)"
    params = vectorized.state.params
    # Only the adapters (and the classifier's head) are shared: the frozen base is not the server's.
    assert params and all("lora_" in n or n.endswith("score.weight") for n in params)
    assert any(n.endswith("score.weight") for n in params) == (kind == "classifier")
    assert vectorized.history.column("clients") == sequential.history.column("clients")
    tight = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {}
    for name, value in params.items():
        torch.testing.assert_close(value, sequential.state.params[name], **tight, msg=name)
    first = llama(kind, dtype).state_dict()
    assert any(not torch.equal(first[n], v) for n, v in params.items()), "the adapters trained"
    for a, b in zip(vectorized.history.records[1:], sequential.history.records[1:], strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)


def test_a_head_tied_to_the_frozen_embedding_is_frozen_with_it():
    # Evaluated too: the model's state names the tied weight twice.
    engine, test = VectorizedEngine(), tokens("causal", 16, seed=5)
    vectorized = run(engine, "causal", optimizer="adamw", tied=True, test=test)
    sequential = run(SequentialEngine(), "causal", optimizer="adamw", tied=True, test=test)
    assert str(engine.choice) == "vectorized (torch.func kernel)"
    assert all("lora_" in n for n in vectorized.state.params)
    assert vectorized.history.records[-1].test_loss == pytest.approx(sequential.history.records[-1].test_loss)
    for name, value in vectorized.state.params.items():
        torch.testing.assert_close(value, sequential.state.params[name], msg=name)


@pytest.mark.parametrize("engine", [VectorizedEngine, SequentialEngine])
def test_the_frozen_base_is_one_tensor_for_every_client(engine):
    # The base's weight a client's forward pass sees is the global state's own tensor, not a row of
    # a stack (vectorized: its matrix product runs once over every client's rows) nor a copy in a
    # scratch model (sequential: no copy of the base per client).
    model = llama("causal")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    name = next(n for n in state if n.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
    frozen = model.get_submodule(name.rpartition(".")[0])
    seen = []
    frozen.register_forward_pre_hook(lambda module, _: seen.append(module.weight.data_ptr() == state[name].data_ptr()))
    data = tokens("causal", 32)
    tasks = [ClientTask(c, data.rows(8 * c, 8 * c + 8), seed=c) for c in range(4)]
    engine = engine()
    updates = list(engine.run(model, state, tasks, ClientConfig(task=CAUSAL_LM, lr=0.05, batch_size=4)))
    if isinstance(engine, VectorizedEngine):
        assert str(engine.choice) == "vectorized (torch.func kernel)"
    assert len(updates) == 4 and seen and all(seen)
    assert all("lora_" in n for n in updates[0].delta)


def test_memory_for_a_chunk_leaves_the_frozen_base_out():
    # The base is most of the model's weights, held once: more clients fit in a chunk than with it stacked.
    model = llama("causal")
    tasks = [ClientTask(c, tokens("causal", 8, seed=c), seed=c) for c in range(64)]
    config = ClientConfig(task=CAUSAL_LM, batch_size=4)
    frozen = VectorizedEngine(max_memory=1 << 26).capacity(model, tasks, config)
    for p in model.parameters():
        p.requires_grad_(True)
    whole = VectorizedEngine(max_memory=1 << 26).capacity(model, tasks, config)
    assert frozen > whole > 0


@pytest.mark.parametrize("why", ["sdpa", "dropout"])
def test_sdpa_attention_or_adapter_dropout_falls_back_to_sequential_saying_why(caplog, why):
    # SDPA's mask builder tests the padding mask's values in Python, which vmap cannot batch;
    # dropout is random.
    model = llama("causal", dropout=0.1 if why == "dropout" else 0.0)
    if why == "sdpa":
        model.model.set_attn_implementation("sdpa")
    data = tokens("causal", 16)
    tasks = [ClientTask(c, data.rows(8 * c, 8 * c + 8), seed=c) for c in range(2)]
    engine = VectorizedEngine()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        updates = list(engine.run(model, state, tasks, ClientConfig(task=CAUSAL_LM, batch_size=4)))
    assert len(updates) == 2 and engine.choice.engine == "sequential"
    hint = 'attn_implementation="sdpa"; "eager" batches'
    assert (hint in engine.choice.reason) == (why == "sdpa")
    assert ("random operation" in engine.choice.reason) == (why == "dropout")
    assert len(caplog.records) == 1 and "training its clients sequentially" in caplog.messages[0]


class FrozenEmbeddingLSTM(nn.Module):
    """A frozen embedding under a trained LSTM: `vmap` batches aten::lstm only under `grad`, which
    decomposes it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.embed.weight.requires_grad_(False)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask):
        return self.head(self.lstm(self.embed(input_ids))[0])


def test_an_operation_vmap_batches_only_under_grad_keeps_the_model_batched(caplog):
    # A model with a frozen base is differentiated outside vmap; the LSTM needs vmap(grad).
    data = tokens("causal", 32)
    tasks = [ClientTask(c, data.rows(8 * c, 8 * c + 8), seed=c) for c in range(4)]
    config = ClientConfig(task=CAUSAL_LM.with_optimizer("adamw"), lr=0.01, batch_size=4)
    deltas = {}
    for engine in (VectorizedEngine(), SequentialEngine()):
        model = FrozenEmbeddingLSTM()
        state = {k: v.detach() for k, v in model.state_dict().items()}
        with caplog.at_level(logging.WARNING, logger="fedforge"):
            deltas[engine.name] = [u.delta for u in engine.run(model, state, tasks, config)]
    assert not caplog.records
    assert all("embed.weight" not in d for d in deltas["vectorized"])
    for a, b in zip(deltas["vectorized"], deltas["sequential"], strict=True):
        for name, value in a.items():
            torch.testing.assert_close(value, b[name], msg=name)
