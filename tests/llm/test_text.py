"""Text data for fine-tuning (fedforge.llm.text) and the causal-lm and sequence-classification tasks,
checked on a character tokenizer and tiny Llama models built from a config (random weights, no download)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedforge.data import Split, federate
from fedforge.errors import ConfigError, DataError
from fedforge.tasks import CAUSAL_LM, IGNORE, SEQUENCE_CLASSIFICATION, make_task

transformers = pytest.importorskip("transformers")
text = pytest.importorskip("fedforge.llm.text")
from fedforge.llm.models import tiny_llama_config  # noqa: E402

SCENES = Path(__file__).parents[2] / "examples" / "data" / "shakespeare_scenes.txt"
# a 4, b 5, e 6, h 7, l 8, o 9 (after <pad> 0, <s> 1, </s> 2, <unk> 3)
A, B, E, H, L, O = range(4, 10)  # noqa: E741 (the letters they encode)
BOS, EOS, PAD = 1, 2, 0


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return text.char_tokenizer(alphabet="abehlo")


def tiny_llama(vocab_size: int, *, classes: int | None = None, seed: int = 0, attention: str = "sdpa"):
    config = tiny_llama_config(
        vocab_size,
        context=64,
        attn_implementation=attention,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        num_labels=classes or 2,
    )
    torch.manual_seed(seed)
    cls = transformers.LlamaForSequenceClassification if classes else transformers.LlamaForCausalLM
    return cls(config).eval()


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


# -- tokenization ---------------------------------------------------------------------------------------


def test_plain_text_rows_are_bos_text_eos_right_padded_with_labels_ignoring_the_padding(tok):
    data = text.causal_lm_data(tok, ["hello", "ab"], max_length=16)
    assert data.x["input_ids"].tolist() == [[BOS, H, E, L, L, O, EOS], [BOS, A, B, EOS, PAD, PAD, PAD]]
    assert data.x["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    assert data.y.tolist() == [[BOS, H, E, L, L, O, EOS], [BOS, A, B, EOS, IGNORE, IGNORE, IGNORE]]
    assert data.x["input_ids"].dtype == data.y.dtype == torch.int64


def test_padding_to_max_length_and_truncation(tok):
    padded = text.causal_lm_data(tok, ["ab"], max_length=6, padding="max_length")
    assert padded.x["input_ids"].tolist() == [[BOS, A, B, EOS, PAD, PAD]]
    cut = text.causal_lm_data(tok, ["hello", "ab"], max_length=4, truncation=True)
    assert cut.x["input_ids"].tolist() == [[BOS, H, E, L], [BOS, A, B, EOS]]
    assert cut.x["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    ids, mask = text.tokenize(tok, ["ab"], max_length=8)  # no EOS unless asked for
    assert ids.tolist() == [[BOS, A, B]] and mask.tolist() == [[1, 1, 1]]


def test_a_pad_token_that_is_the_eos_still_learns_the_eos(tok):
    """Llama's tokenizers pad with EOS: the labels follow the attention mask, not the pad id."""
    eos_pad = text.char_tokenizer(alphabet="abehlo")
    eos_pad.pad_token = eos_pad.eos_token
    data = text.causal_lm_data(eos_pad, ["hello", "ab"], max_length=16)
    assert data.x["input_ids"][1].tolist() == [BOS, A, B, EOS, EOS, EOS, EOS]
    assert data.y[1].tolist() == [BOS, A, B, EOS, IGNORE, IGNORE, IGNORE]


def test_text_longer_than_max_length_or_the_context_is_refused_without_truncation(tok):
    with pytest.raises(ConfigError) as error:
        text.causal_lm_data(tok, ["ab", "hello"], max_length=4, where="train.jsonl")
    message = one_line(error)
    assert "train.jsonl: row 2 is 7 tokens, more than max_length (4 tokens)" in message and "--truncation" in message
    short = text.char_tokenizer(alphabet="abehlo", model_max_length=5)
    with pytest.raises(ConfigError) as error:
        text.causal_lm_data(short, ["hello"])  # max_length defaults to the context
    assert "more than the model's context (5 tokens)" in one_line(error)
    with pytest.raises(ConfigError) as error:
        text.causal_lm_data(short, ["hello"], max_length=3)  # beyond both: only truncation helps
    message = one_line(error)
    assert "row 1 is 7 tokens, more than the model's context (5 tokens)" in message
    assert message.endswith("ask for truncation (--truncation)"), message
    with pytest.raises(ConfigError) as error:
        text.causal_lm_data(short, ["ab"], max_length=8)
    assert "max_length 8 is more than the model's context (5 tokens)" in one_line(error)
    with pytest.raises(ConfigError) as error:
        text.causal_lm_data(tok, ["ab"])  # a tokenizer that knows no context needs a max_length
    assert "--max-length" in one_line(error)
    assert text.causal_lm_data(short, ["hello"], truncation=True).x["input_ids"].tolist() == [[BOS, H, E, L, L]]


def test_response_only_labels_cover_exactly_the_response_tokens(tok):
    data = text.instruction_data(tok, ["ab", "hello"], ["hel", "a"], max_length=16)
    assert data.x["input_ids"].tolist() == [
        [BOS, A, B, H, E, L, EOS, PAD],
        [BOS, H, E, L, L, O, A, EOS],
    ]
    assert data.y.tolist() == [
        [IGNORE, IGNORE, IGNORE, H, E, L, EOS, IGNORE],
        [IGNORE] * 6 + [A, EOS],
    ]
    # Property: on every row the labels are the response's own encoding (and EOS), where it lies.
    prompts = ["b" * n for n in range(1, 6)]
    responses = ["hole"[: n % 4 + 1] for n in range(5)]
    data = text.instruction_data(tok, prompts, responses, max_length=32)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        start = 1 + len(prompt)
        kept = (data.y[i] != IGNORE).nonzero().flatten().tolist()
        assert kept == list(range(start, start + len(response) + 1))
        assert data.y[i, kept].tolist() == tok(response, add_special_tokens=False)["input_ids"] + [EOS]


def test_an_instruction_truncated_keeps_the_response_start_and_a_prompt_that_fills_the_row_is_refused(tok):
    data = text.instruction_data(tok, ["ab"], ["hello"], max_length=5, truncation=True)
    assert data.x["input_ids"].tolist() == [[BOS, A, B, H, E]] and data.y.tolist() == [[IGNORE] * 3 + [H, E]]
    with pytest.raises(ConfigError) as error:
        text.instruction_data(tok, ["hello"], ["ab"], max_length=5, truncation=True)
    assert "row 1 has no response token within max_length (5" in one_line(error)


def test_the_template_fills_the_prompt_from_the_rows_columns(tok):
    options = text.TextOptions(
        instruction_column="q", response_column="r", template="{q}:{c}:", max_length=32, add_eos=False
    )
    assert options.columns("causal-lm") == ["q", "c", "r"]
    splits = {"train": {"q": ["ab"], "c": ["b"], "r": ["ole"]}, "test": {"q": ["a"], "c": ["h"], "r": ["e"]}}
    dataset = text.text_dataset(splits, text.char_tokenizer(alphabet="abehlo:"), task="causal-lm", options=options)
    ids = dataset.train.x["input_ids"][0].tolist()
    assert len(ids) == 1 + len("ab:b:ole") and dataset.train.y[0].tolist()[-3:] == ids[-3:]
    assert (dataset.train.y[0] != IGNORE).sum() == 3 and len(dataset.test) == 1
    with pytest.raises(ConfigError):
        text.TextOptions(instruction_column="q", response_column="r", template="{q}{r}")
    with pytest.raises(ConfigError):
        text.TextOptions(instruction_column="q")


# -- the tasks against transformers' own losses ---------------------------------------------------------


def test_the_causal_lm_loss_is_transformers_own_on_plain_text_and_on_instructions(tok):
    model = tiny_llama(len(tok))
    for data in (
        text.causal_lm_data(tok, ["hello", "ab", "bob"], max_length=16),
        text.instruction_data(tok, ["hello", "ab", "b"], ["ab", "hole", "e"], max_length=16),
    ):
        with torch.no_grad():
            out = model(**data.x)
            expected = model(**data.x, labels=data.y).loss
        torch.testing.assert_close(CAUSAL_LM.checked_loss(out, data.y), expected)
        torch.testing.assert_close(CAUSAL_LM.loss(out.logits, data.y), expected)  # logits alone too


def test_causal_lm_sums_combine_across_batches_exactly(tok):
    model = tiny_llama(len(tok))
    data = text.causal_lm_data(tok, ["hello", "ab", "bob", "a", "hollab"], max_length=16)
    task = make_task("causal-lm")
    with torch.no_grad():
        whole = task.metric_sums(model(**data.x), data.y)
        halves = [data.rows(0, 2), data.rows(2, 5)]
        parts = [task.metric_sums(model(**part.x), part.y) for part in halves]
        mean = float(task.loss(model(**data.x), data.y))
        predicted = model(**data.x).logits[:, :-1].argmax(-1)
    units = task.units(data.y)
    assert units == sum(task.units(part.y) for part in halves) == 7 + 4 + 5 + 3 + 8 - 5  # tokens, less each row's first
    for name in ("loss", "token_accuracy"):
        torch.testing.assert_close(sum(p[name] for p in parts), whole[name], rtol=1e-6, atol=1e-5)
    summary = task.summarize({k: float(v) for k, v in whole.items()}, units)
    torch.testing.assert_close(summary["loss"], mean, rtol=1e-5, atol=0)
    assert summary["perplexity"] == pytest.approx(math.exp(summary["loss"]))
    right = ((predicted == data.y[:, 1:]) & (data.y[:, 1:] != IGNORE)).sum()
    assert whole["token_accuracy"] == right and 0 <= summary["token_accuracy"] <= 1


def test_a_batch_with_nothing_to_predict_has_loss_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = CAUSAL_LM.loss(logits, torch.full((2, 3), IGNORE))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()


def test_sequence_classification_is_transformers_own_loss(tok):
    model = tiny_llama(len(tok), classes=3)
    data = text.classification_data(tok, ["hello", "ab", "bob", "a"], [0, 2, 1, 2], max_length=16)
    with torch.no_grad():
        out = model(**data.x)
        expected = model(**data.x, labels=data.y).loss
    assert out.logits.shape == (4, 3)
    torch.testing.assert_close(SEQUENCE_CLASSIFICATION.checked_loss(out, data.y), expected)
    sums = SEQUENCE_CLASSIFICATION.metric_sums(out, data.y)
    torch.testing.assert_close(sums["loss"] / 4, expected)
    assert sums["accuracy"] == (out.logits.argmax(1) == data.y).sum()


def test_a_model_output_without_logits_is_one_line():
    with pytest.raises(ConfigError) as error:
        CAUSAL_LM.loss({"hidden": torch.zeros(1)}, torch.zeros(1, 2, dtype=torch.long))
    assert "must be logits" in one_line(error)


# -- files ----------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: dict) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for values in zip(*rows.values(), strict=True):
            f.write(json.dumps(dict(zip(rows, values, strict=True))) + "\n")
    return path


def write_csv(path: Path, rows: dict) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(rows))
        writer.writerows(zip(*rows.values(), strict=True))
    return path


SENTIMENT = text.TextOptions(label_column="label", group_column="user", max_length=64)
SENTIMENT_LABELS = text.TextOptions(label_column="label", max_length=64)


def test_jsonl_csv_and_hf_give_the_same_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = text.sentiment_rows(60, num_users=6)
    rows["text"][0] = 'a "quoted", multi\nline text'  # CSV quoting and a newline inside a field
    tok = text.char_tokenizer(rows["text"])
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    specs = [
        f"jsonl:{write_jsonl(tmp_path / 'reviews.jsonl', rows)}",
        f"csv:{write_csv(tmp_path / 'reviews.csv', rows)}",
        f"hf:{tmp_path / 'hf'}",
    ]
    loaded = [text.load_text(spec, tok, task="sequence-classification", options=SENTIMENT) for spec in specs]
    first = loaded[0]
    assert first.name == "jsonl-reviews" and first.num_classes == 2
    assert len(first.train) == 48 and len(first.test) == 12
    for other in loaded[1:]:
        for part in ("train", "test"):
            a, b = getattr(first, part), getattr(other, part)
            assert torch.equal(a.y, b.y) and all(torch.equal(a.x[k], b.x[k]) for k in a.x)
        np.testing.assert_array_equal(first.groups, other.groups)
    # Numeric user ids sort as numbers from either file ("10" after "9").
    numbered = {**rows, "user": [int(u[4:]) + 5 for u in rows["user"]]}
    by_number = [
        text.load_text(f"{kind}:{write(tmp_path / f'n.{kind}', numbered)}", tok, task="causal-lm", options=SENTIMENT)
        for kind, write in (("jsonl", write_jsonl), ("csv", write_csv))
    ]
    np.testing.assert_array_equal(by_number[0].groups, by_number[1].groups)
    np.testing.assert_array_equal(by_number[0].groups, first.groups)
    # The first row's text survives each file's quoting.
    assert text.read_rows(specs[1], ["text"], text=["text"])["all"]["text"][0] == rows["text"][0]
    # A DatasetDict keeps its own train and test splits.
    whole = datasets.Dataset.from_dict(rows)
    datasets.DatasetDict({"train": whole.select(range(50)), "test": whole.select(range(50, 60))}).save_to_disk(
        str(tmp_path / "dd")
    )
    split = text.load_text(f"hf:{tmp_path / 'dd'}", tok, task="causal-lm", options=text.TextOptions(max_length=64))
    assert len(split.train) == 50 and len(split.test) == 10 and split.num_classes == len(tok)
    expected = text.causal_lm_data(tok, rows["text"][50:], max_length=64)
    width = expected.x["input_ids"].shape[1]
    assert torch.equal(split.test.x["input_ids"][:, :width], expected.x["input_ids"])


@pytest.mark.parametrize("label, shown", [("positive", "'positive'"), (1, "1.0")])
def test_a_label_column_of_one_value_is_one_line(tmp_path, label, shown):
    rows = {"text": ["good", "fine", "nice"], "label": [label] * 3}
    path = write_jsonl(tmp_path / "one.jsonl", rows)
    tok = text.char_tokenizer(rows["text"])
    with pytest.raises(DataError) as error:
        text.load_text(f"jsonl:{path}", tok, task="sequence-classification", options=SENTIMENT_LABELS)
    assert f"target column 'label' has a single value ({shown}): nothing to classify" in one_line(error)


def test_natural_partition_by_user_and_dirichlet_by_label(tmp_path):
    rows = text.sentiment_rows(200, num_users=8)
    tok = text.char_tokenizer(rows["text"])
    dataset = text.load_text(
        f"jsonl:{write_jsonl(tmp_path / 's.jsonl', rows)}", tok, task="sequence-classification", options=SENTIMENT
    )
    users = np.unique(dataset.groups)
    assert users.tolist() == list(range(8))
    natural = federate(dataset, Split("natural", num_clients=8), seed=0)
    for client, part in enumerate(natural.partition):
        assert (dataset.groups[part] == client).all() and len(part)
    skewed = federate(dataset, Split("dirichlet", num_clients=4, alpha=0.1), seed=0)
    assert sorted(np.concatenate(skewed.partition).tolist()) == list(range(len(dataset.train)))


@pytest.mark.parametrize(
    "content, limits, message",
    [
        (b'{"text": "' + b"a" * 5000 + b'"}\n', {"max_line_bytes": 4096}, "line 1: longer than 4096 bytes"),
        (b'{"text": "ok"}\n{"body": "no text"}\n', {}, "line 2: no column 'text' (the row has: 'body')"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {}, "line 2: not UTF-8 text (byte 13)"),
        (b'{"text": "a"}\n' * 11, {"max_rows": 10}, "more than 10 rows"),
        (b"x" * 2000, {"max_bytes": 1000}, "is 2000 bytes, more than fedforge reads (1000)"),
        (b'{"text": "ok"}\n{"text": \n', {}, "line 2: not JSON"),
        (b'["ok"]\n', {}, "line 1: a JSON Lines row must be an object, got list"),
        (b'{"text": 7}\n', {}, "line 1: column 'text' must hold text, got int"),
        (b'{"text": null}\n', {}, "line 1: column 'text' has no value"),
        (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", {"max_line_bytes": 1 << 20}, "line 1: not JSON"),
        (b'{"text": "' + b"a" * 300 + b'"}\n', {"max_text_chars": 256}, "300 characters, more than fedforge reads"),
        (b"\n\n", {}, "has no rows"),
    ],
)
def test_hostile_jsonl_is_refused_in_one_line(tmp_path, content, limits, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        text.read_rows(f"jsonl:{path}", ["text"], text=["text"], limits=text.TextLimits(**limits))
    assert message in one_line(error)


@pytest.mark.parametrize(
    "content, limits, message",
    [
        (b"text,label\n" + b"a" * 5000 + b",1\n", {"max_line_bytes": 4096}, "line 2: longer than 4096 bytes"),
        (b"body,label\nhi,1\n", {}, "has no column 'text' (its columns: body, label)"),
        (b"text,label\nhi,1\n\xff\xfe,0\n", {}, "line 3: not UTF-8 text (byte 0)"),
        (b"text,label\n" + b"hi,1\n" * 11, {"max_rows": 10}, "more than 10 rows"),
        (b'text,label\n"' + b"a\n" * 70_000 + b'",1\n', {}, "not a readable CSV file: field larger than field limit"),
        (b"text,label\nhi,1,extra\n", {}, "line 2: 3 fields, but the header has 2"),
        (b"text,label\nhi,\n", {}, "line 2: column 'label' has no value"),
        (b"", {}, "is empty"),
    ],
)
def test_hostile_csv_is_refused_in_one_line(tmp_path, content, limits, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        text.read_rows(f"csv:{path}", ["text", "label"], text=["text"], limits=text.TextLimits(**limits))
    assert message in one_line(error)


def test_hostile_hf_data_is_refused_in_one_line(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a", None, "b"], "n": [1, 2, 3]}).save_to_disk(str(tmp_path / "d"))
    for columns, limits, message in [
        (["text"], {}, "row 2: column 'text' has no value"),
        (["body"], {}, "has no column 'body' (its columns: text, n)"),
        (["n"], {}, "row 1: column 'n' must hold text, got int"),
        (["text"], {"max_rows": 2}, "has 3 rows, more than fedforge reads (2)"),
        (["text"], {"max_bytes": 8}, "bytes of data, more than fedforge reads (8)"),
    ]:
        with pytest.raises(DataError) as error:
            text.read_rows(f"hf:{tmp_path / 'd'}", columns, text=columns, limits=text.TextLimits(**limits))
        assert message in one_line(error)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as error:
        text.read_rows(f"hf:{tmp_path / 'empty'}", ["text"])
    assert "is not a Hugging Face dataset" in one_line(error)


def test_bad_sources_and_options_are_one_line(tmp_path):
    for spec, message in [
        (f"txt:{tmp_path}", "text data are jsonl:PATH, csv:PATH, hf:PATH"),
        (f"jsonl:{tmp_path / 'none.jsonl'}", "does not exist"),
        (f"csv:{tmp_path}", "is a folder, not a CSV file"),
    ]:
        with pytest.raises((ConfigError, DataError)) as error:
            text.read_rows(spec, ["text"])
        assert message in one_line(error)
    for options, message in [
        ({"padding": "batch"}, "padding must be one of longest, max_length"),
        ({"max_length": 1}, "max_length must be >= 2"),
        ({"template": "{", "instruction_column": "q", "response_column": "r"}, "not a format string"),
        # A format spec could pad a row to a gigabyte: a template may come from a deployment's server.
        ({"template": "{q:>999999999}", "instruction_column": "q", "response_column": "r"}, "and nothing more"),
        ({"template": "{q!r}", "instruction_column": "q", "response_column": "r"}, "and nothing more"),
        ({"template": "{q.__class__}", "instruction_column": "q", "response_column": "r"}, "and nothing more"),
    ]:
        with pytest.raises(ConfigError) as error:
            text.TextOptions(**options)
        assert message in one_line(error)
    with pytest.raises(ConfigError) as error:
        text.TextOptions().columns("sequence-classification")
    assert "needs a label column (--label-column)" in one_line(error)


# -- bundled and synthetic text, the character tokenizer ------------------------------------------------


def test_shakespeare_roles_become_plain_text_rows_one_client_per_role():
    rows = text.shakespeare_rows(SCENES.read_text(), max_chars=120)
    roles = list(dict.fromkeys(rows["role"]))
    assert "THE_TRAGEDY_OF_HAMLET__PRINCE_OF_DENMARK_HAMLET" in roles and len(roles) >= 10
    assert all(len(t) <= 120 or " " not in t for t in rows["text"])
    assert any(t.startswith("Who's there?") for t in rows["text"])  # Bernardo's first line
    tok = text.char_tokenizer(rows["text"])
    dataset = text.text_dataset(
        {"all": rows}, tok, task="causal-lm", options=text.TextOptions(group_column="role", max_length=128)
    )
    clients = len(np.unique(dataset.groups))
    natural = federate(dataset, Split("natural", num_clients=clients), seed=0)
    assert sum(map(len, natural.partition)) == len(dataset.train) and dataset.num_classes == len(tok)


def test_the_synthetic_sentiment_rows_are_deterministic_and_skewed_by_user():
    rows = text.sentiment_rows(300, num_users=6, seed=1)
    assert rows == text.sentiment_rows(300, num_users=6, seed=1) != text.sentiment_rows(300, num_users=6, seed=2)
    assert len(rows["text"]) == 300 and set(rows["label"]) == {"positive", "negative"}
    shares = [
        np.mean([lab == "positive" for lab, u in zip(rows["label"], rows["user"], strict=True) if u == user])
        for user in sorted(set(rows["user"]))
    ]
    assert max(shares) - min(shares) > 0.3


def test_the_char_tokenizer_saves_and_loads_as_a_transformers_tokenizer(tmp_path):
    tok = text.char_tokenizer(["hello world\n", "Wer?"])
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == list(text.CHAR_SPECIALS)
    ids = tok("hello Wer?\nzz")["input_ids"]
    assert ids[0] == BOS and ids[-2:] == [3, 3]  # <unk> for characters not seen
    assert tok.decode(ids, skip_special_tokens=True) == "hello Wer?\n"
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again("hello Wer?\nzz")["input_ids"] == ids and again.pad_token_id == PAD and again.eos_token_id == EOS


# -- end to end: federated runs on the text datasets ----------------------------------------------------


class Logits(torch.nn.Module):
    """A transformers model as fedforge's engines call it: model(**x) -> the logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def test_shakespeare_roles_as_clients_lower_a_tiny_llamas_perplexity():
    import fedforge as ff

    rows = text.shakespeare_rows(SCENES.read_text(), max_chars=120)
    tok = text.char_tokenizer(rows["text"])
    options = text.TextOptions(group_column="role", max_length=128)
    dataset = text.text_dataset({"all": rows}, tok, task="causal-lm", options=options)
    data = federate(dataset, Split("natural", num_clients=len(np.unique(dataset.groups))), seed=0)
    model = Logits(tiny_llama(len(tok)).train())
    config = ff.ClientConfig(batch_size=8, lr=3e-3, task=make_task("causal-lm", optimizer="adamw"))
    result = ff.simulate(model, data, rounds=3, clients_per_round=6, client=config)
    perplexity = result.history.column("test_perplexity")
    assert perplexity[0] > 50 and perplexity[-1] < 0.6 * perplexity[0]  # measured: 64 -> 31


def test_a_tiny_llama_learns_the_synthetic_sentiment_with_one_client_per_user():
    import fedforge as ff

    rows = text.sentiment_rows(400, num_users=8)
    tok = text.char_tokenizer(rows["text"])
    dataset = text.text_dataset({"all": rows}, tok, task="sequence-classification", options=SENTIMENT)
    data = federate(dataset, Split("natural", num_clients=8), seed=0)
    model = Logits(tiny_llama(len(tok), classes=2).train())
    config = ff.ClientConfig(batch_size=8, lr=3e-3, task=make_task("sequence-classification", optimizer="adamw"))
    result = ff.simulate(model, data, rounds=2, clients_per_round=8, client=config)
    accuracy = result.history.column("test_accuracy")
    assert accuracy[0] < 0.6 and accuracy[-1] > 0.8  # measured: 0.51 -> 0.86


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
def test_the_text_tasks_train_the_same_on_the_vectorized_and_the_sequential_engine(task):
    import fedforge as ff
    from fedforge.engines import SequentialEngine, VectorizedEngine

    rows = text.sentiment_rows(48, num_users=4)
    tok = text.char_tokenizer(rows["text"])
    dataset = text.text_dataset({"all": rows}, tok, task=task, options=SENTIMENT)
    data = federate(dataset, Split("natural", num_clients=4), seed=0)
    config = ff.ClientConfig(batch_size=4, lr=3e-3, task=make_task(task, optimizer="adamw"))
    classes = 2 if task == "sequence-classification" else None
    vectorized = VectorizedEngine()
    # Eager attention: transformers' SDPA mask asks whether the mask is all ones (data-dependent
    # control flow, which vmap refuses); the eager one does not.
    results = [
        ff.simulate(
            Logits(tiny_llama(len(tok), classes=classes, attention="eager").train()),
            data,
            rounds=1,
            clients_per_round=4,
            client=config,
            engine=e,
        )
        for e in (vectorized, SequentialEngine())
    ]
    assert vectorized.choice.engine == "vectorized", str(vectorized.choice)
    torch.testing.assert_close(results[0].state.params, results[1].state.params)
    assert results[0].history.column("test_loss") == pytest.approx(results[1].history.column("test_loss"))
