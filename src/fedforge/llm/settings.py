"""The settings of a pretrained transformer's fine-tuning (TOML: flat keys or the table [llm]).

Checked here without transformers or peft: they are imported when the model is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._options import check_choices, option
from ..errors import ConfigError

HF_PREFIX = "hf:"
MAX_RANK = 4096
PRECISIONS = ("float32", "bf16")
# The tasks that read text (--dataset jsonl:PATH, csv:PATH, hf:PATH without --target, shakespeare-text),
# tokenized with the hf: model's tokenizer (fedforge.llm.text).
TEXT_TASKS = ("causal-lm", "sequence-classification")
PADDINGS = ("longest", "max_length")


def is_hf_model(name: str) -> bool:
    """Whether the model name `name` is a transformers model, `hf:PATH` (a folder or a hub name)."""
    return name.startswith(HF_PREFIX)


@dataclass(frozen=True)
class LlmSettings:
    """LoRA adapters of a `--model hf:PATH` (the base frozen, the adapters shared) and their saving."""

    lora_rank: int = option(
        8,
        "hf: models: the rank of the LoRA adapters trained and sent instead of the model (0: no adapters, "
        "every weight trained and sent)",
    )
    lora_alpha: float = option(16.0, "hf: models: LoRA's scaling numerator (the update is scaled by alpha/rank)")
    lora_dropout: float = option(0.0, "hf: models: dropout on the LoRA adapters' input while training")
    lora_targets: str | None = option(
        None,
        "hf: models: the modules that get adapters, comma-separated names (e.g. q_proj,v_proj; "
        "default: peft's for the architecture, the attention's query and value projections)",
        metavar="NAMES",
    )
    save_adapters: str | None = option(
        None,
        "hf: models: after every round, write the global adapters to DIR in peft's format "
        "(adapter_model.safetensors, adapter_config.json: PeftModel.from_pretrained loads them onto the base)",
        metavar="DIR",
    )
    trust_remote_code: bool = option(
        False,
        "hf: models: run the Python code a model folder or hub repository ships with it (auto_map); "
        "off, only transformers' own architectures load",
    )
    precision: str = option(
        "float32",
        "hf: models: bf16 loads the frozen base in bfloat16 and runs the forward and backward passes "
        "under CUDA's bfloat16 autocast, the adapters and their optimizer state in float32 (CUDA only)",
        PRECISIONS,
    )

    def __post_init__(self):
        check_choices(self, LlmSettings)
        if not 0 <= self.lora_rank <= MAX_RANK:
            raise ConfigError(f"lora_rank must be between 0 and {MAX_RANK}, got {self.lora_rank}")
        if not 0 < self.lora_alpha <= 1e6:
            raise ConfigError(f"lora_alpha must be > 0 (and at most 1e6), got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.lora_target_names()
        if self.save_adapters is not None and self.lora_rank == 0:
            raise ConfigError("save_adapters needs adapters: lora_rank 0 trains the whole model (it is in model.pt)")
        if self.precision == "bf16" and self.lora_rank == 0:
            raise ConfigError("precision bf16 keeps the base frozen in bfloat16: it needs adapters (lora_rank > 0)")

    def lora_target_names(self) -> tuple[str, ...] | None:
        """The module names of `lora_targets` (None: the architecture's default)."""
        if self.lora_targets is None:
            return None
        names = tuple(n.strip() for n in self.lora_targets.split(","))
        for n in names:
            if not re.fullmatch(r"[A-Za-z_][\w.]*", n):
                raise ConfigError(
                    f"lora_targets are module names separated by commas (e.g. q_proj,v_proj), got {self.lora_targets!r}"
                )
        return names

    def changed(self) -> list[str]:
        """The settings given other values than their defaults (those that only an hf: model uses)."""
        return [name for name, value in vars(LlmSettings()).items() if getattr(self, name) != value]


@dataclass(frozen=True)
class TextSettings:
    """How a text dataset is read and tokenized for the text tasks (TOML: flat keys or the table
    [text]); `fedforge.llm.text.text_options` gives them to the text side as its TextOptions."""

    text_column: str = option("text", "text data: the column of text (plain text and classification)", metavar="NAME")
    label_column: str | None = option(
        None, "text data: the column of class labels (sequence-classification)", metavar="NAME"
    )
    group_column: str | None = option(
        None, "text data: each row's user or id, one client per value with --partition natural", metavar="NAME"
    )
    instruction_column: str | None = option(
        None,
        "text data: instruction tuning (causal-lm), the instruction column, which Alpaca's prompt "
        "template reads (default template); with --response-column",
        metavar="NAME",
    )
    response_column: str | None = option(
        None, "text data: instruction tuning, the response column, the only tokens the loss is on", metavar="NAME"
    )
    prompt_template: str | None = option(
        None,
        "text data: instruction tuning's prompt, a format string naming columns ({instruction}, ...; default Alpaca's)",
        metavar="TEMPLATE",
    )
    max_length: int | None = option(
        None, "text data: tokens per row at most (default: the model's context)", metavar="TOKENS"
    )
    truncation: bool = option(False, "text data: keep a longer row's first max_length tokens instead of refusing it")
    padding: str = option(
        "longest",
        "text data: pad every row to the longest row (at most max_length) or to max_length",
        PADDINGS,
    )

    def __post_init__(self):
        check_choices(self, TextSettings)
        for name in ("text_column", "label_column", "group_column", "instruction_column", "response_column"):
            value = getattr(self, name)
            if value is not None and not 0 < len(value) <= 256:
                raise ConfigError(f"{name} must be a column name of 1 to 256 characters, got {value!r:.80}")
        if self.prompt_template is not None and len(self.prompt_template) > 65_536:
            raise ConfigError(f"prompt_template is {len(self.prompt_template)} characters, more than 65536")
        if self.instruction_column is not None and not self.instruction_column.isidentifier():
            raise ConfigError(
                "instruction_column must be a name a prompt template can hold ({column}), got "
                f"{self.instruction_column!r:.80}"
            )
        if self.max_length is not None and not 2 <= self.max_length <= 1 << 24:
            raise ConfigError(f"max_length must be between 2 and {1 << 24} tokens, got {self.max_length}")
        # fedforge.llm.text.text_options checks the rest: the columns' pairing, the template.

    def changed(self) -> list[str]:
        """The settings given other values than their defaults (those that only text data use)."""
        return [name for name, value in vars(TextSettings()).items() if getattr(self, name) != value]


__all__ = ["HF_PREFIX", "PRECISIONS", "TEXT_TASKS", "LlmSettings", "TextSettings", "is_hf_model"]
