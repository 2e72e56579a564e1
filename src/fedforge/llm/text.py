"""Text for fine-tuning: rows of text read from a file, tokenized with the model's tokenizer, as
fedforge datasets for the `causal-lm` and `sequence-classification` tasks (fedforge.tasks).

Sources (`read_rows`): `jsonl:PATH`, JSON Lines, one object a line; `csv:PATH`, a CSV file whose
header names its columns; `hf:PATH`, a Hugging Face dataset written by `save_to_disk` (or
Parquet), as `fedforge.data.huggingface` reads it. The columns are named (`TextOptions`): a text
column, or an instruction and a response column; a label column (classification); a user or id
column, each row's group, the clients of the `natural` partition. Other columns are not read.

What the rows become (`text_dataset`), one row an example; inputs {input_ids, attention_mask},
passed as `model(**x)`, and the target the task needs:

- plain text (`causal-lm`): the text as the tokenizer encodes it (Llama's BOS first), then EOS;
  the target is the labels, the input ids with IGNORE (-100) at the padding.
- instruction and response (`causal-lm`, both columns named): the prompt, `template` filled from
  the row's columns (Alpaca's by default, as FlowerTune and NVFlare use it), encoded as a text,
  then the response encoded without special tokens, then EOS; the labels are IGNORE everywhere
  but on the response's tokens and the EOS, so that the loss is the response's alone. The two
  are encoded apart so that the labels cover exactly the response's tokens (encoding the
  concatenation can merge a token across the border).
- classification (`sequence-classification`): the text encoded; the target is the class id,
  labels becoming ids 0..k-1 in sorted order (numbers by value, strings alphabetically) as for
  tables.

Lengths: `max_length` tokens at most (default: the model's context, the tokenizer's
`model_max_length`, or `context` given); a row longer than that is refused in one line unless
`truncation` is asked for, which keeps its first `max_length` tokens (an instruction row must
keep one response token). Padding is on the right, to one length for the whole dataset:
`padding="longest"` the longest row (at most max_length), `"max_length"` max_length. Not the
longest in each batch: the engines gather batches from tensors of one shape, and the vectorized
engine stacks clients' batches, so a length per batch would make every batch a new shape. The
attention mask is 1 on the tokens and 0 on the padding; the labels follow the mask, not the pad
id, so that a tokenizer whose pad token is its EOS (Llama's) still learns its EOS.

Train/test: a hf: dataset's train and test splits as they are; otherwise a fixed 80/20 split of
the rows (seed 0, as for tables). `Dataset.groups` gives each training row's group (the group
column's values in sorted order), and a classification dataset's targets are the labels the
`dirichlet` partition splits by.

Limits (`TextLimits`), so that a wrong or hostile file fails fast in one line instead of
exhausting memory: the file's bytes (a hf: dataset's Arrow data), its rows, a JSON Lines or CSV
line's bytes, and a text's characters. Every text must be UTF-8; a value that is missing, or not
text where text is wanted, is refused with its line.

Also here: `shakespeare_rows`, the roles of the bundled scenes as plain-text rows;
`sentiment_rows`, a small synthetic sentiment dataset; `char_tokenizer`, a character-level
tokenizer for models built from a config. Tokenizing needs transformers (`fedforge[llm]`); the
tokenizer is given, any `PreTrainedTokenizerBase`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from ..data.datasets import Dataset, TensorData
from ..data.shakespeare import role_name, split_into_plays
from ..data.tables import split_indices, targets
from ..errors import ConfigError, DataError
from ..tasks import IGNORE
from .settings import PADDINGS, TextSettings
from .tokenizer import CHAR_SPECIALS, char_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SOURCES = ("jsonl", "csv", "hf")
TASKS = ("causal-lm", "sequence-classification", "classification")

# Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT["prompt_no_input"]),
# the one FlowerTune's and NVFlare's LLM examples fill.
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# transformers' model_max_length when a tokenizer does not know its model's (int(1e30)).
_UNKNOWN_CONTEXT = 10**12


@dataclass(frozen=True)
class TextLimits:
    """How much of a text file fedforge reads before refusing it.

    Args:
        max_bytes: the file's size (a hf: dataset's Arrow data).
        max_rows: rows (each split's, for hf:).
        max_line_bytes: a JSON Lines line's bytes (and a CSV line's).
        max_text_chars: one value's characters (the csv module's own limit on a field, 131072).
    """

    max_bytes: int = 1 << 30
    max_rows: int = 1_000_000
    max_line_bytes: int = 1 << 20
    max_text_chars: int = 131_072

    def __post_init__(self):
        for name in ("max_bytes", "max_rows", "max_line_bytes", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"text limits: {name} must be >= 1, got {getattr(self, name)}")


LIMITS = TextLimits()


@dataclass(frozen=True)
class TextOptions:
    """Which columns are read and how their text is tokenized (see the module's docstring).

    Args:
        text_column: the text (plain text and classification).
        label_column: the class label (sequence classification).
        group_column: each row's user or id: the clients of the natural partition.
        instruction_column: with `response_column`, instruction tuning: the prompt is `template`
            filled from the row's columns (any it names, e.g. Alpaca's {input} too).
        response_column: the response, the only tokens the loss is on.
        template: the prompt, a format string naming columns; default Alpaca's.
        max_length: tokens per row at most; default the model's context.
        truncation: keep a longer row's first max_length tokens instead of refusing it.
        padding: "longest" (the longest row, at most max_length) or "max_length".
        add_eos: end each causal-LM row with the tokenizer's EOS (the model learns to stop).
    """

    text_column: str = "text"
    label_column: str | None = None
    group_column: str | None = None
    instruction_column: str | None = None
    response_column: str | None = None
    template: str = ALPACA
    max_length: int | None = None
    truncation: bool = False
    padding: str = "longest"
    add_eos: bool = True

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 tokens, got {self.max_length}")
        if self.padding not in PADDINGS:
            raise ConfigError(f"padding must be one of {', '.join(PADDINGS)}, got {self.padding!r}")
        if (self.instruction_column is None) != (self.response_column is None):
            raise ConfigError("instruction tuning needs both an instruction and a response column")
        if self.instruction_column is not None:
            fields = template_fields(self.template)
            if self.response_column in fields:
                raise ConfigError(f"the prompt template names the response column {self.response_column!r}")

    @property
    def instructions(self) -> bool:
        return self.response_column is not None

    def columns(self, task: str) -> list[str]:
        """The columns `task` reads, each once."""
        if task not in TASKS:
            raise ConfigError(f"text data serve the tasks {', '.join(TASKS)}, not {task!r}")
        if task == "causal-lm":
            wanted = (
                [*template_fields(self.template), self.response_column] if self.instructions else [self.text_column]
            )
        else:
            if self.label_column is None:
                raise ConfigError(f"task {task} needs a label column (--label-column)")
            wanted = [self.text_column, self.label_column]
        return list(dict.fromkeys([c for c in wanted if c] + ([self.group_column] if self.group_column else [])))


def template_fields(template: str) -> list[str]:
    """The columns a prompt template names: "{instruction}" names instruction. A field is a bare
    column name: no format spec nor conversion ("{instruction:>999999999}" would pad a row to a
    gigabyte; a template may come from a deployment's server)."""
    try:
        parts = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)]
    except ValueError as e:
        raise ConfigError(f"the prompt template is not a format string ({e}): {template!r:.80}") from None
    fields = [name for name, _, _ in parts if name is not None]
    if not fields or any(not f.isidentifier() or spec or conversion for f, spec, conversion in parts if f is not None):
        raise ConfigError(f"the prompt template must name columns as {{column}} and nothing more, got {template!r:.80}")
    return list(dict.fromkeys(fields))


# -- reading ----------------------------------------------------------------------------------------

Rows = dict[str, list]  # column -> one value per row
Splits = dict[str, Rows]  # "train" and "test", or "all" (split 80/20 later)


def parse_text_source(spec: str) -> tuple[str, Path]:
    """("jsonl", PATH) for "jsonl:PATH" (likewise csv: and hf:)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in SOURCES or not path:
        raise ConfigError(f"text data are {', '.join(f'{k}:PATH' for k in SOURCES)}; got {spec!r}")
    return kind, Path(path)


def read_rows(spec: str, columns: Sequence[str], *, text: Sequence[str] = (), limits: TextLimits = LIMITS) -> Splits:
    """The `columns` of the text file `spec` ("jsonl:PATH", "csv:PATH" or "hf:PATH"), each a list
    of values per split: {"train": rows, "test": rows} for a hf: dataset with both, else {"all": rows}.

    `text` names the columns that must hold text (the others, labels and groups, may hold
    numbers too). Every value is checked: present, of its kind, within `limits`.

    Raises:
        DataError: the file is missing, too large, not of its kind, or lacks a column or a value.
    """
    kind, path = parse_text_source(spec)
    if not columns:
        raise ConfigError("no column to read")
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if kind != "hf":
        if path.is_dir():
            raise DataError(f"{path} is a folder, not a {'JSON Lines' if kind == 'jsonl' else 'CSV'} file")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise DataError(f"{path} is {size} bytes, more than fedforge reads ({limits.max_bytes})")
    if kind == "jsonl":
        return {"all": _read_jsonl(path, columns, set(text), limits)}
    if kind == "csv":
        return {"all": _read_csv(path, columns, set(text), limits)}
    return _read_hf(path, columns, set(text), limits)


def _value(value: Any, column: str, is_text: bool, where: str, limits: TextLimits):
    """`value` checked: text for a text column, else text or a number (a label, a user id)."""
    if value is None:
        raise DataError(f"{where}: column {column!r} has no value")
    if isinstance(value, str):
        if len(value) > limits.max_text_chars:
            raise DataError(
                f"{where}: column {column!r} holds {len(value)} characters, more than fedforge reads "
                f"({limits.max_text_chars})"
            )
        return value
    if is_text:
        raise DataError(f"{where}: column {column!r} must hold text, got {type(value).__name__}")
    if isinstance(value, (bool, int, float)):
        return value
    raise DataError(f"{where}: column {column!r} must hold text or a number, got {type(value).__name__}")


def _lines(f, path: Path, limits: TextLimits) -> Iterator[str]:
    """The lines of binary file `f`, decoded; a line longer than the limit is refused before it is
    read whole."""
    number = 0
    while raw := f.readline(limits.max_line_bytes + 1):
        number += 1
        if len(raw) > limits.max_line_bytes:
            raise DataError(f"{path}, line {number}: longer than {limits.max_line_bytes} bytes")
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}, line {number}: not UTF-8 text (byte {e.start})") from None


def _read_jsonl(path: Path, columns: Sequence[str], text: set[str], limits: TextLimits) -> Rows:
    rows: Rows = {c: [] for c in columns}
    count = 0
    with open(path, "rb") as f:
        for number, line in enumerate(_lines(f, path, limits), 1):
            if not line.strip():
                continue
            count += 1
            if count > limits.max_rows:
                raise DataError(f"{path} has more than {limits.max_rows} rows, more than fedforge reads")
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise DataError(f"{where}: not JSON ({str(e).splitlines()[0][:80]})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a JSON Lines row must be an object, got {type(row).__name__}")
            for c in columns:
                if c not in row:
                    keys = ", ".join(map(repr, list(row)[:20]))
                    raise DataError(f"{where}: no column {c!r} (the row has: {keys})")
                rows[c].append(_value(row[c], c, c in text, where, limits))
    if not count:
        raise DataError(f"{path} has no rows")
    return rows


def _read_csv(path: Path, columns: Sequence[str], text: set[str], limits: TextLimits) -> Rows:
    rows: Rows = {c: [] for c in columns}
    try:
        with open(path, "rb") as f:
            reader = csv.reader(_lines(f, path, limits))
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataError(f"{path} is empty (expected a header row naming the columns)")
            header = [h.strip() for h in header]
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(f"{path} has no column {missing[0]!r} (its columns: {', '.join(header)[:400]})")
            positions = [header.index(c) for c in columns]
            count = 0
            for row in reader:
                if not row:
                    continue  # a blank line
                where = f"{path}, line {reader.line_num}"
                if len(row) != len(header):
                    raise DataError(f"{where}: {len(row)} fields, but the header has {len(header)}")
                count += 1
                if count > limits.max_rows:
                    raise DataError(f"{path} has more than {limits.max_rows} rows, more than fedforge reads")
                for c, i in zip(columns, positions, strict=True):
                    if c not in text and not row[i].strip():
                        raise DataError(f"{where}: column {c!r} has no value")
                    rows[c].append(_value(row[i], c, c in text, where, limits))
    except csv.Error as e:
        raise DataError(f"{path} is not a readable CSV file: {e}") from None
    if not count:
        raise DataError(f"{path} has a header but no rows")
    return rows


def _read_hf(path: Path, columns: Sequence[str], text: set[str], limits: TextLimits) -> Splits:
    from ..data.huggingface import read_splits

    tables, _ = read_splits(path)
    size = sum(table.nbytes for table in tables.values())
    if size > limits.max_bytes:
        raise DataError(f"{path} holds {size} bytes of data, more than fedforge reads ({limits.max_bytes})")
    splits: Splits = {}
    for split, table in tables.items():
        where = f"{path}" if split == "all" else f"{path}, split {split!r}"
        if table.num_rows > limits.max_rows:
            raise DataError(f"{where} has {table.num_rows} rows, more than fedforge reads ({limits.max_rows})")
        if table.num_rows == 0:
            raise DataError(f"{where} has no rows")
        rows: Rows = {}
        for c in columns:
            if c not in table.column_names:
                raise DataError(f"{where} has no column {c!r} (its columns: {', '.join(table.column_names)[:400]})")
            values = table.column(c).to_pylist()
            rows[c] = [_value(v, c, c in text, f"{where}, row {i + 1}", limits) for i, v in enumerate(values)]
        splits[split] = rows
    return splits


# -- tokenizing -------------------------------------------------------------------------------------


def model_context(tokenizer: PreTrainedTokenizerBase, context: int | None = None) -> int | None:
    """The model's context in tokens: `context` when given (a model config's
    max_position_embeddings), else the tokenizer's model_max_length when it knows one."""
    if context is not None:
        return context
    known = tokenizer.model_max_length
    return int(known) if isinstance(known, int) and 0 < known < _UNKNOWN_CONTEXT else None


def _max_length(max_length: int | None, context: int | None) -> int:
    if max_length is None:
        if context is None:
            raise ConfigError("give max_length (--max-length): the tokenizer does not know its model's context")
        return context
    if context is not None and max_length > context:
        raise ConfigError(f"max_length {max_length} is more than the model's context ({context} tokens)")
    return max_length


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an EOS token to pad rows with")
    return int(pad)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=special, truncation=False)["input_ids"]]


def _fit(
    rows: list[list[int]], *, max_length: int, truncation: bool, context: int | None, where: str
) -> list[list[int]]:
    """`rows` cut to `max_length` with truncation; else one line for the first that is longer."""
    too_long = next((i for i, ids in enumerate(rows) if len(ids) > max_length), None)
    if too_long is None:
        return rows
    if not truncation:
        n = len(rows[too_long])
        if context is not None and n > context:  # no --max-length can exceed the context
            limit, remedy = f"the model's context ({context} tokens)", ""
        else:
            limit, remedy = f"max_length ({max_length} tokens)", " or a larger --max-length"
        raise ConfigError(
            f"{where}: row {too_long + 1} is {n} tokens, more than {limit}; ask for truncation (--truncation){remedy}"
        )
    return [ids[:max_length] for ids in rows]


def _padded(rows: list[list[int]], *, max_length: int, padding: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids (int64, rows x length), right-padded with `pad_id`, and their attention mask."""
    if padding not in PADDINGS:
        raise ConfigError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    length = max_length if padding == "max_length" else max(1, max(map(len, rows), default=1))
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    truncation: bool = False,
    padding: str = "longest",
    add_eos: bool = False,
    context: int | None = None,
    where: str = "text",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`texts` as the tokenizer encodes them (with its special tokens), EOS appended with
    `add_eos`, fitted to `max_length` and right-padded: (input_ids, attention_mask), int64,
    rows x length.

    Raises:
        ConfigError: a text longer than max_length (or the model's context) without truncation;
            max_length longer than the context.
    """
    context = model_context(tokenizer, context)
    max_length = _max_length(max_length, context)
    rows = _encode(tokenizer, texts, special=True)
    if add_eos:
        rows = [_with_eos(tokenizer, ids) for ids in rows]
    rows = _fit(rows, max_length=max_length, truncation=truncation, context=context, where=where)
    return _padded(rows, max_length=max_length, padding=padding, pad_id=_pad_id(tokenizer))


def _with_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token to end rows with (add_eos=False to go without)")
    return ids if ids and ids[-1] == eos else [*ids, int(eos)]


def causal_lm_data(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    truncation: bool = False,
    padding: str = "longest",
    add_eos: bool = True,
    context: int | None = None,
    where: str = "text",
) -> TensorData:
    """Plain text for causal-LM fine-tuning: inputs {input_ids, attention_mask}; target the
    labels, the input ids with IGNORE on the padding."""
    ids, mask = tokenize(
        tokenizer,
        texts,
        max_length=max_length,
        truncation=truncation,
        padding=padding,
        add_eos=add_eos,
        context=context,
        where=where,
    )
    return TensorData({"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, IGNORE))


def instruction_data(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int | None = None,
    truncation: bool = False,
    padding: str = "longest",
    add_eos: bool = True,
    context: int | None = None,
    where: str = "text",
) -> TensorData:
    """Prompt and response pairs for instruction tuning: the prompt encoded as a text, the response
    without special tokens, then EOS; the labels are the response's tokens (and EOS), IGNORE on
    the prompt and the padding.

    Raises:
        ConfigError: a row too long without truncation, or one whose prompt leaves no response
            token within max_length.
    """
    if len(prompts) != len(responses):
        raise ConfigError(f"{len(prompts)} prompts but {len(responses)} responses")
    context = model_context(tokenizer, context)
    max_length = _max_length(max_length, context)
    heads = _encode(tokenizer, prompts, special=True)
    tails = _encode(tokenizer, responses, special=False)
    if add_eos:
        tails = [_with_eos(tokenizer, ids) for ids in tails]
    rows = [h + t for h, t in zip(heads, tails, strict=True)]
    rows = _fit(rows, max_length=max_length, truncation=truncation, context=context, where=where)
    short = next((i for i, h in enumerate(heads) if len(h) >= len(rows[i])), None)
    if short is not None:
        raise ConfigError(
            f"{where}: row {short + 1} has no response token within max_length ({max_length}; its prompt is "
            f"{len(heads[short])} tokens); use a larger --max-length, a shorter prompt or a response"
        )
    ids, mask = _padded(rows, max_length=max_length, padding=padding, pad_id=_pad_id(tokenizer))
    labels = ids.masked_fill(mask == 0, IGNORE)
    for i, head in enumerate(heads):
        labels[i, : len(head)] = IGNORE
    return TensorData({"input_ids": ids, "attention_mask": mask}, labels)


def classification_data(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    *,
    max_length: int | None = None,
    truncation: bool = False,
    padding: str = "longest",
    context: int | None = None,
    where: str = "text",
) -> TensorData:
    """Texts and their class ids (0..k-1) for sequence classification: inputs {input_ids,
    attention_mask}; target the class ids (int64)."""
    ids, mask = tokenize(
        tokenizer, texts, max_length=max_length, truncation=truncation, padding=padding, context=context, where=where
    )
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if y.shape != (len(texts),):
        raise ConfigError(f"{len(texts)} texts but labels of shape {tuple(y.shape)}")
    return TensorData({"input_ids": ids, "attention_mask": mask}, y)


# -- datasets ---------------------------------------------------------------------------------------


def text_dataset(
    splits: Splits,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    options: TextOptions = TextOptions(),
    context: int | None = None,
    name: str = "text",
    where: str = "text",
) -> Dataset:
    """Rows (`read_rows`'s splits) tokenized for `task` ("causal-lm", or "sequence-classification"
    and its synonym "classification"), as a Dataset: train and test (hf:'s splits, or a fixed
    80/20 split), `num_classes` (the tokenizer's vocabulary for causal-LM, the labels' count for
    classification) and `groups` (from the group column, when named)."""
    columns = options.columns(task)
    names = list(splits)
    rows = {c: [v for split in names for v in splits[split][c]] for c in columns}
    sizes = [len(splits[split][columns[0]]) for split in names]
    how: dict[str, Any] = {
        "max_length": options.max_length,
        "truncation": options.truncation,
        "padding": options.padding,
        "context": context,
        "where": where,
    }
    if task == "causal-lm" and options.response_column is not None:
        fields = template_fields(options.template)
        prompts = [options.template.format(**{f: rows[f][i] for f in fields}) for i in range(sum(sizes))]
        data = instruction_data(tokenizer, prompts, rows[options.response_column], add_eos=options.add_eos, **how)
        num_classes = len(tokenizer)
    elif task == "causal-lm":
        data = causal_lm_data(tokenizer, rows[options.text_column], add_eos=options.add_eos, **how)
        num_classes = len(tokenizer)
    else:
        label = cast(str, options.label_column)  # options.columns refused a classification without one
        labels, num_classes = targets(_array(rows[label]), task="classification", column=label, where=where)
        data = classification_data(tokenizer, rows[options.text_column], labels, **how)
    if len(names) == 2:
        train_rows, test_rows = np.arange(sizes[0]), np.arange(sizes[0], sum(sizes))
    else:
        if sizes[0] < 3:
            raise DataError(f"{where} has {sizes[0]} row(s): too few for an 80/20 train/test split")
        train_rows, test_rows = split_indices(sizes[0])
    groups = None
    if options.group_column is not None:
        values = _array(rows[options.group_column])[train_rows]
        groups = np.unique(values, return_inverse=True)[1].astype(np.int64).reshape(-1)
    return Dataset(name, data.subset(train_rows), data.subset(test_rows), num_classes=num_classes, groups=groups)


def _array(values: list) -> np.ndarray:
    """Labels or group ids as one numpy array: numbers as numbers (a CSV file's "10" too, so that
    it sorts after "9" as in JSON Lines), anything else as text."""
    try:
        return np.asarray([float(v) for v in values])
    except ValueError:
        return np.asarray([str(v) for v in values], dtype=object)


def load_text(
    spec: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    options: TextOptions = TextOptions(),
    context: int | None = None,
    limits: TextLimits = LIMITS,
    name: str | None = None,
) -> Dataset:
    """The text dataset `spec` ("jsonl:PATH", "csv:PATH" or "hf:PATH") read (`read_rows`) and
    tokenized for `task` (`text_dataset`): what `--dataset jsonl:PATH --task causal-lm` loads."""
    columns = options.columns(task)
    text = [c for c in columns if c not in (options.label_column, options.group_column)]
    splits = read_rows(spec, columns, text=text, limits=limits)
    _, path = parse_text_source(spec)
    label = name or f"{spec.partition(':')[0]}-{path.stem or 'text'}"
    return text_dataset(splits, tokenizer, task=task, options=options, context=context, name=label, where=str(path))


def text_options(settings: TextSettings) -> TextOptions:
    """The text settings of a run (`--text-column` and friends) as TextOptions, checked."""
    template = settings.prompt_template
    if template is None:  # Alpaca's, its {instruction} read from the instruction column
        template = ALPACA.replace("{instruction}", "{%s}" % (settings.instruction_column or "instruction"))
    return TextOptions(
        text_column=settings.text_column,
        label_column=settings.label_column,
        group_column=settings.group_column,
        instruction_column=settings.instruction_column,
        response_column=settings.response_column,
        template=template,
        max_length=settings.max_length,
        truncation=settings.truncation,
        padding=settings.padding,
    )


def load_requested(
    spec: str, request: Any, *, task: str, model: str, options: TextOptions, trust_remote_code: bool = False
) -> Dataset:
    """The text dataset `spec` for `task`, tokenized with the tokenizer of the hf: `model` and
    bounded by its context: "jsonl:PATH", "csv:PATH", "hf:PATH" (`load_text`), or
    "shakespeare-text" (the Complete Works found or downloaded as for `shakespeare`, by
    `request`'s data_dir, download and progress) and "shakespeare-text:PATH" (a file in their
    layout, e.g. examples/data/shakespeare_scenes.txt): the roles' lines as plain text
    (`shakespeare_rows`), grouped by role for the natural partition. What a run's
    `fedforge.data.Request.text` calls (Config.data_request binds the keyword arguments)."""
    from ..data.shakespeare import locate_text, read_text
    from .models import context_length, load_tokenizer

    if task not in TASKS:
        raise ConfigError(f"dataset {spec} is text: train it with --task causal-lm or sequence-classification")
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    context = context_length(model, trust_remote_code=trust_remote_code)
    kind, _, path = spec.partition(":")
    if kind != "shakespeare-text":
        return load_text(spec, tokenizer, task=task, options=options, context=context)
    if task != "causal-lm":
        raise ConfigError(f"dataset {spec} is plain text: train it with --task causal-lm, not {task!r}")
    if path:
        file = Path(path)
        if not file.is_file():
            raise DataError(
                f"{file} does not exist (shakespeare-text:PATH is a text file in the Complete Works' layout)"
            )
    else:
        file = locate_text(data_dir=request.data_dir, download_missing=request.download, progress=request.progress)
    rows = shakespeare_rows(read_text(file))
    options = dataclasses.replace(
        options,
        text_column="text",
        group_column="role",
        label_column=None,
        instruction_column=None,
        response_column=None,
    )
    return text_dataset(
        {"all": rows},
        tokenizer,
        task="causal-lm",
        options=options,
        context=context,
        name="shakespeare-text",
        where=str(file),
    )


# -- bundled and synthetic text ---------------------------------------------------------------------


def shakespeare_rows(text: str, *, max_chars: int = 200) -> Rows:
    """The speaking roles of a text in the Complete Works' layout (examples/data/
    shakespeare_scenes.txt, or Gutenberg's file) as plain-text rows: {"text": [...], "role": [...]}.

    Roles and their lines are LEAF's (`fedforge.data.shakespeare`: roles of more than two lines,
    named PLAY_ROLE); a row is a role's consecutive lines joined by spaces, up to `max_chars`
    characters (a longer line is a row alone). Group by "role" for one client per role.
    """
    if max_chars < 1:
        raise ConfigError(f"max_chars must be >= 1, got {max_chars}")
    rows: Rows = {"text": [], "role": []}
    for play, roles in split_into_plays(text):
        for role, lines in roles.items():
            if len(lines) <= 2:
                continue
            current = ""
            for line in (" ".join(line.split()) for line in lines):
                if current and len(current) + 1 + len(line) > max_chars:
                    rows["text"].append(current)
                    rows["role"].append(role_name(play, role))
                    current = ""
                current = f"{current} {line}" if current else line
            if current:
                rows["text"].append(current)
                rows["role"].append(role_name(play, role))
    if not rows["text"]:
        raise DataError("no role with more than two lines (a speech is a line '  NAME. text')")
    return rows


_SUBJECTS = ("the film", "the food", "the service", "the book", "the hotel", "the music", "the staff", "the game")
_POSITIVE = ("wonderful", "great", "lovely", "excellent", "delightful", "superb", "pleasant", "brilliant")
_NEGATIVE = ("awful", "terrible", "dreadful", "boring", "poor", "disappointing", "bland", "horrible")
_SENTENCES = (
    "{subject} was {word}",
    "i found {subject} {word}",
    "{subject} is {word} and {other}",
    "honestly, {subject} felt {word}",
    "what a {word} day, {subject} was {other}",
    "{subject} was not {opposite} at all",
)


def sentiment_rows(num_rows: int = 600, *, num_users: int = 10, seed: int = 0) -> Rows:
    """A small synthetic sentiment dataset, the same for the same arguments: {"text", "label"
    ("positive" or "negative"), "user"}. Each sentence praises or pans a subject with words of its
    label (one in six negates a word of the other); each user writes `num_rows // num_users` rows
    or one more, a share of them positive drawn per user (Beta(0.5, 0.5): users differ, so that
    the natural partition by user is skewed by label)."""
    if not 1 <= num_users <= num_rows:
        raise ConfigError(f"sentiment_rows: need 1 <= num_users <= num_rows, got {num_users} and {num_rows}")
    rng = np.random.default_rng(seed)
    share = rng.beta(0.5, 0.5, num_users)
    users = np.sort(np.arange(num_rows) % num_users)
    rows: Rows = {"text": [], "label": [], "user": []}
    for user in users.tolist():
        positive = bool(rng.random() < share[user])
        same, opposite = (_POSITIVE, _NEGATIVE) if positive else (_NEGATIVE, _POSITIVE)
        sentence = _SENTENCES[rng.integers(len(_SENTENCES))]
        word, other = rng.choice(len(same), 2, replace=False)
        rows["text"].append(
            sentence.format(
                subject=_SUBJECTS[rng.integers(len(_SUBJECTS))],
                word=same[word],
                other=same[other],
                opposite=opposite[rng.integers(len(opposite))],
            )
        )
        rows["label"].append("positive" if positive else "negative")
        rows["user"].append(f"user{user:03d}")
    return rows


__all__ = [
    "ALPACA",
    "ALPACA_WITH_INPUT",
    "CHAR_SPECIALS",
    "LIMITS",
    "PADDINGS",
    "SOURCES",
    "TASKS",
    "TextLimits",
    "TextOptions",
    "causal_lm_data",
    "char_tokenizer",
    "classification_data",
    "instruction_data",
    "load_requested",
    "load_text",
    "model_context",
    "parse_text_source",
    "read_rows",
    "sentiment_rows",
    "shakespeare_rows",
    "template_fields",
    "text_dataset",
    "text_options",
    "tokenize",
]
