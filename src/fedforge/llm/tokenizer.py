"""A character-level tokenizer, for a small model built from a config with no download: the one
that `fedforge.llm.text` and `fedforge.llm.models.save_tiny_llama` use, and examples and tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import ConfigError
from . import require

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CHAR_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
MAX_SYMBOLS = 65_536


def char_tokenizer(
    texts: Iterable[str] = (), *, alphabet: str = "", model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (a `PreTrainedTokenizerFast`, `save_pretrained`-able) whose
    symbols are the characters of `texts` and `alphabet`, in code-point order, after the special
    tokens <pad> 0, <s> 1 (put before each text), </s> 2 and <unk> 3 (any other character).

    For a small model built from a config, with no download: its vocab_size is `len(tokenizer)`.
    """
    transformers, _ = require()
    from tokenizers import Tokenizer, decoders, models, processors

    symbols: set[str] = set(alphabet)
    for text in texts:
        symbols.update(text)
        if len(symbols) > MAX_SYMBOLS:
            raise ConfigError(f"char_tokenizer: more than {MAX_SYMBOLS} distinct characters")
    symbols -= set(CHAR_SPECIALS)
    vocab = {token: i for i, token in enumerate(CHAR_SPECIALS)}
    vocab.update({c: len(CHAR_SPECIALS) + i for i, c in enumerate(sorted(symbols))})
    # BPE without merges: each character its own token (no pre-tokenizer: spaces are characters too).
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    options = {} if model_max_length is None else {"model_max_length": model_max_length}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", **options
    )


__all__ = ["CHAR_SPECIALS", "MAX_SYMBOLS", "char_tokenizer"]
