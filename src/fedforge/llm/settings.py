"""The settings of a pretrained transformer's fine-tuning (TOML: flat keys or the table [llm]).

Checked here without transformers or peft: they are imported when the model is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._options import option
from ..errors import ConfigError

HF_PREFIX = "hf:"
MAX_RANK = 4096


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

    def __post_init__(self):
        if not 0 <= self.lora_rank <= MAX_RANK:
            raise ConfigError(f"lora_rank must be between 0 and {MAX_RANK}, got {self.lora_rank}")
        if not 0 < self.lora_alpha <= 1e6:
            raise ConfigError(f"lora_alpha must be > 0 (and at most 1e6), got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.lora_target_names()
        if self.save_adapters is not None and self.lora_rank == 0:
            raise ConfigError("save_adapters needs adapters: lora_rank 0 trains the whole model (it is in model.pt)")

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


__all__ = ["HF_PREFIX", "LlmSettings", "is_hf_model"]
