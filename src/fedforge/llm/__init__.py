"""Fine-tuning pretrained transformers, federated: `--model hf:PATH` with LoRA adapters (peft), text
data tokenized with the model's tokenizer, causal-LM and sequence-classification tasks.

Needs transformers and peft: `pip install 'fedforge[llm]'`. Nothing here imports them at import
time; `require()` does, and says how to install them when they are missing.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import ConfigError

INSTALL = "pip install 'fedforge[llm]'"


def require() -> tuple[ModuleType, ModuleType]:
    """transformers and peft, imported; a ConfigError that says how to install them otherwise."""
    try:
        import peft
        import transformers
    except ImportError as e:
        raise ConfigError(f"--model hf: needs {e.name}, which is not installed: {INSTALL}") from None
    return transformers, peft
